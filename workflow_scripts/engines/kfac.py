"""Engine of the `kfac` scorer: K-FAC influence (Influence Functions for Scalable Data Attribution in Diffusion Models, arXiv:2410.13850;
docs/methods.md "K-FAC influence"):

    S[q, i] = (1/N) grad m(x_q)^T (G + lambda I)^-1 grad l(z_i)

G: the fitted K-FAC / EK-FAC of the training-loss GGN (workflow_scripts.core.curvature), lambda relative to its
mean eigenvalue. Sign: removing z_i changes the optimum by about +(1/N) H^-1 grad l(z_i) (the mean loss
loses the term l(z_i)/N), so S is the predicted change of m_q on REMOVAL; for the loss measurement,
positive = z_i helped (docs/methods.md convention, same sign as TRAK here).

Procedure (Grosse et al. 2023 query batching; the paper's Appendix C compression):
1. query gradients grad m(x_q) for every query set (per-example, torch.func vmap over images, mean over
   the measurement's draws), rotated into the K-FAC eigenbasis ONCE;
2. per lambda: divide by (eigenvalues + lambda), rotate back (float64), quantise per parameter tensor and
   query to 8 bits (affine min/max; or keep float32);
3. training gradients grad l(z_i) (K seeded draws per example, no projection) streamed in batches and
   dotted with every lambda's preconditioned queries: a gradient batch is computed once for all lambdas
   and never held for the whole training set.
The kfac methods of a configuration differ only in steps 1-2 (curvature variant, quantisation, damping grid, query
measurement), so one job scores them all (compute_family -> family_scores): steps 1-2 for every method, step 3 ONCE
(rule scores_kfac_family); a method alone (compute, kfac_scores) is the same code with one method.
Parameters: those of curvature (Linear / Conv2d layers; norm layers excluded) -- the others stay fixed.

Measurements are pluggable (`Measurement`: its draws plus a per-image objective evaluated under vmap);
`SimpleLossMeasurement` is the loss measurement. A method's `query_measurement` (default loss) selects the
query side m: loss, elbo, timestep_loss_t<t> or trajectory (workflow_scripts/families/likelihood.py), with exactly the
draws of that measured target (likelihood.target_measurement); the training side stays grad l(z_i) and G the
training-loss GGN, so `query_measurement: loss` evaluated against the ELBO target is the K-FAC paper's
"measurement substitution". Held-out queries have no trajectory: a trajectory method scores them with the
loss gradient and says so (notes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from workflow_scripts.core.common import ArtefactError, load_npz, log, select_device
from workflow_scripts.core.contracts import ALL_QUERY_SETS, query_stream
from workflow_scripts.core.curvature import (
    QUERY_GRADIENT_STREAM,
    TRAIN_GRADIENT_STREAM,
    Curvature,
    ParamLayout,
    checkpoint_identity,
    curvature_config,
    is_conditional,
    load_curvature,
    random_draws,
    settings_from,
)
from workflow_scripts.core.data import load_conditions
from workflow_scripts.core.measurement import Measurement, SimpleLossMeasurement, gradients, iter_gradients
from workflow_scripts.families.ddpm import alphas_cumprod, measurement_draws
from workflow_scripts.families.likelihood import target_measurement
from workflow_scripts.families.registry import load_family_model
from workflow_scripts.scorers.kfac import METHOD_KEYS, QUANTIZATIONS, SCORE_DEFAULTS, query_target


def loss_measurement(cfg: dict, kind: str, stream_index: int = 0) -> SimpleLossMeasurement:
    """The loss measurement's draws. kind 'train': kfac.gradient_draws random draws per example (seeds.gradients);
    'query': kfac.query_draws = 'measure' (exactly the ground-truth draws of the measure stage: seeds.measure,
    measure.n_timesteps x measure.n_noise, stream = query-set index) or an int (random draws per query)."""
    k_cfg = {**SCORE_DEFAULTS, **cfg.get("kfac", {})}
    T = cfg["diffusion"]["num_train_timesteps"]
    a_bar = alphas_cumprod(cfg["diffusion"])
    seed = cfg["seeds"]["gradients"]
    if kind == "train":
        k = int(k_cfg["gradient_draws"])
        return SimpleLossMeasurement(
            lambda n, shape, start: random_draws(n, k, shape, T, seed, TRAIN_GRADIENT_STREAM, start), a_bar
        )
    if kind != "query":
        raise ValueError(f"unknown measurement kind {kind!r}")
    if k_cfg["query_draws"] == "measure":
        m = cfg["measure"]

        def draw_fn(n, shape, start):
            # measurement_draws seeds eps per (stream, query index): take all queries up to start+n, keep ours
            t, eps = measurement_draws(
                start + n, shape, m["n_timesteps"], m["n_noise"], T, cfg["seeds"]["measure"], stream_index
            )
            return t.unsqueeze(0).expand(n, -1).clone(), eps[start:]

        return SimpleLossMeasurement(draw_fn, a_bar)
    k = int(k_cfg["query_draws"])
    return SimpleLossMeasurement(
        lambda n, shape, start: random_draws(n, k, shape, T, seed, QUERY_GRADIENT_STREAM * 100 + stream_index, start),
        a_bar,
    )


# ----------------------------------------------------------------------------------------------------------------
# Quantisation of preconditioned query gradients
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class QuantizedRows:
    """Rows of flat vectors, 8-bit affine per (row, parameter tensor): value ~ low + scale * code, code 0..255."""

    codes: torch.Tensor  # (n, P) uint8
    low: torch.Tensor  # (n, n_tensors) float32
    scale: torch.Tensor  # (n, n_tensors) float32
    offsets: list[int]

    def __len__(self) -> int:
        return self.codes.shape[0]

    def dequantize(self) -> torch.Tensor:
        out = torch.empty(self.codes.shape, dtype=torch.float32, device=self.codes.device)
        for j, (a, b) in enumerate(zip(self.offsets[:-1], self.offsets[1:])):
            out[:, a:b] = self.codes[:, a:b].float() * self.scale[:, j : j + 1] + self.low[:, j : j + 1]
        return out

    def matmul_t(self, g: torch.Tensor) -> torch.Tensor:
        """self @ g.T for float32 g (B, P), without materialising the dequantised rows: (n, B)."""
        out = torch.zeros(self.codes.shape[0], g.shape[0], dtype=torch.float32, device=g.device)
        for j, (a, b) in enumerate(zip(self.offsets[:-1], self.offsets[1:])):
            gj = g[:, a:b]
            out += self.scale[:, j : j + 1] * (self.codes[:, a:b].float() @ gj.T) + self.low[:, j : j + 1] * gj.sum(1)
        return out


def quantize_per_tensor(rows: torch.Tensor, layout: ParamLayout) -> QuantizedRows:
    """Affine min/max 8-bit quantisation of each parameter tensor of each row; max error (max - min) / 510."""
    n, offsets = rows.shape[0], layout.offsets
    codes = torch.empty(rows.shape, dtype=torch.uint8, device=rows.device)
    low = torch.empty(n, len(offsets) - 1, dtype=torch.float32, device=rows.device)
    scale = torch.empty_like(low)
    for j, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        part = rows[:, a:b].double()
        lo, hi = part.min(1).values, part.max(1).values
        sc = (hi - lo) / 255.0
        safe = torch.where(sc > 0, sc, torch.ones_like(sc))
        codes[:, a:b] = ((part - lo[:, None]) / safe[:, None]).round().clamp(0, 255).to(torch.uint8)
        low[:, j], scale[:, j] = lo.float(), sc.float()
    return QuantizedRows(codes, low, scale, list(offsets))


class FloatRows:
    def __init__(self, rows: torch.Tensor):
        self.rows = rows.float()

    def __len__(self) -> int:
        return self.rows.shape[0]

    def dequantize(self):
        return self.rows

    def matmul_t(self, g):
        return self.rows @ g.T


def compress(rows: torch.Tensor, layout: ParamLayout, quantization: str):
    if quantization == "int8":
        return quantize_per_tensor(rows, layout)
    if quantization == "float32":
        return FloatRows(rows)
    raise ValueError(f"quantization {quantization!r} is not one of {QUANTIZATIONS}")


# ----------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------
def check_layout(model, curvature: Curvature) -> None:
    params = dict(model.named_parameters())
    for name, shape in zip(curvature.layout.names, curvature.layout.shapes):
        if name not in params or tuple(params[name].shape) != tuple(shape):
            raise ArtefactError(f"curvature parameter {name} {shape} does not exist in the model with this shape")


def preconditioned_queries(
    curvature: Curvature, query_grads: dict[str, torch.Tensor], lambdas: list[float], quantization: str
) -> list[dict]:
    """For every lambda: {query set: compressed (G + lambda I)^-1 grad m}; one rotation into the eigenbasis."""
    rotated = {name: curvature.to_eigenbasis(g.double()) for name, g in query_grads.items()}
    eig = curvature.eigenvalues()
    out = []
    for lam in lambdas:
        damping = curvature.absolute_damping(lam)
        if not damping > 0 and not bool((eig > 0).all()):
            raise ValueError(f"lambda {lam}: the curvature is singular, use a positive damping")
        out.append(
            {
                name: compress(
                    curvature.from_eigenbasis(r / (eig.to(r.device) + damping)), curvature.layout, quantization
                )
                for name, r in rotated.items()
            }
        )
    return out


def influence_scores(
    model,
    curvature: Curvature,
    train_images: np.ndarray,
    query_grads: dict[str, torch.Tensor],
    train_measurement: Measurement,
    lambdas: list[float],
    batch_rows: int,
    device,
    quantization: str = "int8",
    train_cond: np.ndarray | None = None,
) -> list[tuple[float, dict[str, np.ndarray]]]:
    """One method's scores from given query gradients; training gradients are streamed (one pass for all lambdas).
    train_cond: the training examples' conditions for a conditional model (None: unconditional)."""
    pre = preconditioned_queries(curvature, {k: v.to(device) for k, v in query_grads.items()}, lambdas, quantization)
    (scores,) = score_pass(
        model, curvature.layout, train_images, train_measurement, [pre], batch_rows, device, train_cond
    )
    return [(float(lam), matrices) for lam, matrices in zip(lambdas, scores)]


def score_pass(
    model,
    layout: ParamLayout,
    train_images: np.ndarray,
    train_measurement: Measurement,
    preconditioned: list[list[dict]],
    batch_rows: int,
    device,
    train_cond: np.ndarray | None = None,
) -> list[list[dict[str, np.ndarray]]]:
    """ONE pass of training gradients for many preconditioned query sides: for each entry of `preconditioned`
    (a method: per lambda {query set: compressed rows}), per lambda {query set: (n_rows, n_train) float32}.
    A gradient batch is computed once and dotted with every method's every lambda, never held for the whole set."""
    n_train = len(train_images)
    scores = [
        [{name: np.zeros((len(q), n_train)) for name, q in per_lambda.items()} for per_lambda in side]
        for side in preconditioned
    ]
    for start, g in iter_gradients(model, layout, train_images, train_measurement, batch_rows, device, cond=train_cond):
        for side, side_scores in zip(preconditioned, scores):
            for per_lambda, out in zip(side, side_scores):
                for name, q in per_lambda.items():
                    out[name][:, start : start + len(g)] = q.matmul_t(g).double().cpu().numpy() / n_train
    return [[{k: v.astype(np.float32) for k, v in out.items()} for out in side_scores] for side_scores in scores]


@dataclass
class QuerySide:
    """What one K-FAC method does on the query side before its queries meet the (shared) training gradients: its
    curvature, its lambdas (relative to that curvature's mean eigenvalue), its quantisation and, per query set, the
    measured target of its query gradients (a set left out: the loss)."""

    curvature: Curvature
    lambdas: list[float]
    quantization: str = "int8"
    targets: dict[str, str] = field(default_factory=dict)

    def target(self, query_set: str) -> str:
        return self.targets.get(query_set, "loss")


def family_scores(
    model,
    train_images: np.ndarray,
    query_images: dict[str, np.ndarray],
    cfg: dict,
    sides: dict[str, QuerySide],
    device="cpu",
    measurements: dict[str, dict[str, Measurement]] | None = None,
    train_measurement: Measurement | None = None,
    conditions: dict[str, np.ndarray | None] | None = None,
) -> dict[str, list[tuple[float, dict[str, np.ndarray]]]]:
    """{method: [(relative lambda, {query set: (n_query, n_train) float32})]} of several K-FAC methods that differ
    only on the query side (QuerySide), from ONE pass of training gradients per query group (query_groups).

    Per group: the query gradients of every (query set, target) some method needs, computed once; every method's
    preconditioned, quantised queries of every lambda (its own curvature); then the training gradients streamed once
    and dotted with all of them. A method's scores are exactly those it gets alone (`kfac_scores`): the same
    operations on the same rows. Every method's curvature must cover the same parameters (one training gradient).

    cfg: as kfac_scores (its kfac.quantization is not read: each side has its own). measurements: {target: {query
    set: Measurement}} of the targets other than the loss that the sides name (the loss: loss_measurement).
    """
    conditions, measurements = conditions or {}, measurements or {}
    if not sides:
        raise ValueError("family_scores: no K-FAC method to score")
    k_cfg = {**SCORE_DEFAULTS, **cfg.get("kfac", {})}
    model = model.to(device).eval()
    (first, layout), *_ = ((m, s.curvature.layout) for m, s in sides.items())
    for method, side in sides.items():
        check_layout(model, side.curvature)
        if (side.curvature.layout.names, side.curvature.layout.shapes) != (layout.names, layout.shapes):
            raise ArtefactError(
                f"kfac method {method}: its curvature covers other parameters than {first}'s; one pass of training "
                "gradients needs the same parameters for every method"
            )
    if train_measurement is None:
        train_measurement = loss_measurement(cfg, "train")

    def measurement(name: str, target: str) -> Measurement:
        if target == "loss":
            stream = query_stream(name) if name in ALL_QUERY_SETS else list(query_images).index(name)
            return loss_measurement(cfg, "query", stream_index=stream)
        if name not in measurements.get(target, {}):
            raise ValueError(f"no {target} measurement of the {name} queries (family_scores: measurements)")
        return measurements[target][name]

    # every (query set, target) some method needs: its query gradients are computed once per group
    needed = {(name, side.target(name)): None for side in sides.values() for name in query_images}
    needed = {key: measurement(*key) for key in needed}
    log.info(
        "kfac scores: %d train x %s queries, %d params, methods %s, query gradients of %s",
        len(train_images),
        {k: len(v) for k, v in query_images.items()},
        layout.n_params,
        {m: (s.lambdas, s.quantization) for m, s in sides.items()},
        sorted(needed),
    )
    groups = query_groups({k: len(v) for k, v in query_images.items()}, k_cfg.get("query_batch"))
    out = {
        method: [
            {
                name: np.zeros((len(images), len(train_images)), dtype=np.float32)
                for name, images in query_images.items()
            }
            for _ in side.lambdas
        ]
        for method, side in sides.items()
    }
    for number, group in enumerate(groups, 1):
        if len(groups) > 1:
            log.info("kfac scores: query group %d of %d %s", number, len(groups), group)
        grads = {
            (name, target): gradients(
                model,
                layout,
                query_images[name][group[name]],
                m,
                k_cfg["batch_size"],
                device,
                offset=group[name].start,
                cond=None if conditions.get(name) is None else conditions[name][group[name]],
            )
            for (name, target), m in needed.items()
            if name in group
        }
        pre = [
            preconditioned_queries(
                side.curvature,
                {name: grads[name, side.target(name)] for name in group},
                side.lambdas,
                side.quantization,
            )
            for side in sides.values()
        ]
        del grads  # only the preconditioned queries are held during the pass
        part = score_pass(
            model, layout, train_images, train_measurement, pre, k_cfg["batch_size"], device, conditions.get("train")
        )
        for method, per_lambda in zip(sides, part):
            for matrices, full in zip(per_lambda, out[method]):
                for name, rows in group.items():
                    full[name][rows] = matrices[name]
    return {
        method: [(float(lam), matrices) for lam, matrices in zip(side.lambdas, out[method])]
        for method, side in sides.items()
    }


def kfac_scores(
    model,
    curvature: Curvature,
    train_images: np.ndarray,
    query_images: dict[str, np.ndarray],
    cfg: dict,
    lambdas: list[float],
    device="cpu",
    query_measurements: dict[str, Measurement] | None = None,
    train_measurement: Measurement | None = None,
    conditions: dict[str, np.ndarray | None] | None = None,
) -> list[tuple[float, dict[str, np.ndarray]]]:
    """[(relative lambda, {query set: (n_query, n_train) float32})] of one method, in the format of scores.py's sweep
    (family_scores with one method).

    cfg: the configuration with sections kfac (gradient_draws, query_draws, batch_size, quantization), diffusion,
    seeds (gradients; measure if query_draws == 'measure') and measure (if query_draws == 'measure').
    query_measurements: {query set: Measurement} to override the loss measurement (e.g. the ELBO's).
    conditions: a conditional model's per-example conditions, {"train": (n_train,), query set: (n_query,)}
    (core.data.load_conditions); None for an unconditional model.
    """
    quantization = {**SCORE_DEFAULTS, **cfg.get("kfac", {})}["quantization"]
    given = dict(query_measurements or {})
    side = QuerySide(curvature, list(lambdas), quantization, {name: "given" for name in given})
    return family_scores(
        model,
        train_images,
        query_images,
        cfg,
        {"method": side},
        device,
        {"given": given},
        train_measurement,
        conditions,
    )["method"]


def query_groups(sizes: dict[str, int], query_batch: int | None) -> list[dict[str, slice]]:
    """The queries whose gradients are held (and preconditioned, per method and lambda) at once; each group costs one
    pass of training gradients, shared by every method of the pass (family_scores). kfac.query_batch absent: one group
    of every query (one pass). Otherwise groups of at most query_batch queries of one set, at
    ceil(n_query / query_batch) passes; memory ~ query_batch x n_params x (4 M + 24 + sum_m L_m b_m) bytes: 4 per
    float32 query gradient of each of the M measurements the methods need, 24 for the float64 temporaries of one
    method's preconditioning, and each method's L_m preconditioned lambdas at b_m = 1 (int8) or 4 (float32) bytes.
    One int8 method with 7 lambdas: 35 bytes per parameter and query (CIFAR, 38M parameters: 1.3 GB per query);
    the params.yaml ablation (9 methods, M = 3): 114 (4.3 GB per query at CIFAR scale)."""
    if query_batch is None:
        return [{name: slice(0, n) for name, n in sizes.items()}]
    return [
        {name: slice(start, min(start + query_batch, n))}
        for name, n in sizes.items()
        for start in range(0, n, query_batch)
    ]


def query_measurements(method_cfg: dict, config: dict, query_sets, samples_path: str | None) -> dict[str, Measurement]:
    """{query set: Measurement} of the method's query_measurement; sets without one (and every set for 'loss')
    are left out, i.e. get kfac_scores' loss measurement."""
    target = query_target(method_cfg)
    if target == "loss":
        return {}
    samples = None
    if target == "trajectory":
        if samples_path is None:
            raise ArtefactError("query_measurement trajectory needs the samples file (scorer input `samples`)")
        samples = load_npz(samples_path, ("trajectories", "timesteps"))
    out = {name: target_measurement(config, target, name, samples) for name in query_sets}
    return {name: m for name, m in out.items() if m is not None}


def compute(method_cfg: dict, inputs, lambdas) -> list:
    """One kfac method's computation: compute_family with that method alone."""
    return compute_family({"method": method_cfg}, {"method": inputs}, {"method": lambdas})["method"]


def compute_family(methods: dict[str, dict], inputs: dict, lambdas: dict[str, list]) -> dict[str, list]:
    """The kfac scorer's computation for several methods at once (Scorer.compute_family): {method: results}, each
    exactly what the method gets alone, from one pass of training gradients (family_scores).

    A method may override kfac settings (fisher_type, kfac_approx, ekfac, quantization), set damping: absolute (its
    lambdas are then absolute dampings of G instead of multiples of its mean eigenvalue) and query_measurement;
    lambdas[method] is the grid KFAC.lambdas resolved. inputs[method] must provide config (the full configuration),
    model_path and curvature_path (its variant's file); the model, configuration and data are those of the first
    method's inputs and must be every method's."""
    for method, given in inputs.items():
        missing = [a for a in ("config", "model_path", "curvature_path") if getattr(given, a, None) is None]
        if missing:
            raise ArtefactError(
                f"K-FAC influence needs scorer inputs {missing} (model checkpoint, curvature file, config); "
                f"method {method} has none"
            )
    first = next(iter(inputs.values()))
    for method, given in inputs.items():
        if given.model_path != first.model_path or given.config != first.config:
            raise ArtefactError(f"kfac method {method}: another model or configuration than the other methods'")
    config = first.config
    device = select_device(config["compute"])
    model, payload = load_family_model(first.model_path, config["model"], device)
    train = first.train_images()
    # a conditional model's per-example conditions (caption indices) of every split; None: unconditional
    conditions = load_conditions(first.dataset, first.samples, first.extra) if is_conditional(model) else None
    queries = first.queries()
    curvatures: dict[tuple, Curvature] = {}  # methods of one variant share its file (read once)
    measurements: dict[str, dict[str, Measurement]] = {}  # {target: {query set: Measurement}}, targets but the loss
    sides = {}
    for method, method_cfg in methods.items():
        overrides = {k: method_cfg[k] for k in METHOD_KEYS if k in method_cfg}
        expected = curvature_config(
            settings_from({"kfac": {**config.get("kfac", {}), **overrides}}),
            config["diffusion"],
            config["seeds"]["gradients"],
            train,
            checkpoint_identity(payload, config["model"]),
            cond=None if conditions is None else conditions["train"],
        )
        key = (str(inputs[method].curvature_path), repr(sorted(expected["kfac"].items())))
        if key not in curvatures:
            curvatures[key] = load_curvature(inputs[method].curvature_path, expected)
        curvature = curvatures[key]
        relative = [float(lam) for lam in lambdas[method]]  # the scorer's grid (scorers/kfac.py: KFAC.lambdas)
        if method_cfg.get("damping", "relative") == "absolute":
            mean = curvature.mean_eigenvalue()
            relative = [lam / mean for lam in relative]
            log.info(
                "kfac %s: absolute damping %s = %s x the mean eigenvalue %.3e", method, lambdas[method], relative, mean
            )
        target = query_target(method_cfg)
        if target != "loss" and target not in measurements:
            measurements[target] = query_measurements(
                method_cfg, config, list(queries), getattr(first, "samples", None)
            )
        targets = {name: target for name in measurements.get(target, {})}
        log.info("kfac %s: query gradients of %s for %s (else the loss)", method, target, sorted(targets) or "none")
        quantization = method_cfg.get("quantization", {**SCORE_DEFAULTS, **config.get("kfac", {})}["quantization"])
        sides[method] = QuerySide(curvature, relative, quantization, targets)
    results = family_scores(model, train, queries, config, sides, device, measurements, conditions=conditions)
    return {
        method: [(float(lam), matrices) for lam, (_, matrices) in zip(lambdas[method], results[method])]
        for method in methods
    }
