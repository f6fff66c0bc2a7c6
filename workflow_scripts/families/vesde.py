"""The VE-SDE model family (`model.family: vesde`) and its exact log-likelihood.

SDE (paper metagradient-likelihood-attribution, Song et al. 2021): dx = g(t) dw, g(t) = sigma^t (sigma = 25),
t in [t_min, 1]. Perturbation kernel p_0t(x_t | x_0) = N(x_0, sigma_t^2 I) with the marginal std

    sigma_t = sqrt((sigma^{2t} - 1) / (2 ln sigma))          (d sigma_t^2 / dt = g(t)^2; sigma_1 = 9.84)

Score model: s_theta(x, t) = -eps_theta(x, sigma_t) / sigma_t, eps_theta a diffusers UNet2DModel (the `model`
section's layout, `diffusion.build_model`) applied to c_in x, c_in = 1 / sqrt(sigma_t^2 + data_std^2), with the
UNet's sinusoidal time embedding fed c_noise = 125 (ln sigma_t + 6) (ln sigma_t mapped affinely onto the
~0..1000 range of DDPM timesteps). `VEScoreNet.forward(x, std)` returns eps_theta, so it plugs into every
place that calls predict(x_t, t) (core/measurement.py's Measurement interface) with t := sigma_t.

Denoising score matching (training): x_t = x_0 + sigma_t eps, loss ||eps_theta(x_t, sigma_t) - eps||^2 / D
= (sigma_t^2 / D) ||s_theta - grad ln p_0t(x_t | x_0)||^2, i.e. DSM with lambda(t) = sigma_t^2, with
- weighting "sigma2" (default; the paper's / Song's tutorial choice): t ~ U(t_min, 1);
- weighting "likelihood": ln sigma_t ~ U(ln sigma_min, ln sigma_1). Since p(t) is proportional to
  d ln sigma_t / dt = g^2 / (2 sigma_t^2), this is the likelihood weighting lambda(t) = g(t)^2 of Song et al.
  (2021, "Maximum likelihood training of score-based diffusion models"), importance-sampled.
Training images are uniformly dequantised (x_0 + u, u ~ U(-h, h)^D, h = 1 / (L - 1), L = data.N_LEVELS) when
model.vesde.dequantize is true (default), so the model's density is a density on R^D that is smooth within a
pixel bin, as the bits/dim offset below assumes.

Exact log-likelihood: the probability-flow ODE dx/dt = -1/2 g(t)^2 s_theta(x, t) and

    ln p_{t_min}(x(t_min)) = ln p_1(x(1)) + int_{t_min}^1 div_x(-1/2 g^2 s_theta)(x(t), t) dt,   p_1 = N(0, sigma_1^2 I).

Solved in u = ln sigma_t (an exact change of variable; -1/2 g^2 s_theta dt = eps_theta d sigma_t):

    dx/du = sigma eps_theta(x, sigma),   d(delta)/du = sigma div_x eps_theta(x, sigma),   sigma = e^u

from u = ln sigma_{t_min} to ln sigma_1 on a uniform grid of n_steps (geometric in sigma), with fixed-step RK4
(default), Heun or Euler; ln p = ln p_1(x(1)) + delta. The divergence is EXACT: the trace of the D x D Jacobian
from D vector-Jacobian products with the unit vectors (torch.func.vjp + vmap over the D basis vectors; D = 64 for
digits), batched over images (the network treats images independently). Everything is differentiable in theta:
backprop through the solver with checkpointing per step (checkpoint=True: only the step inputs are kept, each
step is recomputed in the backward pass; a small custom autograd.Function, because torch.utils.checkpoint's
non-reentrant mode uses saved-tensor hooks that torch.func refuses, and its reentrant mode does not support
autograd.grad). Under torch.func.vmap (per-example query gradients) checkpointing is off (function transforms and
autograd.Functions without vmap rules do not compose); the value is identical.

Bits per dimension of a DISCRETE image with L levels in [-1, 1] (level spacing Delta = 2 / (L - 1)):
P(bin) = int_bin p >= Delta^D exp(E_u ln p(x + u)) (Jensen, u uniform on the bin), so

    bpd = -ln p(x + u) / (D ln 2) + log2((L - 1) / 2)        (offset: -log2 Delta; digits: L = 17, +3 bits)

an upper bound in expectation over the dequantisation u (fixed seeded draws, seeds (seed, 300 + stream,
image); likelihood.dequantize: false evaluates at x itself, the midpoint rule). This is Song et al.'s
`bpd + offset` (their offset 7 - inverse_scaler(-1) = 8 for 256 levels on [0, 1]; here the paper's
"bits/dim = -ln p / (D ln 2)" plus the offset for the data's levels). For reference, uniform over 17 levels is
log2 17 = 4.09 bits/dim.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import check_training_loss, generator, log, rng, save_torch, select_device
from workflow_scripts.core.measurement import Measurement
from workflow_scripts.core.seeds import (
    INIT_STREAM,
    NOISE_STREAM,
    batch_indices,
    image_seed,
    training_identity,
    training_seed,
)
from workflow_scripts.families import ddpm as diffusion
from workflow_scripts.families.ddpm import build_model
from workflow_scripts.families.diffusers_unet import get_cosine_schedule_with_warmup

VESDE_DEFAULTS = {"sigma": 25.0, "t_min": 1.0e-5, "weighting": "sigma2", "dequantize": True, "data_std": 0.5}
WEIGHTINGS = ("sigma2", "likelihood")
SOLVERS = ("euler", "heun", "rk4")
LIKELIHOOD_DEFAULTS = {"solver": "rk4", "n_steps": 32, "checkpoint": True, "dequantize": True, "batch_size": 16}
DEQUANT_STREAM = 300


def vesde_settings(model_cfg: dict) -> dict:
    """model.vesde with defaults (sigma 25, t_min 1e-5, weighting sigma2, dequantize true, data_std 0.5)."""
    return {**VESDE_DEFAULTS, **(model_cfg.get("vesde") or {})}


# ----------------------------------------------------------------------------------------------------------------
# The SDE
# ----------------------------------------------------------------------------------------------------------------
def marginal_std(t, sigma: float = 25.0):
    """sigma_t = sqrt((sigma^{2t} - 1) / (2 ln sigma)) (tensor or float)."""
    if torch.is_tensor(t):
        return torch.sqrt(torch.expm1(2 * t * math.log(sigma)) / (2 * math.log(sigma)))
    return math.sqrt(math.expm1(2 * t * math.log(sigma)) / (2 * math.log(sigma)))


def diffusion_coeff(t, sigma: float = 25.0):
    """g(t) = sigma^t."""
    return sigma**t


def time_of_std(std, sigma: float = 25.0):
    """Inverse of marginal_std: t = ln(1 + 2 ln(sigma) std^2) / (2 ln sigma)."""
    if torch.is_tensor(std):
        return torch.log1p(2 * math.log(sigma) * std.pow(2)) / (2 * math.log(sigma))
    return math.log1p(2 * math.log(sigma) * std**2) / (2 * math.log(sigma))


def std_range(settings: dict) -> tuple[float, float]:
    """(sigma_min, sigma_max) = (sigma_{t_min}, sigma_1)."""
    return marginal_std(float(settings["t_min"]), settings["sigma"]), marginal_std(1.0, settings["sigma"])


def noise_embedding(std: torch.Tensor) -> torch.Tensor:
    return 125.0 * (torch.log(std) + 6.0)


def dequantization_half_width(levels: int) -> float:
    """h = half the level spacing of L levels on [-1, 1]."""
    return 1.0 / (levels - 1)


def bpd_offset(levels: int) -> float:
    """log2((L - 1) / 2) = -log2 of the bin width 2 / (L - 1)."""
    return math.log2((levels - 1) / 2.0)


def bits_per_dim(nll_nats, n_dims: int, levels: int):
    return nll_nats / (n_dims * math.log(2.0)) + bpd_offset(levels)


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class VEScoreNet(nn.Module):
    """eps_theta(x, sigma_t); score(x, sigma_t) = -eps_theta / sigma_t. `std` is a tensor (batch,) or a scalar."""

    def __init__(self, unet: nn.Module, data_std: float = 0.5):
        super().__init__()
        self.unet, self.data_std = unet, float(data_std)

    def forward(self, x: torch.Tensor, std) -> torch.Tensor:
        std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
        if std.dim() == 0:
            std = std.expand(x.shape[0])
        view = (-1,) + (1,) * (x.dim() - 1)
        c_in = (std.pow(2) + self.data_std**2).rsqrt().view(view)
        out = self.unet(c_in * x, noise_embedding(std))
        return out.sample if hasattr(out, "sample") else out

    def score(self, x: torch.Tensor, std) -> torch.Tensor:
        std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
        if std.dim() == 0:
            std = std.expand(x.shape[0])
        return -self(x, std) / std.view((-1,) + (1,) * (x.dim() - 1))


def build_score_model(model_cfg: dict, image_shape) -> VEScoreNet:
    return VEScoreNet(build_model(model_cfg, image_shape), vesde_settings(model_cfg)["data_std"])


def training_stds(n: int, settings: dict, g: torch.Generator) -> torch.Tensor:
    """Noise levels sigma_t of n training draws (see the module docstring for the two weightings)."""
    u = torch.rand(n, generator=g, dtype=torch.float64)
    if settings["weighting"] == "sigma2":
        t_min = float(settings["t_min"])
        return marginal_std(t_min + (1 - t_min) * u, settings["sigma"]).float()
    if settings["weighting"] == "likelihood":
        lo, hi = (math.log(s) for s in std_range(settings))
        return torch.exp(lo + (hi - lo) * u).float()
    raise ValueError(f"model.vesde.weighting {settings['weighting']!r} is not one of {WEIGHTINGS}")


def dsm_loss(model, x0: torch.Tensor, std: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-example ||eps_theta(x0 + std eps, std) - eps||^2 / D, shape (batch,)."""
    x_t = x0 + std.view((-1,) + (1,) * (x0.dim() - 1)) * eps
    return (model(x_t, std) - eps).pow(2).flatten(1).mean(1)


def save_checkpoint_payload(model: VEScoreNet, config: dict, step: int, image_shape, **extra) -> dict:
    return diffusion.save_checkpoint_payload(model, config, step, image_shape, kind="vesde-unet", **extra)


def load_model(path, model_cfg: dict, device="cpu") -> tuple[VEScoreNet, dict]:
    return diffusion.load_checkpoint(path, model_cfg, "vesde-unet", build_score_model, device, "VE-SDE score-model")


def train_vesde(
    config: dict,
    images: np.ndarray,
    members: np.ndarray,
    replicate: int = 0,
    model_out=None,
    weights: np.ndarray | None = None,
    device=None,
    levels: int | None = None,
    checkpoint_paths: dict[int, str] | None = None,
) -> VEScoreNet:
    """DSM training of the VE-SDE score model on images[members], with train.py's conventions: config["train"]
    (steps, batch_size, lr, weight_decay, warmup_fraction, grad_clip), seed seeds.train + replicate, data order,
    init and per-step draws (sigma_t, eps, dequantisation u) pure functions of (seed, step); optional per-example
    loss weights. Saves a "vesde-unet" checkpoint to model_out if given, and intermediate ones (with the lr at
    that step) to checkpoint_paths {step: path}; returns the model (eval mode). No resumable state (train.py's
    resume_every is for the DDPM family): an interrupted run starts again."""
    device = device or select_device(config["compute"])
    train_cfg, settings = config["train"], vesde_settings(config["model"])
    levels = levels or core_data.N_LEVELS[config["data"]["dataset"]]
    seed = training_seed(config, replicate)
    torch.manual_seed(int(rng(seed, INIT_STREAM).integers(2**31)))
    model = build_score_model(config["model"], images.shape[1:]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])
    schedule = get_cosine_schedule_with_warmup(
        optimizer, int(train_cfg["warmup_fraction"] * train_cfg["steps"]), train_cfg["steps"]
    )
    x_all = torch.from_numpy(np.asarray(images, dtype=np.float32)).to(device)
    w_all = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device)
    h = dequantization_half_width(levels)
    identity = {**training_identity(config, members, replicate), "family": "vesde"}
    checkpoint_paths = checkpoint_paths or {}
    model.train()
    for step in range(train_cfg["steps"]):
        idx = torch.from_numpy(batch_indices(members, train_cfg["batch_size"], seed, step)).to(device)
        g = generator(seed, NOISE_STREAM, step)
        std = training_stds(len(idx), settings, g).to(device)
        eps = torch.randn(len(idx), *images.shape[1:], generator=g).to(device)
        x0 = x_all[idx]
        if settings["dequantize"]:
            x0 = x0 + (2 * torch.rand(x0.shape, generator=g) - 1).to(device) * h
        per_example = dsm_loss(model, x0, std, eps)
        loss = per_example.mean() if w_all is None else (w_all[idx] * per_example).mean()
        where = f"vesde training of {model_out or 'a score model'}"
        check_training_loss(loss.item(), step, train_cfg["steps"], where, "train.lr", train_cfg["lr"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg["grad_clip"])
        lr = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()
        if step + 1 in checkpoint_paths:
            save_torch(
                save_checkpoint_payload(model, identity, step + 1, images.shape[1:], lr=lr), checkpoint_paths[step + 1]
            )
        if step % 250 == 0 or step == train_cfg["steps"] - 1:
            log.info("vesde train step %d: loss %.4f", step, loss.item())
    model.eval()
    if model_out is not None:
        save_torch(save_checkpoint_payload(model, identity, train_cfg["steps"], images.shape[1:]), model_out)
    return model


@torch.no_grad()
def pf_ode_sample(
    model, x: torch.Tensor, settings: dict, n_steps: int, device="cpu"
) -> tuple[torch.Tensor, list, list]:
    """Integrate the probability-flow ODE from x ~ N(0, sigma_1^2 I) at sigma_1 down to sigma_min: Heun steps uniform
    in u = ln sigma (dx/du = sigma eps_theta). Returns (x at sigma_min, the n_steps + 1 states, the n_steps sigmas
    the steps start from). Deterministic: each image depends only on its own starting point."""
    lo, hi = (math.log(s) for s in std_range(settings))
    grid = torch.linspace(hi, lo, n_steps + 1, dtype=torch.float64)
    n = x.shape[0]
    f = lambda y, u: math.exp(u) * model(y, torch.full((n,), math.exp(u), device=device))  # noqa: E731
    states, sigmas = [x.cpu()], []
    for u0, u1 in zip(grid[:-1].tolist(), grid[1:].tolist()):
        k1 = f(x, u0)
        k2 = f(x + (u1 - u0) * k1, u1)
        x = x + 0.5 * (u1 - u0) * (k1 + k2)
        states.append(x.cpu())
        sigmas.append(math.exp(u0))
    return x, states, sigmas


@torch.no_grad()
def sample_vesde(
    model, n: int, image_shape, settings: dict, n_steps: int = 64, seed: int = 0, device="cpu"
) -> torch.Tensor:
    """Probability-flow ODE samples (Heun in u = ln sigma, from x(1) ~ N(0, sigma_1^2 I) down to sigma_min)."""
    lo, hi = (math.log(s) for s in std_range(settings))
    x = torch.randn(n, *image_shape, generator=generator(seed)).to(device) * math.exp(hi)
    return pf_ode_sample(model, x, settings, n_steps, device)[0]


@torch.no_grad()
def generate_vesde(
    model, image_shape, settings: dict, n_steps: int, sample_seed: int, n_images: int, device="cpu", indices=None
) -> dict[str, np.ndarray]:
    """The sample stage's queries for the VE-SDE family, in sample.generate's format: image i starts from
    N(0, sigma_1^2 I) drawn with its own generator (seed sample_seed * 1000 + i) and follows the deterministic
    probability-flow ODE (n_steps Heun steps), so it does not depend on the other images; clamped to [-1, 1].
    trajectories: (n, n_steps + 1, *shape) ODE states; timesteps: the sigma_t each step starts from."""
    indices = list(range(n_images)) if indices is None else [int(i) for i in indices]
    sigma_max = std_range(settings)[1]
    x = torch.stack([torch.randn(*image_shape, generator=generator(image_seed(sample_seed, i))) for i in indices])
    final, states, sigmas = pf_ode_sample(model, x.to(device) * sigma_max, settings, n_steps, device)
    return {
        "images": final.clamp(-1, 1).cpu().numpy(),
        "trajectories": torch.stack(states, 1).numpy(),
        "timesteps": np.asarray(sigmas),
        "seeds": np.array([image_seed(sample_seed, i) for i in indices]),
    }


# ----------------------------------------------------------------------------------------------------------------
# Exact divergence and the probability-flow ODE
# ----------------------------------------------------------------------------------------------------------------
def exact_divergence(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(x), div_x fn (B,)) for a batched map fn: (B, *S) -> (B, *S) that acts on each example separately.

    D = prod(S) vector-Jacobian products with the unit vectors e_i (one vmap over the basis, every image at once):
    row i of example b's Jacobian is the b-th slice of vjp(e_i in every example); div = sum_i J_b[i, i]. Exact,
    differentiable (create-graph semantics: torch.func transforms compose with outer autograd and vmap)."""
    out, vjp_fn = torch.func.vjp(fn, x)
    n_dims, batch = x[0].numel(), x.shape[0]
    basis = torch.eye(n_dims, dtype=x.dtype, device=x.device).view(n_dims, 1, *x.shape[1:]).expand(n_dims, *x.shape)
    (rows,) = torch.func.vmap(vjp_fn)(basis)  # (D, B, *S)
    return out, rows.reshape(n_dims, batch, n_dims).diagonal(dim1=0, dim2=2).sum(-1)


def log_sigma_grid(sigma_min: float, sigma_max: float, n_steps: int, dtype=torch.float64) -> torch.Tensor:
    """u_0 < ... < u_n: n_steps uniform steps in u = ln sigma from ln sigma_min to ln sigma_max."""
    return torch.linspace(math.log(sigma_min), math.log(sigma_max), int(n_steps) + 1, dtype=dtype)


def _field(eps_fn, x, u):
    sigma = torch.exp(u).to(x.dtype)
    eps, div = exact_divergence(lambda y: eps_fn(y, sigma.reshape(1).expand(y.shape[0])), x)
    return sigma * eps, sigma * div


def _step(eps_fn, solver: str, x, u0, u1):
    """One fixed step of (x, delta) from u0 to u1; returns (x_new, delta increment (B,))."""
    h = (u1 - u0).to(x.dtype)
    if solver == "euler":
        kx, kd = _field(eps_fn, x, u0)
        return x + h * kx, h * kd
    if solver == "heun":
        k1x, k1d = _field(eps_fn, x, u0)
        k2x, k2d = _field(eps_fn, x + h * k1x, u1)
        return x + 0.5 * h * (k1x + k2x), 0.5 * h * (k1d + k2d)
    if solver == "rk4":
        um = 0.5 * (u0 + u1)
        k1x, k1d = _field(eps_fn, x, u0)
        k2x, k2d = _field(eps_fn, x + 0.5 * h * k1x, um)
        k3x, k3d = _field(eps_fn, x + 0.5 * h * k2x, um)
        k4x, k4d = _field(eps_fn, x + h * k3x, u1)
        return (x + h / 6 * (k1x + 2 * k2x + 2 * k3x + k4x), h / 6 * (k1d + 2 * k2d + 2 * k3d + k4d))
    raise ValueError(f"solver {solver!r} is not one of {SOLVERS}")


def gaussian_prior_logp(x: torch.Tensor, std, mean=0.0) -> torch.Tensor:
    """ln N(x; mean, std^2 I) per example, (B,); std a float or a 0-d tensor (works under vmap)."""
    n_dims = x[0].numel()
    var = torch.as_tensor(std, dtype=x.dtype, device=x.device) ** 2
    return -0.5 * ((x - mean).pow(2).flatten(1).sum(1) / var + n_dims * torch.log(2 * math.pi * var))


def _module_fn(module: nn.Module, names: list[str], params) -> callable:
    from torch.func import functional_call

    tensors = dict(zip(names, params))
    return lambda y, s: functional_call(module, tensors, (y, s))


class _CheckpointedStep(torch.autograd.Function):
    """One solver step that keeps only its inputs (x, u0, u1, parameters) and recomputes itself in the backward
    pass. Hand-written because torch.utils.checkpoint(use_reentrant=False) relies on saved-tensor hooks, which
    torch.func.vjp (the exact divergence) refuses, and the reentrant variant does not support autograd.grad.
    First-order only (no double backward through the solver)."""

    @staticmethod
    def forward(ctx, module, solver, names, x, u0, u1, *params):
        ctx.module, ctx.solver, ctx.names = module, solver, names
        ctx.save_for_backward(x, u0, u1, *params)
        x1, inc = _step(_module_fn(module, names, params), solver, x, u0, u1)
        return x1.detach(), inc.detach()

    @staticmethod
    def backward(ctx, grad_x, grad_inc):
        x, u0, u1, *params = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            pd = [p.detach().requires_grad_(True) for p in params]
            x1, inc = _step(_module_fn(ctx.module, ctx.names, pd), ctx.solver, xd, u0, u1)
            grad_x = torch.zeros_like(x1) if grad_x is None else grad_x
            grad_inc = torch.zeros_like(inc) if grad_inc is None else grad_inc
            grads = torch.autograd.grad((x1, inc), [xd, *pd], (grad_x, grad_inc), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, [xd, *pd])]
        return (None, None, None, grads[0], None, None, *grads[1:])


def pf_ode_nll(
    eps_fn,
    x: torch.Tensor,
    grid: torch.Tensor,
    solver: str = "rk4",
    checkpoint: bool = False,
    prior_logp=None,
    return_terms: bool = False,
):
    """-ln p_{sigma_min}(x) (B,) in nats by the probability-flow ODE on the u = ln sigma grid (grid[0] = ln sigma_min,
    grid[-1] = ln sigma_max), exact divergence. eps_fn(x (B, *S), sigma (B,)) -> eps_theta. prior_logp(x1) -> (B,)
    defaults to N(0, sigma_max^2 I). return_terms: also {"prior": ln p_1(x(1)), "delta": int div, "x1": x(1)}.

    checkpoint=True (eps_fn must be an nn.Module; gradients flow to its parameters that require grad): each step
    is recomputed in the backward pass from its saved input, so memory is O(n_steps x state) instead of
    O(n_steps x activations). Not usable under torch.func transforms (use checkpoint=False there)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is not one of {SOLVERS}")
    if checkpoint:
        if not isinstance(eps_fn, nn.Module):
            raise TypeError("checkpoint=True needs eps_fn to be an nn.Module (its parameters are the step inputs)")
        named = [(n, p) for n, p in eps_fn.named_parameters() if p.requires_grad]
        names, params = [n for n, _ in named], [p for _, p in named]
    delta = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(len(grid) - 1):
        u0, u1 = grid[i], grid[i + 1]
        if checkpoint:
            x, inc = _CheckpointedStep.apply(eps_fn, solver, names, x, u0, u1, *params)
        else:
            x, inc = _step(eps_fn, solver, x, u0, u1)
        delta = delta + inc
    prior = prior_logp(x) if prior_logp is not None else gaussian_prior_logp(x, torch.exp(grid[-1]))
    nll = -(prior + delta)
    return (nll, {"prior": prior, "delta": delta, "x1": x}) if return_terms else nll


def dequantization_noise(n: int, image_shape, levels: int, seed: int, stream: int, start: int = 0) -> torch.Tensor:
    """Fixed u ~ U(-h, h)^D per image, seeded (seed, 300 + stream, image)."""
    h = dequantization_half_width(levels)
    return torch.stack(
        [
            (2 * torch.rand(*image_shape, generator=generator(seed, DEQUANT_STREAM + stream, start + i)) - 1) * h
            for i in range(n)
        ]
    )


class LikelihoodMeasurement(Measurement):
    """-ln p_theta(x + u) in nats (exact, probability-flow ODE) for the VE-SDE family; bits/dim via `bits_per_dim`.
    draws: "t" = the ln sigma grid of the solver (so scorers' batching sees n_steps + 1 rows per image) and "u"
    the dequantisation noise (zeros if dequantize is false). predict(x, sigma) -> eps_theta."""

    name = "likelihood"

    def __init__(
        self,
        settings: dict,
        levels: int,
        seed: int,
        stream: int = 0,
        solver: str = "rk4",
        n_steps: int = 32,
        dequantize: bool = True,
        checkpoint: bool = False,
    ):
        self.settings, self.levels, self.seed, self.stream = settings, int(levels), int(seed), int(stream)
        self.solver, self.n_steps, self.dequantize, self.checkpoint = (
            solver,
            int(n_steps),
            bool(dequantize),
            bool(checkpoint),
        )
        self.grid = log_sigma_grid(*std_range(settings), self.n_steps)

    def draws(self, n, image_shape, start=0):
        u = (
            dequantization_noise(n, image_shape, self.levels, self.seed, self.stream, start)
            if self.dequantize
            else torch.zeros(n, *image_shape)
        )
        return {"t": self.grid.unsqueeze(0).expand(n, -1).clone(), "u": u}

    def nll(self, predict, x: torch.Tensor, d: dict, checkpoint: bool | None = None) -> torch.Tensor:
        """Batched form: x (B, *S), d with leading dim B (the grid of the first row is used)."""
        grid = d["t"][0] if d["t"].dim() > 1 else d["t"]
        return pf_ode_nll(
            predict,
            x + d["u"].to(x.dtype),
            grid.to(x.device),
            self.solver,
            self.checkpoint if checkpoint is None else checkpoint,
        )

    def objective(self, predict, x0, d):
        # called per image under vmap: no checkpointing there (see the module docstring)
        return pf_ode_nll(predict, (x0 + d["u"].to(x0.dtype)).unsqueeze(0), d["t"], self.solver, False)[0]


def likelihood_measurement(
    model_cfg: dict, likelihood_cfg: dict, levels: int, seed: int, stream: int = 0
) -> LikelihoodMeasurement:
    cfg = {**LIKELIHOOD_DEFAULTS, **likelihood_cfg}
    return LikelihoodMeasurement(
        vesde_settings(model_cfg),
        levels,
        seed,
        stream,
        cfg["solver"],
        cfg["n_steps"],
        cfg["dequantize"],
        cfg["checkpoint"],
    )


def measure_likelihood(
    model,
    images: np.ndarray,
    model_cfg: dict,
    likelihood_cfg: dict,
    levels: int,
    seed: int,
    stream: int = 0,
    device="cpu",
    first_index: int = 0,
) -> dict[str, np.ndarray]:
    """Exact -ln p and bits/dim of every image (ground truth on a trained model): {"nats", "bpd"} float64 (n,).
    images[i] gets the dequantisation draw of query first_index + i of its stream (e.g. one regenerated query)."""
    cfg = {**LIKELIHOOD_DEFAULTS, **likelihood_cfg}
    m = likelihood_measurement(model_cfg, cfg, levels, seed, stream)
    model = model.to(device).eval()
    images = np.asarray(images, dtype=np.float32)
    out = []
    with torch.no_grad():  # torch.func transforms inside still differentiate w.r.t. x
        for start in range(0, len(images), int(cfg["batch_size"])):
            x = torch.from_numpy(images[start : start + int(cfg["batch_size"])]).to(device)
            d = {k: v.to(device) for k, v in m.draws(len(x), images.shape[1:], first_index + start).items()}
            out.append(m.nll(model, x, d, checkpoint=False).double().cpu())
    nats = torch.cat(out).numpy() if out else np.zeros(0)
    return {"nats": nats, "bpd": bits_per_dim(nats, int(np.prod(images.shape[1:])), levels)}


# ---------------------------------------------------------------- the model-family interface (families.registry)
def train_family_model(
    config: dict, dataset: dict, members, replicate: int, model_out, checkpoint_paths=None, weights=None
) -> None:
    train_vesde(
        config,
        dataset["train_images"],
        members,
        replicate,
        model_out,
        weights=weights,
        checkpoint_paths=checkpoint_paths,
    )


def sampler_name(config: dict) -> str:
    return "probability-flow ODE (Heun)"


def generate_images(model, image_shape, config: dict, device, n_images: int, indices=None) -> dict:
    """The probability-flow ODE with sample.num_inference_steps Heun steps, from the same per-image seeds as the
    DDPM sampler (sample.scheduler is a DDPM setting)."""
    return generate_vesde(
        model,
        image_shape,
        vesde_settings(config["model"]),
        config["sample"]["num_inference_steps"],
        config["seeds"]["sample"],
        n_images,
        device,
        indices,
    )
