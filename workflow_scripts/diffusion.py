"""The DDPM model family: UNet2DModel builder, forward process, simple loss and output functions.

Notation follows METHODS.md: x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) eps, and the per-example
simple loss ||eps - eps_theta(x_t, t)||^2 / D_pix averaged over fixed (t, eps) draws.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import AttnProcessor

from .common import ArtefactError, generator, load_torch


# UNet2DModel arguments a configuration may set (absent: diffusers' defaults); the ddpm-cifar10 layout needs them
OPTIONAL_UNET_KEYS = ("norm_eps", "downsample_padding", "flip_sin_to_cos", "freq_shift", "resnet_time_scale_shift")


def build_model(model_cfg: dict, image_shape: tuple[int, int, int]) -> UNet2DModel:
    channels, size, _ = image_shape
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in model_cfg["attention"])
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(model_cfg["attention"]))
    model = UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels,
        layers_per_block=model_cfg["layers_per_block"], block_out_channels=tuple(model_cfg["block_out_channels"]),
        down_block_types=down, up_block_types=up, norm_num_groups=model_cfg["norm_num_groups"],
        attention_head_dim=model_cfg["attention_head_dim"],
        **{key: model_cfg[key] for key in OPTIONAL_UNET_KEYS if key in model_cfg},
    )
    # Plain matmul attention: same maths as SDPA, but torch.func.vmap has batching rules for it.
    for module in model.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(AttnProcessor())
    return model


def make_scheduler(diffusion_cfg: dict) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=diffusion_cfg["num_train_timesteps"], beta_start=diffusion_cfg["beta_start"],
                         beta_end=diffusion_cfg["beta_end"], beta_schedule="linear", clip_sample=True)


def alphas_cumprod(diffusion_cfg: dict) -> torch.Tensor:
    return make_scheduler(diffusion_cfg).alphas_cumprod.to(torch.float32)


def add_noise(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, a_bar: torch.Tensor) -> torch.Tensor:
    a = a_bar.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def predict_noise(model, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return model(x_t, t).sample


def simple_loss(model, x0, t, eps, a_bar) -> torch.Tensor:
    """Per-example ||eps - eps_theta(x_t, t)||^2 / D_pix, shape (batch,)."""
    prediction = predict_noise(model, add_noise(x0, t, eps, a_bar), t)
    return (eps - prediction).pow(2).flatten(1).mean(1)


def output_function(name: str, prediction: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Scalar output per example whose gradient defines a scorer's features (TRAK: loss; D-TRAK: the rest)."""
    flat, target = prediction.flatten(1), eps.flatten(1)
    if name == "loss":
        return (target - flat).pow(2).mean(1)
    if name == "mean-squared-l2-norm":
        return flat.pow(2).mean(1)
    if name == "mean":
        return flat.mean(1)
    if name == "l1-norm":
        return flat.abs().sum(1)
    if name == "l2-norm":
        return flat.pow(2).sum(1).sqrt()
    if name == "linf-norm":
        return flat.abs().amax(1)
    raise ValueError(f"unknown output function {name!r}")


def timestep_grid(num_train_timesteps: int, k: int) -> np.ndarray:
    """The uniform grid range(0, T, T // K) of the TRAK/D-TRAK papers."""
    if k > num_train_timesteps:
        raise ValueError(f"K={k} timesteps exceeds T={num_train_timesteps}")
    return np.arange(0, num_train_timesteps, num_train_timesteps // k)[:k]


def measurement_draws(n_queries: int, image_shape, n_timesteps: int, n_noise: int, num_train_timesteps: int,
                      seed: int, stream: int, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (t, eps) draws per query: t on a uniform grid, eps seeded per (stream, query).

    Every model sees the same draws, so differences between models are not Monte Carlo noise.
    `indices`: the draws of only these queries (of the same set), identical to theirs among all n_queries.
    """
    t_grid = np.linspace(0, num_train_timesteps - 1, n_timesteps).round().astype(np.int64)
    t = torch.from_numpy(np.repeat(t_grid, n_noise))
    queries = range(n_queries) if indices is None else [int(q) for q in indices]
    eps = torch.stack([torch.randn(len(t), *image_shape, generator=generator(seed, stream, q)) for q in queries])
    return t, eps


def save_checkpoint_payload(model: torch.nn.Module, config: dict, step: int, image_shape, kind: str = "ddpm-unet",
                            **extra) -> dict:
    return {"kind": kind, "state_dict": model.state_dict(), "config": config, "step": step,
            "image_shape": tuple(int(s) for s in image_shape), **extra}


def load_checkpoint(path, model_cfg: dict, kind: str, build, device="cpu", description: str = "DDPM UNet"):
    """Load a checkpoint of the given kind, checking that it was made with this model configuration;
    build(model_cfg, image_shape) makes the empty model. Returns (model in eval mode on device, payload)."""
    payload = load_torch(path)
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        raise ArtefactError(f"{path}: not a {description} checkpoint of this workflow")
    if payload["config"].get("model") != model_cfg:
        raise ArtefactError(f"{path}: made with model config {payload['config'].get('model')}, expected {model_cfg}")
    model = build(model_cfg, payload["image_shape"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ArtefactError(f"{path}: state dict does not fit the model ({exc})") from exc
    return model.to(device).eval(), payload


def load_model(path, model_cfg: dict, device="cpu") -> tuple[UNet2DModel, dict]:
    """Load a DDPM checkpoint, checking that it was made with this model configuration."""
    return load_checkpoint(path, model_cfg, "ddpm-unet", build_model, device)


def load_family_model(path, model_cfg: dict, device="cpu"):
    """The checkpoint of model_cfg's family (model.family): a DDPM UNet (ddpm, the default) or a VE-SDE score model
    (vesde, workflow_scripts/vesde.py). Returns (model in eval mode on device, payload)."""
    if model_cfg.get("family", "ddpm") == "vesde":
        from .vesde import load_model as load_vesde_model

        return load_vesde_model(path, model_cfg, device)
    return load_model(path, model_cfg, device)
