"""Stage `measure`: ground-truth measurements of every query under one trained model.

Measurement `loss` (METHODS.md): the simple loss of the query averaged over fixed (t, eps) draws
(a uniform grid of n_timesteps t, n_noise eps each), the same draws for every model. The other targets of
measure.measurements (ELBO, per-timestep losses, trajectory -log p; workflow_scripts/likelihood.py) are
written into the same file: the loss under the query set's name ('generated', 'heldout'), every other
target as '<query set>__<target>' (likelihood.target_key), and the list of targets as 'targets'.
model.family vesde: the only target is the exact -ln p (nats), '<query set>__likelihood', and the file's
'measurement' entry names it as the primary target (what load_targets reads).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from . import data as data_stage
from .common import ArtefactError, load_npz, log, save_npz, select_device
from .diffusion import alphas_cumprod, load_family_model, measurement_draws, simple_loss

QUERY_SETS = ("generated", "heldout")  # also the stream index of each set's measurement noise


def load_queries(dataset_path, samples_path) -> dict[str, np.ndarray]:
    """The query images of every query set, keyed by set name."""
    return {"generated": load_npz(samples_path, ("images",))["images"],
            "heldout": data_stage.load_dataset(dataset_path)["heldout_images"]}


@torch.no_grad()
def measure_loss(model, images: np.ndarray, diffusion_cfg: dict, measure_cfg: dict, seed: int, stream: int,
                 device: torch.device, indices=None) -> np.ndarray:
    """Simple loss of each image, averaged over its fixed (t, eps) draws; float64 of shape (n_images,).

    `indices`: the images are these queries of their set (e.g. one generated query), measured with
    exactly the draws they get when the whole set is measured."""
    if indices is not None and len(indices) != len(images):
        raise ValueError(f"{len(indices)} query indices for {len(images)} images")
    a_bar = alphas_cumprod(diffusion_cfg).to(device)
    losses = np.zeros(len(images))
    batch = measure_cfg["batch_size"]
    query_index = range(len(images)) if indices is None else indices
    for q, image in enumerate(torch.from_numpy(images)):
        # one query's draws at a time (the same numbers: eps is seeded per query): all queries' eps at once would
        # be n_query x n_timesteps x n_noise images (CIFAR anchors, 1000 x 3000 x 3072 floats: 37 GB)
        t, eps = measurement_draws(len(images), images.shape[1:], measure_cfg["n_timesteps"], measure_cfg["n_noise"],
                                   diffusion_cfg["num_train_timesteps"], seed, stream, [query_index[q]])
        total = 0.0
        for start in range(0, len(t), batch):
            tb = t[start : start + batch].to(device)
            x0 = image.to(device).expand(len(tb), *image.shape)
            total += simple_loss(model, x0, tb, eps[0, start : start + batch].to(device), a_bar).double().sum().item()
        losses[q] = total / len(t)
    return losses


def load_targets(paths: list[str], n_subsets: int, n_seeds: int) -> dict[str, np.ndarray]:
    """Stack per-model measurements into {query set: array (n_subsets, n_seeds, n_queries)}: the loss, or the
    measurement a file names in its `measurement` entry (a vesde model's file: likelihood)."""
    from .likelihood import target_key

    if len(paths) != n_subsets * n_seeds:
        raise ArtefactError(f"expected {n_subsets * n_seeds} measurement files, got {len(paths)}")
    out = {name: [] for name in QUERY_SETS}
    for k, path in enumerate(paths):
        arrays = load_npz(path, ("subset", "replicate"))
        target = str(arrays.get("measurement", "loss"))
        keys = [target_key(name, target) for name in QUERY_SETS]
        if any(key not in arrays for key in keys):
            raise ArtefactError(f"{path}: lacks arrays {[key for key in keys if key not in arrays]}")
        if (int(arrays["subset"]), int(arrays["replicate"])) != divmod(k, n_seeds):
            raise ArtefactError(f"{path}: holds subset {int(arrays['subset'])} seed {int(arrays['replicate'])}, "
                                f"expected subset {k // n_seeds} seed {k % n_seeds}")
        for name, key in zip(QUERY_SETS, keys):
            out[name].append(arrays[key])
    return {name: np.stack(v).reshape(n_subsets, n_seeds, -1) for name, v in out.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--subset", type=int, default=-1)
    parser.add_argument("--replicate", type=int, default=0)
    parser.add_argument("--out", required=True)


def run(args, config: dict) -> None:
    from .likelihood import measure_queries, target_names

    device = select_device(config["compute"])
    model, _ = load_family_model(args.model, config["model"], device)
    queries = load_queries(args.dataset, args.samples)
    targets = target_names(config)
    # the trajectory target needs the generated queries' stored sampling trajectories
    samples = load_npz(args.samples, ("trajectories", "timesteps")) if "trajectory" in targets else None
    results = measure_queries(model, queries, config, device, samples)
    # the primary target of the LDS tables: the loss, or a vesde model's exact -ln p
    primary = {"measurement": np.array("likelihood")} if config["model"].get("family", "ddpm") == "vesde" else {}
    save_npz(args.out, subset=np.array(args.subset), replicate=np.array(args.replicate), targets=np.array(targets),
             **primary, **results)
    log.info("measure %s: means %s", args.model, {k: round(float(v.mean()), 5) for k, v in results.items()})
