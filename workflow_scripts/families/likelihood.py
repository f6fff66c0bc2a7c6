"""Likelihood-type measurements of the DDPM family: ELBO, per-timestep loss, trajectory log-prob.

Every measurement is a LOSS in nats (higher = worse), like the `loss` measurement, so the score convention
of docs/methods.md (S[q, i] = change of m_q when z_i is removed; positive = z_i helped) holds unchanged:

- `elbo`: the negative ELBO of Ho et al. (2020) eq. 5, an upper bound on -log p(x0) of the DISCRETE image,
- `timestep_loss`: the simple loss ||eps - eps_theta(x_t, t)||^2 / D at one chosen timestep,
- `trajectory`: -log p_theta of a generated query's stored sampling trajectory.

Each is a `Measurement` of `core/measurement.py` (draws() + a per-image objective() evaluated under torch.func.vmap,
so K-FAC -- and any other gradient scorer -- gets query gradients of exactly the measured quantity) and has a
batch function (`measure_elbo`, `measure_timestep_losses`, `measure_trajectory_nll`) for the ground truth on
retrained models. Both use the same objective; `evaluate` runs it under vmap over images without gradients.

Indexing: diffusers' timesteps i = 0..T-1 are Ho's t = i + 1. beta_i linear, alpha_i = 1 - beta_i,
a_bar_i = prod_{s<=i} alpha_s, a_bar_{-1} = 1.

ELBO (Ho et al. eq. 5), "small" (posterior) variance sigma_i^2 = beta_i (1 - a_bar_{i-1}) / (1 - a_bar_i):

    -ELBO(x0) = L_T + sum_{i=1}^{T-1} w_i E_eps ||eps - eps_theta(x_i, i)||^2 + L_0        (nats)
    w_i = beta_i^2 / (2 sigma_i^2 alpha_i (1 - a_bar_i))   ( = beta_i / (2 alpha_i (1 - a_bar_{i-1})) )
    L_T = KL(q(x_{T-1} | x0) || N(0, I)) = 1/2 sum_d [a_bar x0_d^2 + (1 - a_bar) - 1 - ln(1 - a_bar)],  a_bar = a_bar_{T-1}
    L_0 = -E_eps ln p_theta(x0 | x_0-noisy): discretised Gaussian decoder on the data's L levels

The KL terms are Ho's L_{t-1} for t >= 2: both Gaussians have variance sigma_i^2, so each KL is
||mu_tilde - mu_theta||^2 / (2 sigma_i^2) = w_i ||eps - eps_theta||^2 exactly (no clipping of the x0 prediction;
sum over the D pixels, not the mean). The decoder's variance: the small variance of Ho's t = 1 is 0
(a_bar_{-1} = 1), so, as in Ho et al.'s reference code (`posterior_log_variance_clipped`), the decoder uses
sigma_1^2 (the value at index 1, std 0.0074 for the default schedule). Its mean is mu_theta(x_0-noisy, 0) =
(x - sqrt(beta_0) eps_theta) / sqrt(alpha_0). Decoder bins: the interval [x - h, x + h], h = 1 / (L - 1) (half
the level spacing 2 / (L - 1) of data scaled to [-1, 1]), open to -inf when x < -1 + h and to +inf when
x > 1 - h (Ho's edge rule, his x < -0.999 for L = 256). Digits: L = 17 levels (pixel values 0..16 scaled to
[-1, 1], `data.N_LEVELS`), h = 1/16; generated queries (not on the grid) get the bin centred on their value.
In bits/dim: -ELBO / (D ln 2); L_0 is a probability of the discrete image, so no dequantisation offset is
needed (uniform over 17 levels = log2 17 = 4.09 bits/dim).

Estimator of the sum over i (deterministic given the seed, differentiable in theta): K timestep draws shared by
every image (seeded by (seed, 100 + stream)), n_noise eps per draw seeded per image (seed, 100 + stream, image):
- "importance" (default): p(i) proportional to w_i, stratified: u_k = (k + U_k) / K, i_k = F^-1(u_k); weight
  w_i / (K n_noise p(i)) = sum(w) / (K n_noise). Unbiased (U_k uniform), low variance: w_i spans 0.6 .. 0.005.
- "uniform": the same stratification with p uniform over 1..T-1; weight (T - 1) w_i / (K n_noise).
- "all": every i in 1..T-1 with n_noise eps each (exact in i; K is ignored).
The decoder uses `decoder_draws` further eps per image (same generator).

Trajectory log-prob of a stored sampling trajectory (sample.py: states x_{tau_0}, ..., x_{tau_{S-1}}, x_final
for the scheduler's timesteps tau_0 > ... > tau_{S-1}): the DDPM ancestral density with the small variance
of the strided chain the sampler used,

    -ln p = -ln N(x_{tau_0}; 0, I) - sum_{k} ln N(x_{tau_{k+1}}; mu_theta(x_{tau_k}, tau_k), s_k^2 I)
    mu_theta = (x - beta'_k / sqrt(1 - a_bar_{tau_k}) eps_theta(x, tau_k)) / sqrt(alpha'_k),
    alpha'_k = a_bar_{tau_k} / a_bar_{tau_{k+1}}, beta'_k = 1 - alpha'_k,
    s_k^2 = beta'_k (1 - a_bar_{tau_{k+1}}) / (1 - a_bar_{tau_k})

with tau_S = "clean" (a_bar = 1, as both samplers use). For T steps this is Ho's p_theta(x_{t-1} | x_t); for a
strided schedule it is exactly what diffusers' DDPMScheduler(variance_type="fixed_small") samples from. The
final step has s^2 = 0 (a deterministic x0 prediction in both samplers); like the decoder above, it gets the
variance of the step before it (Ho's clipping), so that step contributes ||x_final - mu||^2 / (2 s^2) + const.
With DDIM (eta = 0, the default sampler) the stored transitions are deterministic and are NOT draws from this
density: the measurement is then "how probable the model's own DDPM chain finds the DDIM path", a smooth
function of theta, not the probability of the sampler's output. `clip_x0=True` clips the x0 prediction to
[-1, 1] as sample.py's schedulers do (clip_sample=True), which makes the mean exactly the sampler's mean but
zeroes the gradient of clipped pixels; the default (False) is the eps-parametrised mean above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from workflow_scripts.core.common import ArtefactError, generator, load_npz, rng
from workflow_scripts.core.contracts import (
    ALL_QUERY_SETS,
    DEFAULT_MEASUREMENTS,
    DEFAULT_TIMESTEP_LOSS_TIMESTEPS,
    QUERY_SETS,
    query_stream,
    target_key,
    target_names,
)
from workflow_scripts.core.data import N_LEVELS
from workflow_scripts.core.measurement import Measurement, SimpleLossMeasurement
from workflow_scripts.families.ddpm import alphas_cumprod, make_scheduler, measure_loss
from workflow_scripts.families.vesde import LIKELIHOOD_DEFAULTS, measure_likelihood

MEASUREMENTS = ("loss", "elbo", "timestep_loss", "trajectory", "likelihood")


ELBO_SCHEMES = ("importance", "uniform", "all")


ELBO_STREAM, TIMESTEP_STREAM = 100, 200  # offsets of the measurement streams (the loss uses 0, 1, ...)


# Defaults of the optional measure.* keys (schemas/params.schema.yaml): absent keys keep today's behaviour.
MEASURE_DEFAULTS = {
    "measurements": ["loss"],
    "elbo": {"scheme": "importance", "n_timesteps": 250, "n_noise": 2, "decoder_draws": 1},
    "timestep_loss": {"timesteps": list(DEFAULT_TIMESTEP_LOSS_TIMESTEPS), "n_noise": 8},
    "trajectory": {"clip_x0": False},
    "likelihood": dict(LIKELIHOOD_DEFAULTS),
}


def measure_settings(measure_cfg: dict, family: str = "ddpm") -> dict:
    """measure.* with the defaults of the new optional keys filled in (nested dicts merged key by key);
    measurements defaults to [loss] for ddpm, [likelihood] for vesde."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in MEASURE_DEFAULTS.items()}
    out["measurements"] = list(DEFAULT_MEASUREMENTS[family])
    for key, value in measure_cfg.items():
        out[key] = {**out[key], **value} if isinstance(out.get(key), dict) else value
    return out


def model_family(model_cfg: dict) -> str:
    return model_cfg.get("family", "ddpm")


def bits_per_dim(nats, n_dims: int, offset_bits: float = 0.0):
    """-ln p / (D ln 2) + offset (the dequantisation offset of a continuous density; 0 for discrete models)."""
    return nats / (n_dims * math.log(2.0)) + offset_bits


# ----------------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """float64 DDPM schedule (diffusers' linear betas): index i = 0..T-1."""

    betas: torch.Tensor
    alphas: torch.Tensor
    a_bar: torch.Tensor
    a_bar_prev: torch.Tensor  # a_bar_{i-1}, a_bar_{-1} = 1
    posterior_var: torch.Tensor  # sigma_i^2 = beta_i (1 - a_bar_{i-1}) / (1 - a_bar_i); 0 at i = 0

    @property
    def T(self) -> int:
        return len(self.betas)

    def elbo_weights(self) -> torch.Tensor:
        """w_i of Ho et al. eq. 5 for i = 1..T-1 (w_0 = 0: index 0 is the decoder L_0)."""
        w = self.betas.pow(2) / (2 * self.posterior_var * self.alphas * (1 - self.a_bar))
        w[0] = 0.0
        return w

    def decoder_std(self) -> float:
        """Ho's clipped decoder std: sqrt(sigma^2 at index 1)."""
        return float(self.posterior_var[1].sqrt())


def schedule(diffusion_cfg: dict) -> Schedule:
    # diffusers' (float32) betas, everything else in float64: differencing the float32 a_bar instead would lose
    # ~1e-3 of the relative precision of the small betas.
    betas = make_scheduler(diffusion_cfg).betas.double()
    alphas = 1 - betas
    a_bar = torch.cumprod(alphas, 0)
    a_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), a_bar[:-1]])
    return Schedule(betas, alphas, a_bar, a_bar_prev, betas * (1 - a_bar_prev) / (1 - a_bar))


def prior_kl(x0: torch.Tensor, a_bar_last: float) -> torch.Tensor:
    """L_T = KL(N(sqrt(a_bar) x0, (1 - a_bar) I) || N(0, I)), summed over pixels (works under vmap)."""
    return 0.5 * (a_bar_last * x0.double().pow(2) + (1 - a_bar_last) - 1 - math.log(1 - a_bar_last)).sum()


# ----------------------------------------------------------------------------------------------------------------
# Discretised Gaussian decoder
# ----------------------------------------------------------------------------------------------------------------
def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """ln(1 - exp(a)) for a < 0, stable at both ends."""
    a = a.clamp(max=-1e-30)
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def log_ndtr(z: torch.Tensor) -> torch.Tensor:
    """ln Phi(z), stable for all z, with finite gradients, and with batching rules under torch.func.vmap (which
    torch.special.log_ndtr lacks): ln(erfcx(-z / sqrt 2) / 2) - z^2 / 2 for z < 0, ln(1 - erfc(z / sqrt 2) / 2) else."""
    neg = z < 0
    zn, zp = torch.where(neg, z, torch.zeros_like(z)), torch.where(neg, torch.zeros_like(z), z)
    left = torch.log(torch.special.erfcx(-zn / math.sqrt(2.0)) / 2) - zn.pow(2) / 2
    right = torch.log1p(-torch.special.erfc(zp / math.sqrt(2.0)) / 2)
    return torch.where(neg, left, right)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: float, levels: int) -> torch.Tensor:
    """Elementwise ln P(bin of x) under N(mean, std^2): bin [x - h, x + h], h = 1 / (levels - 1), open at the
    edges (x < -1 + h: from -inf; x > 1 - h: to +inf). float64, finite, with finite gradients."""
    x, mean = x.double(), mean.double()
    h = 1.0 / (levels - 1)
    z_lo, z_hi = (x - h - mean) / std, (x + h - mean) / std
    flip = z_lo > 0  # both in the right tail: use the mirrored interval, where log_ndtr is accurate
    a, b = torch.where(flip, -z_hi, z_lo), torch.where(flip, -z_lo, z_hi)
    la, lb = log_ndtr(a), log_ndtr(b)
    interior = lb + _log1mexp(la - lb)
    lower_open = log_ndtr(z_hi)
    upper_open = log_ndtr(-z_lo)
    return torch.where(x < -1 + h, lower_open, torch.where(x > 1 - h, upper_open, interior))


# ----------------------------------------------------------------------------------------------------------------
# ELBO
# ----------------------------------------------------------------------------------------------------------------
def elbo_timestep_draws(
    sched: Schedule, n_timesteps: int, scheme: str, seed: int, stream: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t (K,) long in 1..T-1, weight (K,) float64) with sum_k weight_k f(t_k) estimating sum_{i>=1} w_i f(i)."""
    w = sched.elbo_weights()
    T = sched.T
    if scheme == "all":
        t = torch.arange(1, T)
        return t, w[t].clone()
    if scheme not in ELBO_SCHEMES:
        raise ValueError(f"ELBO scheme {scheme!r} is not one of {ELBO_SCHEMES}")
    K = int(n_timesteps)
    u = (np.arange(K) + rng(seed, ELBO_STREAM + stream).random(K)) / K  # stratified: one draw per stratum
    p = (w[1:] if scheme == "importance" else torch.ones(T - 1, dtype=torch.float64)).numpy()
    p = p / p.sum()
    cdf = np.cumsum(p)
    idx = np.minimum(np.searchsorted(cdf, u, side="right"), T - 2)
    t = torch.from_numpy(idx + 1).long()
    weight = w[t] / (K * torch.from_numpy(p[idx]))
    return t, weight


class ElboMeasurement(Measurement):
    """-ELBO in nats (module docstring). draws: rows = K * n_noise KL draws, then `decoder_draws` decoder draws."""

    name = "elbo"

    def __init__(
        self,
        diffusion_cfg: dict,
        levels: int,
        seed: int,
        stream: int = 0,
        scheme: str = "importance",
        n_timesteps: int = 250,
        n_noise: int = 2,
        decoder_draws: int = 1,
    ):
        self.sched = schedule(diffusion_cfg)
        self.levels, self.seed, self.stream = int(levels), int(seed), int(stream)
        self.n_noise, self.n_decoder = int(n_noise), int(decoder_draws)
        t, weight = elbo_timestep_draws(self.sched, n_timesteps, scheme, seed, stream)
        self.t_kl = t.repeat_interleave(self.n_noise)
        self.w_kl = (weight / self.n_noise).repeat_interleave(self.n_noise)
        self.decoder_std = self.sched.decoder_std()
        self.a_bar_last = float(self.sched.a_bar[-1])
        self.beta0, self.alpha0 = float(self.sched.betas[0]), float(self.sched.alphas[0])

    @property
    def n_kl(self) -> int:
        return len(self.t_kl)

    def draws(self, n, image_shape, start=0):
        rows = self.n_kl + self.n_decoder
        eps = torch.stack(
            [
                torch.randn(rows, *image_shape, generator=generator(self.seed, ELBO_STREAM + self.stream, start + i))
                for i in range(n)
            ]
        )
        t = torch.cat([self.t_kl, torch.zeros(self.n_decoder, dtype=torch.long)])
        a = self.sched.a_bar[t]
        weight = torch.cat([self.w_kl, torch.zeros(self.n_decoder, dtype=torch.float64)])
        rep = lambda v: v.unsqueeze(0).expand(n, *v.shape).clone()  # noqa: E731
        return {
            "t": rep(t),
            "eps": eps,
            "signal": rep(a.sqrt().float()),
            "noise": rep((1 - a).sqrt().float()),
            "weight": rep(weight),
        }

    def terms(self, predict, x0, d) -> dict[str, torch.Tensor]:
        """{kl, l0, lt} in nats for one image; their sum is objective()."""
        shape = (-1,) + (1,) * x0.dim()
        x_t = d["signal"].view(shape) * x0.unsqueeze(0) + d["noise"].view(shape) * d["eps"]
        pred = predict(x_t, d["t"])
        k = self.n_kl
        sq = (d["eps"][:k] - pred[:k]).double().pow(2).flatten(1).sum(1)
        kl = (d["weight"][:k] * sq).sum()
        mean = (x_t[k:].double() - math.sqrt(self.beta0) * pred[k:].double()) / math.sqrt(self.alpha0)
        l0 = (
            -discretized_gaussian_log_likelihood(x0.unsqueeze(0), mean, self.decoder_std, self.levels)
            .flatten(1)
            .sum(1)
            .mean()
        )
        return {"kl": kl, "l0": l0, "lt": prior_kl(x0, self.a_bar_last)}

    def objective(self, predict, x0, d):
        terms = self.terms(predict, x0, d)
        return terms["kl"] + terms["l0"] + terms["lt"]


# ----------------------------------------------------------------------------------------------------------------
# Per-timestep loss
# ----------------------------------------------------------------------------------------------------------------
class TimestepLossMeasurement(SimpleLossMeasurement):
    """The simple loss ||eps - eps_theta(x_t, t)||^2 / D at ONE timestep t, mean over n_noise fixed eps per image
    (seeded (seed, 200 + stream, t, image): the same eps for every model)."""

    name = "timestep_loss"

    def __init__(self, timestep: int, n_noise: int, diffusion_cfg: dict, seed: int, stream: int = 0):
        self.timestep, self.n_noise = int(timestep), int(n_noise)
        T = diffusion_cfg["num_train_timesteps"]
        if not 0 <= self.timestep < T:
            raise ValueError(f"timestep {timestep} outside 0..{T - 1}")

        def draw_fn(n, shape, start):
            eps = torch.stack(
                [
                    torch.randn(
                        self.n_noise,
                        *shape,
                        generator=generator(seed, TIMESTEP_STREAM + stream, self.timestep, start + i),
                    )
                    for i in range(n)
                ]
            )
            return torch.full((n, self.n_noise), self.timestep, dtype=torch.long), eps

        super().__init__(draw_fn, alphas_cumprod(diffusion_cfg))


# ----------------------------------------------------------------------------------------------------------------
# Trajectory log-probability
# ----------------------------------------------------------------------------------------------------------------
def trajectory_coefficients(diffusion_cfg: dict, timesteps) -> dict[str, torch.Tensor]:
    """Per sampling step k (float64, shape (S,)): a_bar at tau_k and at tau_{k+1} (1 after the last step),
    alpha'_k, beta'_k and the transition variance s_k^2 (the last one clipped to the one before it)."""
    sched = schedule(diffusion_cfg)
    tau = torch.as_tensor(np.asarray(timesteps), dtype=torch.long)
    if len(tau) > 1 and not bool((tau[1:] < tau[:-1]).all()):
        raise ValueError("sampling timesteps must be strictly decreasing")
    a_t = sched.a_bar[tau]
    a_next = torch.cat([sched.a_bar[tau[1:]], torch.ones(1, dtype=torch.float64)])
    alpha = a_t / a_next
    beta = 1 - alpha
    var = beta * (1 - a_next) / (1 - a_t)
    var[-1] = var[-2] if len(var) > 1 else sched.posterior_var[1]
    return {"t": tau, "a_bar": a_t, "a_bar_next": a_next, "alpha": alpha, "beta": beta, "var": var}


class TrajectoryMeasurement(Measurement):
    """-ln p_theta(stored trajectory) in nats (module docstring). The trajectories are held by the measurement;
    draws(n, shape, start) returns those of images start..start+n-1 (the image passed to objective is unused)."""

    name = "trajectory"

    def __init__(self, trajectories: np.ndarray, timesteps, diffusion_cfg: dict, clip_x0: bool = False):
        self.trajectories = torch.as_tensor(np.asarray(trajectories), dtype=torch.float32)
        if self.trajectories.shape[1] != len(timesteps) + 1:
            raise ValueError(
                f"trajectories hold {self.trajectories.shape[1]} states, expected len(timesteps) + 1 = "
                f"{len(timesteps) + 1}"
            )
        self.coef = trajectory_coefficients(diffusion_cfg, timesteps)
        self.clip_x0 = bool(clip_x0)

    def draws(self, n, image_shape, start=0):
        c = self.coef
        rep = lambda v: v.unsqueeze(0).expand(n, *v.shape).clone()  # noqa: E731
        return {
            "t": rep(c["t"]),
            "states": self.trajectories[start : start + n].clone(),
            "sqrt_a": rep(c["a_bar"].sqrt()),
            "sqrt_1ma": rep((1 - c["a_bar"]).sqrt()),
            "c0": rep(c["a_bar_next"].sqrt() * c["beta"] / (1 - c["a_bar"])),
            "cx": rep(c["alpha"].sqrt() * (1 - c["a_bar_next"]) / (1 - c["a_bar"])),
            "var": rep(c["var"]),
        }

    def step_nll(self, predict, d) -> torch.Tensor:
        """(S,) -ln N(x_{k+1}; mu_theta(x_k), s_k^2 I) per step, nats."""
        states = d["states"]
        x, x_next = states[:-1], states[1:].double()
        shape = (-1,) + (1,) * (x.dim() - 1)
        eps = predict(x, d["t"]).double()
        x0_pred = (x.double() - d["sqrt_1ma"].view(shape) * eps) / d["sqrt_a"].view(shape)
        if self.clip_x0:
            x0_pred = x0_pred.clamp(-1, 1)
        mu = d["c0"].view(shape) * x0_pred + d["cx"].view(shape) * x.double()
        n_dims = x[0].numel()
        return 0.5 * ((x_next - mu).pow(2).flatten(1).sum(1) / d["var"] + n_dims * torch.log(2 * math.pi * d["var"]))

    def objective(self, predict, x0, d):
        x_first = d["states"][0].double()
        prior = 0.5 * (x_first.pow(2).sum() + x_first.numel() * math.log(2 * math.pi))
        return prior + self.step_nll(predict, d).sum()


# ----------------------------------------------------------------------------------------------------------------
# Batch evaluation (ground truth on a trained model)
# ----------------------------------------------------------------------------------------------------------------
def model_predict(model):
    def predict(x, t):
        out = model(x, t)
        return out.sample if hasattr(out, "sample") else out

    return predict


def _rows_per_image(draws: dict) -> int:
    t = draws["t"]
    return int(t.shape[1]) if t.dim() > 1 else 1


@torch.no_grad()
def evaluate(
    model, images: np.ndarray, measurement: Measurement, device="cpu", batch_rows: int = 500, vectorized: bool = True
) -> dict[str, np.ndarray]:
    """measurement.objective (and its terms, if it has any) of every image: {"value": (n,), term: (n,)} float64.
    Images are processed vmap-ped in groups of about batch_rows model rows (vectorized=False: one at a time)."""
    from torch.func import vmap

    model = model.to(device).eval()
    predict = model_predict(model)
    images = np.asarray(images, dtype=np.float32)
    shape = images.shape[1:]
    has_terms = hasattr(measurement, "terms")

    def one(x, d):
        if has_terms:
            terms = measurement.terms(predict, x, d)
            return {"value": sum(terms.values()), **terms}
        return {"value": measurement.objective(predict, x, d)}

    per_image = _rows_per_image(measurement.draws(1, shape, 0))
    batch = 1 if not vectorized else max(1, int(batch_rows) // max(per_image, 1))
    out: dict[str, list] = {}
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start : start + batch]).to(device)
        d = {k: v.to(device) for k, v in measurement.draws(len(x), shape, start).items()}
        if vectorized:
            values = vmap(one)(x, d)
        else:
            rows = [one(x[i], {k: v[i] for k, v in d.items()}) for i in range(len(x))]
            values = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        for k, v in values.items():
            out.setdefault(k, []).append(v.double().cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def measure_elbo(
    model,
    images: np.ndarray,
    diffusion_cfg: dict,
    elbo_cfg: dict,
    levels: int,
    seed: int,
    stream: int,
    device="cpu",
    batch_rows: int = 500,
) -> dict[str, np.ndarray]:
    """-ELBO per image: {"nats", "bpd", "kl", "l0", "lt"} (float64, shape (n,)); elbo_cfg = measure.elbo."""
    cfg = {**MEASURE_DEFAULTS["elbo"], **elbo_cfg}
    m = ElboMeasurement(
        diffusion_cfg, levels, seed, stream, cfg["scheme"], cfg["n_timesteps"], cfg["n_noise"], cfg["decoder_draws"]
    )
    r = evaluate(model, images, m, device, batch_rows)
    n_dims = int(np.prod(np.asarray(images).shape[1:]))
    return {"nats": r["value"], "bpd": bits_per_dim(r["value"], n_dims), "kl": r["kl"], "l0": r["l0"], "lt": r["lt"]}


def measure_timestep_losses(
    model,
    images: np.ndarray,
    diffusion_cfg: dict,
    timesteps,
    n_noise: int,
    seed: int,
    stream: int,
    device="cpu",
    batch_rows: int = 500,
) -> np.ndarray:
    """(n_images, len(timesteps)) float64: the simple loss at each chosen timestep."""
    cols = [
        evaluate(model, images, TimestepLossMeasurement(t, n_noise, diffusion_cfg, seed, stream), device, batch_rows)[
            "value"
        ]
        for t in timesteps
    ]
    return np.stack(cols, axis=1) if cols else np.zeros((len(images), 0))


def measure_trajectory_nll(
    model,
    trajectories: np.ndarray,
    timesteps,
    diffusion_cfg: dict,
    clip_x0: bool = False,
    device="cpu",
    batch_rows: int = 500,
) -> dict[str, np.ndarray]:
    """-ln p of every stored trajectory: {"nats", "bpd"} (bpd: nats / (D ln 2), D = pixels of ONE image; the
    trajectory has S + 1 states, so this is not a bits/dim of the image, only a unit)."""
    m = TrajectoryMeasurement(trajectories, timesteps, diffusion_cfg, clip_x0)
    final = np.asarray(trajectories)[:, -1]
    r = evaluate(model, final, m, device, batch_rows)
    return {"nats": r["value"], "bpd": bits_per_dim(r["value"], int(np.prod(final.shape[1:])))}


def measure_queries(
    model,
    queries: dict[str, np.ndarray],
    config: dict,
    device="cpu",
    samples: dict[str, np.ndarray] | None = None,
    conditions: dict[str, np.ndarray | None] | None = None,
) -> dict[str, np.ndarray]:
    """Every configured measurement of every query set: {target_key(set, target): (n_queries,) float64}.

    config: model, diffusion, measure, seeds.measure, data.dataset. The noise stream of a query set is
    contracts.query_stream (as the loss measurement); a set of another name takes its position in `queries`. `samples` (sample.py's file: trajectories, timesteps) is
    needed for `trajectory`, which exists for the generated queries only (held-out images have no trajectory;
    no array is written for them). Values in nats; bits/dim are an affine function of them.
    `conditions`: per query set, each query's condition (the latent family's caption indices; None: unconditional)."""
    family = model_family(config["model"])
    s = measure_settings(config["measure"], family)
    seed, levels = config["seeds"]["measure"], N_LEVELS[config["data"]["dataset"]]
    out = {}
    for i, (name, images) in enumerate(queries.items()):
        stream = query_stream(name) if name in ALL_QUERY_SETS else i
        for m in s["measurements"]:
            if m == "loss":
                cond = None if conditions is None else conditions.get(name)
                out[target_key(name, m)] = measure_loss(
                    model, images, config["diffusion"], config["measure"], seed, stream, device, cond=cond
                )
            elif m == "elbo":
                out[target_key(name, m)] = measure_elbo(
                    model,
                    images,
                    config["diffusion"],
                    s["elbo"],
                    levels,
                    seed,
                    stream,
                    device,
                    config["measure"]["batch_size"],
                )["nats"]
            elif m == "timestep_loss":
                ts = s["timestep_loss"]["timesteps"]
                values = measure_timestep_losses(
                    model,
                    images,
                    config["diffusion"],
                    ts,
                    s["timestep_loss"]["n_noise"],
                    seed,
                    stream,
                    device,
                    config["measure"]["batch_size"],
                )
                out.update({target_key(name, f"timestep_loss_t{t}"): values[:, j] for j, t in enumerate(ts)})
            elif m == "trajectory":
                if name != "generated":
                    continue
                if samples is None:
                    raise ValueError("the trajectory measurement needs the samples file (trajectories, timesteps)")
                out[target_key(name, m)] = measure_trajectory_nll(
                    model,
                    samples["trajectories"],
                    samples["timesteps"],
                    config["diffusion"],
                    s["trajectory"]["clip_x0"],
                    device,
                    config["measure"]["batch_size"],
                )["nats"]
            elif m == "likelihood":
                out[target_key(name, m)] = measure_likelihood(
                    model, images, config["model"], s["likelihood"], levels, seed, stream, device
                )["nats"]
            else:
                raise ValueError(f"unknown measurement {m!r}")
    return out


def load_measurement_targets(
    paths: list[str], n_subsets: int, n_seeds: int, target: str = "loss", query_sets=ALL_QUERY_SETS
) -> dict[str, np.ndarray]:
    """The one reader of measurement files: {query set: (n_subsets, n_seeds, n_queries)} of any target; query sets
    without that target in the files (trajectory: held-out) are left out. Files must come subset-major."""
    if len(paths) != n_subsets * n_seeds:
        raise ArtefactError(f"expected {n_subsets * n_seeds} measurement files, got {len(paths)}")
    out: dict[str, list] = {}
    for k, path in enumerate(paths):
        arrays = load_npz(path, ("subset", "replicate"))
        if (int(arrays["subset"]), int(arrays["replicate"])) != divmod(k, n_seeds):
            raise ArtefactError(
                f"{path}: holds subset {int(arrays['subset'])} seed {int(arrays['replicate'])}, "
                f"expected subset {k // n_seeds} seed {k % n_seeds}"
            )
        for name in query_sets:
            key = target_key(name, target)
            if key in arrays:
                out.setdefault(name, []).append(arrays[key])
            elif name in out:
                raise ArtefactError(f"{path}: lacks {key}")
    return {name: np.stack(v).reshape(n_subsets, n_seeds, -1) for name, v in out.items() if len(v) == len(paths)}


# ----------------------------------------------------------------------------------------------------------------
# The measurement of a target, for query-side gradients (scorers/kfac.py: query_measurement)
# ----------------------------------------------------------------------------------------------------------------
def target_measurement(config: dict, target: str, query_set: str, samples: dict | None = None) -> Measurement | None:
    """The Measurement whose objective is exactly what measure_queries writes for (query_set, target): same
    draws, seeds and noise stream; its gradient is the query side of an influence score for that target.
    None where the target does not exist for the set (trajectory: held-out images have no trajectory).
    'loss' is not built here: engines/kfac.py's loss_measurement (kfac.query_draws) gives its draws.

    config: model, diffusion, measure, seeds.measure, data.dataset; samples: sample.py's file (trajectory)."""
    if target not in target_names(config):
        raise ValueError(f"target {target!r} is not measured (measure.measurements gives {target_names(config)})")
    s = measure_settings(config["measure"], model_family(config["model"]))
    seed, stream = config["seeds"]["measure"], query_stream(query_set)
    if target == "elbo":
        e = s["elbo"]
        return ElboMeasurement(
            config["diffusion"],
            N_LEVELS[config["data"]["dataset"]],
            seed,
            stream,
            e["scheme"],
            e["n_timesteps"],
            e["n_noise"],
            e["decoder_draws"],
        )
    if target.startswith("timestep_loss_t"):
        return TimestepLossMeasurement(
            int(target[len("timestep_loss_t") :]), s["timestep_loss"]["n_noise"], config["diffusion"], seed, stream
        )
    if target == "trajectory":
        if query_set != "generated":
            return None
        if samples is None:
            raise ValueError("the trajectory measurement needs the samples file (trajectories, timesteps)")
        return TrajectoryMeasurement(
            samples["trajectories"], samples["timesteps"], config["diffusion"], s["trajectory"]["clip_x0"]
        )
    raise ValueError(f"no query-side measurement for target {target!r} (loss: engines.kfac.loss_measurement)")


def primary_target(paths: list[str]) -> str:
    """The target the LDS tables rank on: 'loss', or what the files' 'measurement' entry names (measure.py)."""
    arrays = load_npz(paths[0])
    return str(arrays["measurement"]) if "measurement" in arrays else "loss"


def file_targets(paths: list[str]) -> list[str]:
    """The targets every measurement file holds (its 'targets' array; files of the loss-only measure stage: [loss]).
    All files must agree: a mix means some models were measured under another configuration."""
    found = None
    for path in paths:
        arrays = load_npz(path)
        names = [str(t) for t in arrays["targets"]] if "targets" in arrays else ["loss"]
        if found is None:
            found = names
        elif names != found:
            raise ArtefactError(f"{path}: holds targets {names}, {paths[0]} holds {found}; remeasure")
    return found or []


def method_targets(
    paths: list[str], n_subsets: int, n_seeds: int, target: str, query_sets=QUERY_SETS
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Ground truth of a method whose scores predict `target`: {query set: (n_subsets, n_seeds, n_query)}, and
    {query set: note} for the sets without that target (trajectory: held-out), which get the loss -- as the
    method's own scores for them use the loss gradient. `loss` stands for the files' primary target: a vesde
    model's files hold only the exact -ln p ('likelihood', named by their 'measurement' entry)."""
    if target == "loss":
        target = primary_target(paths)
    own = load_measurement_targets(paths, n_subsets, n_seeds, target, query_sets)
    missing = [name for name in query_sets if name not in own]
    if not missing:
        return own, {}
    if not own and target not in file_targets(paths):
        raise ArtefactError(f"the measurement files hold no target {target!r} (they hold {file_targets(paths)})")
    loss = load_measurement_targets(paths, n_subsets, n_seeds, "loss", missing)
    return {**own, **loss}, {name: f"{name} queries have no {target} target: tuned on the loss" for name in missing}


def load_targets(paths: list[str], n_subsets: int, n_seeds: int) -> dict[str, np.ndarray]:
    """The files' primary target (the loss, or what their `measurement` entry names: a VE-SDE model's likelihood)
    of every query set: {query set: (n_subsets, n_seeds, n_queries)}, read by load_measurement_targets; the extra
    queries' when the files hold them."""
    if len(paths) != n_subsets * n_seeds:
        raise ArtefactError(f"expected {n_subsets * n_seeds} measurement files, got {len(paths)}")
    target = primary_target(paths)
    out = load_measurement_targets(paths, n_subsets, n_seeds, target, ALL_QUERY_SETS)
    missing = [target_key(name, target) for name in QUERY_SETS if name not in out]
    if missing:
        raise ArtefactError(f"{paths[0]}: lacks arrays {missing}")
    return out


def measure_generated_query(model, query_image: np.ndarray, config: dict, query: int, device, cond=None) -> float:
    """The measurement m_q of generated query `query` (its draws as in the measure stage): the loss, or for
    model.family vesde the exact -ln p in nats. `cond`: the query's condition (latent family: [caption index])."""
    stream = query_stream("generated")  # the measure stage's noise stream of generated queries
    if model_family(config["model"]) == "vesde":
        settings = measure_settings(config["measure"], "vesde")["likelihood"]
        return float(
            measure_likelihood(
                model,
                query_image,
                config["model"],
                settings,
                N_LEVELS[config["data"]["dataset"]],
                config["seeds"]["measure"],
                stream,
                device,
                first_index=query,
            )["nats"][0]
        )
    return measure_loss(
        model,
        query_image,
        config["diffusion"],
        config["measure"],
        config["seeds"]["measure"],
        stream,
        device,
        indices=[query],
        cond=cond,
    )[0]


def family_primary_target(model_cfg: dict) -> str:
    """The target the LDS tables rank on by default: the loss, or a VE-SDE model's exact -ln p."""
    return "likelihood" if model_family(model_cfg) == "vesde" else "loss"
