"""Engine of the `unlearning` scorer: attribution by unlearning, AbU / AbU+ ("Data Attribution for Text-to-Image
Models by Unlearning Synthesized Images", arXiv:2406.09408; scorers/unlearning.py, docs/methods.md).

For every query q and step size eta (the method's lambda):

    delta_q = eta * P^-1 g_q,   S[q, i] = L_i(theta + delta_q) - L_i(theta)

g_q: the gradient of the query's simple loss, the mean over `query_draws` seeded (t, eps) draws (conditioned on the
query's caption for a conditional model), w.r.t. the parameters of the method's subset only (ParamLayout);
P = N (F + damping): the diagonal empirical Fisher (`DiagonalStep`) or the fitted K-FAC / EK-FAC curvature restricted
to the subset (`CurvatureStep`). L_i: training image i's simple loss over `loss_draws` FIXED draws (seeded per image:
the same before and after the step, so the difference has no Monte Carlo noise of its own). The step is applied
through torch.func.functional_call (core.measurement.values): the model's own parameters never change, and the
parameters outside the subset (the latent family's frozen base, which are buffers) are those of the checkpoint.

Sign: to first order S[q, i] = eta g_i^T P^-1 g_q, the (preconditioned) alignment of the two loss gradients: the
training images whose loss rises when the query is unlearned supported it; positive = proponent, the convention of
every scorer here (predicted change of the query's loss when z_i is removed).

Cost per query and parameter subset: len(lambdas) x N x loss_draws forward rows, plus once per job N x loss_draws
(the losses at theta), per subset N per-example gradients (the diagonal Fisher) and, per query, query_draws backward
rows. `params` as a list sweeps the subsets beside the step sizes: each subset is one more pass of the above.
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch
from tqdm import tqdm

from workflow_scripts.core.common import ArtefactError, log, select_device
from workflow_scripts.core.contracts import QUERY_SETS
from workflow_scripts.core.curvature import (
    Curvature,
    ParamLayout,
    checkpoint_identity,
    curvature_config,
    curvature_param_names,
    is_conditional,
    load_curvature,
    random_draws,
    settings_from,
)
from workflow_scripts.core.data import load_conditions
from workflow_scripts.core.measurement import SimpleLossMeasurement, gradients, values
from workflow_scripts.families.ddpm import alphas_cumprod
from workflow_scripts.families.registry import load_family_model
from workflow_scripts.scorers.unlearning import CURVATURE_KEYS, PARAM_SUBSETS, method_options, param_subsets

# streams of seeds.gradients (core.curvature uses 41-44): the query gradients' draws (x 100 + query-set index), the
# diagonal Fisher's one draw per training image, the fixed loss draws of the training images
QUERY_STREAM, FISHER_STREAM, LOSS_STREAM = 51, 52, 53


def subset_layout(model, params: str) -> ParamLayout:
    """The parameters the step moves: those of curvature_param_names (Linear / Conv2d weights and biases; a latent
    model's: its LoRA adapters) whose name matches the subset `params` (scorers/unlearning.py PARAM_SUBSETS)."""
    if params not in PARAM_SUBSETS:
        raise ValueError(f"unlearning: params {params!r} is not one of {sorted(PARAM_SUBSETS)}")
    pattern = re.compile(PARAM_SUBSETS[params])
    names = [n for n in curvature_param_names(model) if pattern.search(n)]
    if not names:
        raise ValueError(
            f"unlearning: params {params!r} selects no parameter of this model (a {type(model).__name__}; "
            f"the pattern {PARAM_SUBSETS[params]!r} matches none of its Linear / Conv2d parameters)"
        )
    return ParamLayout.of(model, names)


def seeded_measurement(a_bar: torch.Tensor, k: int, seed: int, stream: int) -> SimpleLossMeasurement:
    """The simple loss over k (t, eps) draws per image, seeded per (seed, stream, image index)."""
    T = len(a_bar)
    return SimpleLossMeasurement(lambda n, shape, start: random_draws(n, int(k), shape, T, seed, stream, start), a_bar)


def diagonal_fisher(
    model, layout: ParamLayout, images: np.ndarray, measurement, batch_rows: int, device, cond=None
) -> torch.Tensor:
    """(P,) float64: the mean over the images of their squared per-example gradients (one draw each: measurement)."""
    g = gradients(model, layout, images, measurement, batch_rows, device, cond=cond)
    return g.double().pow(2).mean(0).cpu()


class DiagonalStep:
    """P^-1 g with P = N (F + damping * mean(F)), F the diagonal empirical Fisher (AbU)."""

    def __init__(self, fisher: torch.Tensor, n_train: int, damping: float):
        self.diagonal = n_train * (fisher.double() + float(damping) * float(fisher.double().mean()))
        if not bool((self.diagonal > 0).all()):
            raise ValueError(
                "unlearning: the diagonal Fisher has zero entries (parameters with no gradient); "
                "set the method's damping > 0"
            )

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        return g.double() / self.diagonal.to(g.device)


class CurvatureStep:
    """P^-1 g with P = N (G + damping * mean eigenvalue), G the fitted K-FAC / EK-FAC curvature (AbU+) restricted to
    the subset's parameters. G is block-diagonal (one block per layer), so when the subset is a union of blocks its
    restriction is preconditioning g padded with zeros: the other blocks' coordinates stay zero."""

    def __init__(self, curvature: Curvature, layout: ParamLayout, n_train: int, damping: float):
        missing = [n for n in layout.names if n not in curvature.layout.index]
        if missing:
            raise ArtefactError(f"unlearning: the curvature does not cover the parameters {missing[:3]}")
        chosen = set(layout.names)
        for block in getattr(curvature, "blocks", []):
            covered = {n for n in (block.weight, block.bias) if n is not None}
            if covered & chosen and not covered <= chosen:
                raise ValueError(
                    f"unlearning: the subset takes only part of the curvature block {block.module} "
                    f"({sorted(covered)}); separate_weight_and_bias or another params subset"
                )
        if not float(damping) > 0 and not bool((curvature.eigenvalues() > 0).all()):
            raise ValueError("unlearning: the curvature is singular; set the method's damping > 0")
        self.curvature, self.layout, self.n_train, self.damping = curvature, layout, int(n_train), float(damping)
        spans = [curvature.layout.slice(name) for name in layout.names]
        self.index = torch.cat([torch.arange(span.start, span.stop) for span in spans])  # the subset's coordinates

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(len(g), self.curvature.layout.n_params, dtype=torch.float64, device=g.device)
        full[:, self.index.to(g.device)] = g.double()
        return self.curvature.precondition(full, self.damping)[:, self.index.to(g.device)] / self.n_train


def shifted_parameters(model, layout: ParamLayout, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: parameter + its part of delta} of the layout's parameters (delta (P,) in the layout's order), in each
    parameter's dtype; every other parameter is left to the model (core.measurement.values)."""
    params = dict(model.named_parameters())
    return {
        name: params[name].detach() + delta[layout.slice(name)].reshape(params[name].shape).to(params[name].dtype)
        for name in layout.names
    }


def unlearning_scores(
    model,
    layout: ParamLayout,
    step,
    train_images: np.ndarray,
    query_images: dict[str, np.ndarray],
    query_measurements: dict,
    loss_measurement,
    etas: list[float],
    batch_rows: int,
    device="cpu",
    conditions: dict[str, np.ndarray] | None = None,
    base: torch.Tensor | None = None,
) -> list[tuple[float, dict[str, np.ndarray]]]:
    """[(eta, {query set: (n_query, n_train) float32})]: S[q, i] = L_i(theta + eta step(g_q)) - L_i(theta).

    step: g (n, P) -> P^-1 g (DiagonalStep, CurvatureStep); query_measurements: {query set: Measurement} of the query
    gradients; loss_measurement: the training images' fixed draws; conditions: {"train": (n_train,), query set:
    (n_query,)} caption indices of a conditional model (None: unconditional); base: the training losses at theta
    under loss_measurement when already computed (they do not depend on the subset or the step)."""
    conditions = conditions or {}
    cond_train = conditions.get("train")
    if base is None:
        base = values(model, train_images, loss_measurement, batch_rows, device, cond=cond_train)
    out = [({name: np.zeros((len(q), len(train_images))) for name, q in query_images.items()}) for _ in etas]
    for name, images in query_images.items():
        g = gradients(model, layout, images, query_measurements[name], batch_rows, device, cond=conditions.get(name))
        directions = step(g.to(device))
        for q in tqdm(range(len(images)), desc=f"unlearning {name} queries", mininterval=5):
            for j, eta in enumerate(etas):
                params = shifted_parameters(model, layout, float(eta) * directions[q])
                after = values(
                    model, train_images, loss_measurement, batch_rows, device, cond=cond_train, params=params
                )
                out[j][name][q] = (after - base).numpy()
    results = []
    for eta, matrices in zip(etas, out):
        if all(np.isfinite(v).all() for v in matrices.values()):
            results.append((float(eta), {k: v.astype(np.float32) for k, v in matrices.items()}))
        else:  # the step overshot (a loss overflowed): this eta is no candidate of the sweep
            log.warning("unlearning: step size %g gives non-finite losses; left out of the sweep", eta)
    if not results:
        raise ValueError(f"unlearning: every step size {list(etas)} gives non-finite losses; use a smaller lambda_grid")
    return results


def compute(method_cfg: dict, inputs, lambdas) -> list:
    """The unlearning scorer's computation (Scorer.compute): the final model (inputs.model_path), the training and
    query images, and for fisher: ekfac the curvature file of the method's variant (inputs.curvature_path)."""
    opts = method_options(method_cfg)
    config = getattr(inputs, "config", None)
    if not config or getattr(inputs, "model_path", None) is None:
        raise ArtefactError("unlearning needs the scorer inputs config and model_path (the final checkpoint)")
    if opts["fisher"] == "ekfac" and getattr(inputs, "curvature_path", None) is None:
        raise ArtefactError("unlearning with fisher: ekfac needs the scorer input curvature_path (rule curvature)")
    started = time.monotonic()
    device = select_device(config["compute"])
    model, payload = load_family_model(inputs.model_path, config["model"], device)
    model = model.to(device).eval()
    train, queries = inputs.train_images(), inputs.queries()
    conditions = load_conditions(inputs.dataset, inputs.samples) if is_conditional(model) else None
    subsets = param_subsets(opts["params"])
    layouts = {name: subset_layout(model, name) for name in subsets}  # every subset checked before any work
    a_bar, seed, batch = alphas_cumprod(config["diffusion"]), int(config["seeds"]["gradients"]), opts["batch_size"]
    cond_train = None if conditions is None else conditions["train"]
    curvature = None
    if opts["fisher"] == "ekfac":
        overrides = {k: method_cfg[k] for k in CURVATURE_KEYS if k in method_cfg}
        expected = curvature_config(
            settings_from({"kfac": {**config.get("kfac", {}), **overrides}}),
            config["diffusion"],
            seed,
            train,
            checkpoint_identity(payload, config["model"]),
            cond=cond_train,
        )
        curvature = load_curvature(inputs.curvature_path, expected)
    log.info(
        "unlearning (%s Fisher): %d train x %s queries, parameters %s, step sizes %s, %d query / %d loss draws",
        opts["fisher"],
        len(train),
        {k: len(v) for k, v in queries.items()},
        {name: layout.n_params for name, layout in layouts.items()},
        list(lambdas),
        opts["query_draws"],
        opts["loss_draws"],
    )
    query_measurements = {
        name: seeded_measurement(
            a_bar,
            opts["query_draws"],
            seed,
            QUERY_STREAM * 100 + (QUERY_SETS.index(name) if name in QUERY_SETS else list(queries).index(name)),
        )
        for name in queries
    }

    def step_for(layout: ParamLayout):
        if curvature is not None:
            return CurvatureStep(curvature, layout, len(train), opts["damping"])
        fisher_draw = seeded_measurement(a_bar, 1, seed, FISHER_STREAM)
        return DiagonalStep(
            diagonal_fisher(model, layout, train, fisher_draw, batch, device, cond_train), len(train), opts["damping"]
        )

    results = subset_sweep(
        model,
        layouts,
        step_for,
        train,
        queries,
        query_measurements,
        seeded_measurement(a_bar, opts["loss_draws"], seed, LOSS_STREAM),
        [float(eta) for eta in lambdas],
        batch,
        device,
        conditions,
    )
    log.info("unlearning: scores in %.1f s", time.monotonic() - started)
    # one subset configured: (eta, matrices) as every scorer; a list: the (eta, matrices, subset) candidates
    return [(eta, m) for eta, m, _ in results] if isinstance(opts["params"], str) else results


def subset_sweep(
    model,
    layouts: dict[str, ParamLayout],
    step_for,
    train_images: np.ndarray,
    query_images: dict[str, np.ndarray],
    query_measurements: dict,
    loss_measurement,
    etas: list[float],
    batch_rows: int,
    device="cpu",
    conditions: dict[str, np.ndarray] | None = None,
) -> list[tuple[float, dict[str, np.ndarray], str]]:
    """[(eta, {query set: scores}, subset)] for every parameter subset of `layouts` ({name: ParamLayout}) and step
    size, each subset's step from step_for(layout); the training losses at theta are computed once for all."""
    cond_train = (conditions or {}).get("train")
    base = values(model, train_images, loss_measurement, batch_rows, device, cond=cond_train)
    results = []
    for name, layout in layouts.items():
        scores = unlearning_scores(
            model,
            layout,
            step_for(layout),
            train_images,
            query_images,
            query_measurements,
            loss_measurement,
            etas,
            batch_rows,
            device,
            conditions,
            base,
        )
        results += [(eta, matrices, name) for eta, matrices in scores]
    return results
