"""Stage `curvature`: fit one K-FAC / EK-FAC variant (fisher type, approximation, eigenvalue correction) of the
final model to its training loss and save it; the curvature itself is core/curvature.py.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import ArtefactError, generator, log, select_device
from workflow_scripts.core.curvature import (
    CURVATURE_STREAM,
    DEFAULTS,
    FISHER_TYPES,
    KFAC_APPROX,
    LABEL_STREAM,
    DrawBatches,
    KFACCurvature,
    PackedDenoiser,
    checkpoint_identity,
    curvature_config,
    curvature_param_names,
    is_conditional,
    kfac_from_data,
    load_curvature,
    settings_from,
)
from workflow_scripts.families.ddpm import alphas_cumprod
from workflow_scripts.families.registry import load_family_model


def fit_curvature(
    model: nn.Module,
    images: np.ndarray,
    settings: dict,
    diffusion_cfg: dict,
    seed: int,
    device: torch.device | str = "cpu",
    extra_config: dict | None = None,
    check_deterministic: bool = False,
    stream: int = CURVATURE_STREAM,
    progressbar: bool = False,
    cond: np.ndarray | None = None,
) -> KFACCurvature:
    """K-FAC (EK-FAC) of the GGN of the mean simple loss over `images` with settings['draws'] seeded draws each.

    settings: fisher_type, kfac_approx, ekfac, draws, fisher_mc_samples, separate_weight_and_bias, batch_size
    (rows per curvlinops batch). seed: seeds.gradients. extra_config: identity of the model (checkpoint hash, ...),
    stored in the file's config. cond: the images' conditions (caption indices) for a conditional model (required
    then, and part of the file's config), None for an unconditional one.
    """
    s = {**DEFAULTS, **settings}
    if is_conditional(model) != (cond is not None):
        raise ValueError(
            "a conditional model needs the training examples' conditions (cond)"
            if is_conditional(model)
            else "conditions given for an unconditional model"
        )
    model = model.to(device).eval()
    wrapper = PackedDenoiser(model, images.shape[1:])
    names = ["model." + n for n in curvature_param_names(model)]
    data = DrawBatches(
        torch.from_numpy(np.asarray(images, dtype=np.float32)),
        s["draws"],
        alphas_cumprod(diffusion_cfg),
        seed,
        stream,
        s["batch_size"],
        cond=None if cond is None else torch.from_numpy(np.asarray(cond, dtype=np.int64)),
    )
    config = curvature_config(s, diffusion_cfg, seed, images, extra_config, cond)
    label_seed = int(generator(seed, LABEL_STREAM).initial_seed() % (2**31 - 1))
    curvature = kfac_from_data(
        wrapper,
        names,
        data,
        data.num_rows,
        s,
        label_seed,
        config=config,
        check_deterministic=check_deterministic,
        progressbar=progressbar,
        prefix="model.",
    )
    log.info(
        "curvature: %s %s%s over %d params in %d blocks; mean eigenvalue %.3e",
        s["fisher_type"],
        s["kfac_approx"],
        " EK-FAC" if s["ekfac"] else "",
        curvature.layout.n_params,
        len(curvature.blocks),
        curvature.mean_eigenvalue(),
    )
    return curvature


# ----------------------------------------------------------------------------------------------------------------
# Stage entry
# ----------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint whose GGN is approximated")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--fisher-type", choices=FISHER_TYPES, help="overrides kfac.fisher_type")
    parser.add_argument("--kfac-approx", choices=KFAC_APPROX, help="overrides kfac.kfac_approx")
    parser.add_argument("--ekfac", action=argparse.BooleanOptionalAction, default=None, help="overrides kfac.ekfac")
    parser.add_argument("--out", required=True, help="curvature file (.pt)")


def run(args, config: dict) -> None:
    device = select_device(config["compute"])
    model, payload = load_family_model(args.model, config["model"], device)
    images = core_data.load_dataset(args.dataset)["train_images"]
    # the training examples' conditions (caption indices) of a conditional model; None for an unconditional one
    cond = core_data.load_conditions(args.dataset, None)["train"] if is_conditional(model) else None
    settings = settings_from(config, args)
    seed = config["seeds"]["gradients"]
    extra = checkpoint_identity(payload, config["model"])
    try:
        load_curvature(args.out, curvature_config(settings, config["diffusion"], seed, images, extra, cond))
        log.info("curvature: reusing %s (config matches)", args.out)
        return
    except ArtefactError:
        pass
    fit_curvature(model, images, settings, config["diffusion"], seed, device, extra, cond=cond).save(args.out)
    log.info("curvature: wrote %s", args.out)
