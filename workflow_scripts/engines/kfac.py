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

from dataclasses import dataclass

import numpy as np
import torch

from workflow_scripts.core.common import ArtefactError, load_npz, log, select_device
from workflow_scripts.core.contracts import QUERY_SETS
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
    """Scores from given query gradients; training gradients are streamed (one pass for all lambdas).
    train_cond: the training examples' conditions for a conditional model (None: unconditional)."""
    n_train = len(train_images)
    pre = preconditioned_queries(curvature, {k: v.to(device) for k, v in query_grads.items()}, lambdas, quantization)
    scores = [{name: np.zeros((len(g), n_train), dtype=np.float64) for name, g in query_grads.items()} for _ in lambdas]
    train_gradients = iter_gradients(
        model, curvature.layout, train_images, train_measurement, batch_rows, device, cond=train_cond
    )
    for start, g in train_gradients:
        for per_lambda, out in zip(pre, scores):
            for name, q in per_lambda.items():
                out[name][:, start : start + len(g)] = q.matmul_t(g).double().cpu().numpy() / n_train
    return [(float(lam), {k: v.astype(np.float32) for k, v in out.items()}) for lam, out in zip(lambdas, scores)]


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
    """[(relative lambda, {query set: (n_query, n_train) float32})] in the format of scores.py's sweep.

    cfg: the configuration with sections kfac (gradient_draws, query_draws, batch_size, quantization), diffusion,
    seeds (gradients; measure if query_draws == 'measure') and measure (if query_draws == 'measure').
    query_measurements: {query set: Measurement} to override the loss measurement (e.g. the ELBO's).
    conditions: a conditional model's per-example conditions, {"train": (n_train,), query set: (n_query,)}
    (core.data.load_conditions); None for an unconditional model.
    """
    conditions = conditions or {}
    k_cfg = {**SCORE_DEFAULTS, **cfg.get("kfac", {})}
    model = model.to(device).eval()
    check_layout(model, curvature)
    if train_measurement is None:
        train_measurement = loss_measurement(cfg, "train")
    measurements = {}
    for i, name in enumerate(query_images):
        stream = QUERY_SETS.index(name) if name in QUERY_SETS else i
        measurements[name] = (query_measurements or {}).get(name) or loss_measurement(cfg, "query", stream_index=stream)
    log.info(
        "kfac scores: %d train x %s queries, %d params, lambdas %s, %s",
        len(train_images),
        {k: len(v) for k, v in query_images.items()},
        curvature.layout.n_params,
        list(lambdas),
        k_cfg["quantization"],
    )
    groups = query_groups({k: len(v) for k, v in query_images.items()}, k_cfg.get("query_batch"))
    out = [
        {name: np.zeros((len(images), len(train_images)), dtype=np.float32) for name, images in query_images.items()}
        for _ in lambdas
    ]
    for number, group in enumerate(groups, 1):
        if len(groups) > 1:
            log.info("kfac scores: query group %d of %d %s", number, len(groups), group)
        query_grads = {
            name: gradients(
                model,
                curvature.layout,
                query_images[name][rows],
                measurements[name],
                k_cfg["batch_size"],
                device,
                offset=rows.start,
                cond=None if conditions.get(name) is None else conditions[name][rows],
            )
            for name, rows in group.items()
        }
        part = influence_scores(
            model,
            curvature,
            train_images,
            query_grads,
            train_measurement,
            lambdas,
            k_cfg["batch_size"],
            device,
            k_cfg["quantization"],
            train_cond=conditions.get("train"),
        )
        for (_, matrices), full in zip(part, out):
            for name, rows in group.items():
                full[name][rows] = matrices[name]
    return [(float(lam), matrices) for lam, matrices in zip(lambdas, out)]


def query_groups(sizes: dict[str, int], query_batch: int | None) -> list[dict[str, slice]]:
    """The queries whose gradients are held (and preconditioned, per lambda) at once; each group costs one pass of
    training gradients. kfac.query_batch absent: one group of every query (one pass). Otherwise groups of at most
    query_batch queries of one set: memory ~ query_batch x n_params x (4 + 8 + len(lambdas)) bytes instead of
    n_query x ... (CIFAR, 38M parameters: 1.6 GB per query and 7 lambdas), at ceil(n_query / query_batch) passes."""
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
    """The kfac scorer's computation. method_cfg may override kfac settings (fisher_type, kfac_approx, ekfac,
    quantization) and set damping: absolute (the lambdas are then absolute dampings of G instead of multiples of its
    mean eigenvalue); `lambdas` is the grid KFAC.lambdas resolved;
    `inputs` must provide config (the full configuration), model_path and curvature_path."""
    missing = [a for a in ("config", "model_path", "curvature_path") if getattr(inputs, a, None) is None]
    if missing:
        raise ArtefactError(f"K-FAC influence needs scorer inputs {missing} (model checkpoint, curvature file, config)")
    config = inputs.config
    overrides = {k: method_cfg[k] for k in METHOD_KEYS if k in method_cfg}
    curvature_settings = settings_from({"kfac": {**config.get("kfac", {}), **overrides}})
    device = select_device(config["compute"])
    model, payload = load_family_model(inputs.model_path, config["model"], device)
    train = inputs.train_images()
    # a conditional model's per-example conditions (caption indices) of every split; None: unconditional
    conditions = load_conditions(inputs.dataset, inputs.samples) if is_conditional(model) else None
    expected = curvature_config(
        curvature_settings,
        config["diffusion"],
        config["seeds"]["gradients"],
        train,
        checkpoint_identity(payload, config["model"]),
        cond=None if conditions is None else conditions["train"],
    )
    curvature = load_curvature(inputs.curvature_path, expected)
    cfg = {
        **config,
        "kfac": {**config.get("kfac", {}), **{k: method_cfg[k] for k in ("quantization",) if k in method_cfg}},
    }
    lambdas = [float(lam) for lam in lambdas]  # the scorer's grid (scorers/kfac.py: KFAC.lambdas)
    relative = lambdas
    if method_cfg.get("damping", "relative") == "absolute":
        mean = curvature.mean_eigenvalue()
        relative = [lam / mean for lam in lambdas]
        log.info("kfac: absolute damping %s = %s x the mean eigenvalue %.3e", lambdas, relative, mean)
    queries = inputs.queries()
    measurements = query_measurements(method_cfg, config, list(queries), getattr(inputs, "samples", None))
    log.info(
        "kfac: query gradients of %s for %s (else the loss)", query_target(method_cfg), sorted(measurements) or "none"
    )
    results = kfac_scores(model, curvature, train, queries, cfg, relative, device, measurements, conditions=conditions)
    return [(lam, matrices) for lam, (_, matrices) in zip(lambdas, results)]
