"""The DDPM model family: UNet2DModel builder, forward process, simple loss and output functions, training
(train_model), sampling (generate) and the loss measurement (measure_loss).

Notation follows docs/methods.md: x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) eps, and the per-example
simple loss ||eps - eps_theta(x_t, t)||^2 / D_pix averaged over fixed (t, eps) draws.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from workflow_scripts.core.common import (
    ArtefactError,
    TrainingResume,
    check_training_loss,
    generator,
    load_torch,
    rng,
    save_torch,
    select_device,
)
from workflow_scripts.core.precision import Precision, amp_mode
from workflow_scripts.core.seeds import (
    INIT_STREAM,
    NOISE_STREAM,
    batch_indices,
    image_seed,
    training_identity,
    training_seed,
)
from workflow_scripts.families.diffusers_unet import (
    AttnProcessor,
    DDIMScheduler,
    DDPMScheduler,
    UNet2DModel,
    get_cosine_schedule_with_warmup,
)

# UNet2DModel arguments a configuration may set (absent: diffusers' defaults); the ddpm-cifar10 layout needs them
OPTIONAL_UNET_KEYS = ("norm_eps", "downsample_padding", "flip_sin_to_cos", "freq_shift", "resnet_time_scale_shift")


def build_model(model_cfg: dict, image_shape: tuple[int, int, int]) -> UNet2DModel:
    channels, size, _ = image_shape
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in model_cfg["attention"])
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(model_cfg["attention"]))
    model = UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=model_cfg["layers_per_block"],
        block_out_channels=tuple(model_cfg["block_out_channels"]),
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=model_cfg["norm_num_groups"],
        attention_head_dim=model_cfg["attention_head_dim"],
        **{key: model_cfg[key] for key in OPTIONAL_UNET_KEYS if key in model_cfg},
    )
    # Plain matmul attention: same maths as SDPA, but torch.func.vmap has batching rules for it.
    for module in model.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(AttnProcessor())
    return model


def make_scheduler(diffusion_cfg: dict) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=diffusion_cfg["num_train_timesteps"],
        beta_start=diffusion_cfg["beta_start"],
        beta_end=diffusion_cfg["beta_end"],
        beta_schedule=diffusion_cfg.get("beta_schedule", "linear"),
        clip_sample=True,
    )


def alphas_cumprod(diffusion_cfg: dict) -> torch.Tensor:
    return make_scheduler(diffusion_cfg).alphas_cumprod.to(torch.float32)


def add_noise(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, a_bar: torch.Tensor) -> torch.Tensor:
    a = a_bar.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def predict_noise(model, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """eps_theta(x_t, t) of an unconditional model (a UNet2DModel's `.sample`, or a plain tensor), or
    eps_theta(x_t, t, cond) of a conditional one (families/latent.py: cond = caption indices)."""
    out = model(x_t, t) if cond is None else model(x_t, t, cond)
    return out.sample if hasattr(out, "sample") else out


def simple_loss(model, x0, t, eps, a_bar, cond=None) -> torch.Tensor:
    """Per-example ||eps - eps_theta(x_t, t[, cond])||^2 / D_pix, shape (batch,)."""
    prediction = predict_noise(model, add_noise(x0, t, eps, a_bar), t, cond)
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


def measurement_draws(
    n_queries: int,
    image_shape,
    n_timesteps: int,
    n_noise: int,
    num_train_timesteps: int,
    seed: int,
    stream: int,
    indices=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (t, eps) draws per query: t on a uniform grid, eps seeded per (stream, query).

    Every model sees the same draws, so differences between models are not Monte Carlo noise.
    `indices`: the draws of only these queries (of the same set), identical to theirs among all n_queries.
    """
    t_grid = np.linspace(0, num_train_timesteps - 1, n_timesteps).round().astype(np.int64)
    t = torch.from_numpy(np.repeat(t_grid, n_noise))
    queries = range(n_queries) if indices is None else [int(q) for q in indices]
    eps = torch.stack([torch.randn(len(t), *image_shape, generator=generator(seed, stream, q)) for q in queries])
    return t, eps


def save_checkpoint_payload(
    model: torch.nn.Module, config: dict, step: int, image_shape, kind: str = "ddpm-unet", **extra
) -> dict:
    return {
        "kind": kind,
        "state_dict": model.state_dict(),
        "config": config,
        "step": step,
        "image_shape": tuple(int(s) for s in image_shape),
        **extra,
    }


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


class Batch(NamedTuple):
    """One training step's examples and random draws."""

    idx: torch.Tensor  # (B,) training indices
    x0: torch.Tensor  # (B, *input shape) the model inputs the step trains on
    t: torch.Tensor  # (B,) timesteps
    eps: torch.Tensor  # (B, *input shape) noise
    cond: torch.Tensor | None  # (B,) conditions of a conditional family, None for an unconditional one


class TrainingBatches:
    """The batch of every step of train_model: a pure function of (seed, step) -- the members' data order of
    core.seeds.batch_indices, then (t, eps) from the step's NOISE_STREAM generator. eps takes the images' dtype."""

    def __init__(self, images: torch.Tensor, members, batch_size: int, seed: int, num_train_timesteps: int):
        self.images, self.members, self.batch_size = images, np.asarray(members), int(batch_size)
        self.seed, self.num_train_timesteps = seed, int(num_train_timesteps)

    def __call__(self, step: int) -> Batch:
        device = self.images.device
        idx = torch.from_numpy(batch_indices(self.members, self.batch_size, self.seed, step)).to(device)
        g = generator(self.seed, NOISE_STREAM, step)
        t = torch.randint(0, self.num_train_timesteps, (len(idx),), generator=g).to(device)
        eps = torch.randn(len(idx), *self.images.shape[1:], generator=g).to(device=device, dtype=self.images.dtype)
        return Batch(idx, self.images[idx], t, eps, None)


@dataclass
class TrainingReplay:
    """A family's training on ALL training examples, as the metagradient engine (engines/magic.py) replays it:
    the model as the training initialises it, the batch of every step, and the gradient clipping."""

    model: torch.nn.Module
    batches: Callable[[int], Batch]
    grad_clip: float | None  # None: the family does not clip (clip_grad_norm_ otherwise)


def weighted_identity(config: dict, members, replicate: int, weights=None) -> dict:
    """core.seeds.training_identity, plus the weights' hash for a weighted training (the fixed-seed ground truth is
    another model than the unweighted one)."""
    identity = training_identity(config, members, replicate)
    if weights is not None:
        identity["weights_sha256"] = hashlib.sha256(np.asarray(weights, np.float64).tobytes()).hexdigest()
    return identity


def initial_model(config: dict, image_shape, seed: int) -> UNet2DModel:
    """The UNet as a training with this seed starts (global-seed initialisation from INIT_STREAM)."""
    torch.manual_seed(int(rng(seed, INIT_STREAM).integers(2**31)))
    return build_model(config["model"], image_shape)


def train_model(
    config: dict,
    images: np.ndarray,
    members: np.ndarray,
    replicate: int,
    model_out: str | Path,
    checkpoint_paths: dict[int, str] | None = None,
    weights: np.ndarray | None = None,
    device: torch.device | None = None,
    stop_after: int | None = None,
) -> Path | None:
    """Train one model on images[members]; returns the final checkpoint path (None if stopped early).

    `checkpoint_paths` maps step -> path of intermediate checkpoints to keep (with the lr at that step).
    `weights` are optional per-example loss weights (1 = ordinary training).
    `stop_after` simulates an interruption after that many steps (tests).
    """
    device = device or select_device(config["compute"])
    train_cfg = config["train"]
    seed = training_seed(config, replicate)
    identity = weighted_identity(config, members, replicate, weights)
    model_out = Path(model_out)
    resume = TrainingResume(model_out, identity)

    model = initial_model(config, images.shape[1:], seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])
    schedule = get_cosine_schedule_with_warmup(
        optimizer, int(train_cfg["warmup_fraction"] * train_cfg["steps"]), train_cfg["steps"]
    )
    precision = Precision(amp_mode(config), device)
    start = resume.restore(model, optimizer, schedule, precision.scaler)

    a_bar = alphas_cumprod(config["diffusion"]).to(device)
    x_all = torch.from_numpy(images).to(device)
    w_all = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device)
    checkpoint_paths = checkpoint_paths or {}
    batches = TrainingBatches(x_all, members, train_cfg["batch_size"], seed, config["diffusion"]["num_train_timesteps"])
    model.train()
    progress = tqdm(range(start, train_cfg["steps"]), desc=f"train {model_out.parent.name}", mininterval=5, file=None)
    for step in progress:
        if stop_after is not None and step >= stop_after:
            return None
        batch = batches(step)
        with precision.autocast():
            per_example = simple_loss(model, batch.x0, batch.t, batch.eps, a_bar).float()  # float(): no-op in float32
        loss = per_example.mean() if w_all is None else (w_all[batch.idx] * per_example).mean()
        check_training_loss(loss.item(), step, train_cfg["steps"], str(model_out), "train.lr", train_cfg["lr"])
        optimizer.zero_grad(set_to_none=True)
        lr = schedule.get_last_lr()[0]
        precision.step(loss, model, optimizer, train_cfg["grad_clip"])
        schedule.step()
        done = step + 1
        if done in checkpoint_paths:
            save_torch(save_checkpoint_payload(model, identity, done, images.shape[1:], lr=lr), checkpoint_paths[done])
        if done % train_cfg["resume_every"] == 0 and done < train_cfg["steps"]:
            resume.save(done, model.state_dict(), optimizer, schedule, precision.scaler)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    save_torch(save_checkpoint_payload(model, identity, train_cfg["steps"], images.shape[1:]), model_out)
    resume.finish()
    return model_out


def make_sampling_scheduler(diffusion_cfg: dict, sample_cfg: dict):
    kwargs = dict(
        num_train_timesteps=diffusion_cfg["num_train_timesteps"],
        beta_start=diffusion_cfg["beta_start"],
        beta_end=diffusion_cfg["beta_end"],
        beta_schedule=diffusion_cfg.get("beta_schedule", "linear"),
        clip_sample=True,
    )
    if sample_cfg["scheduler"] == "ddim":
        scheduler = DDIMScheduler(**kwargs, set_alpha_to_one=True)
    else:
        scheduler = DDPMScheduler(**kwargs, variance_type="fixed_small")
    scheduler.set_timesteps(sample_cfg["num_inference_steps"])
    return scheduler


@torch.no_grad()
def generate(
    model,
    image_shape,
    diffusion_cfg: dict,
    sample_cfg: dict,
    sample_seed: int,
    n_images: int,
    device: torch.device,
    indices=None,
) -> dict[str, np.ndarray]:
    """DDIM (eta 0) or DDPM ancestral sampling; returns images, trajectories (x_T .. x_0) and timesteps.

    `indices` regenerates only those images (e.g. one query of a counterfactual): image i is the same
    whichever other images are generated with it (n_images is then ignored)."""
    scheduler = make_sampling_scheduler(diffusion_cfg, sample_cfg)
    indices = list(range(n_images)) if indices is None else [int(i) for i in indices]
    n_images = len(indices)
    generators = [generator(image_seed(sample_seed, i)) for i in indices]
    x = torch.stack([torch.randn(*image_shape, generator=g) for g in generators]).to(device)
    trajectory = [x.cpu()]
    for t in tqdm(scheduler.timesteps, desc=f"sample ({sample_cfg['scheduler']})", mininterval=5):
        eps = model(x, t.to(device).expand(n_images)).sample
        # Per-image stepping keeps each image's ancestral noise on its own generator.
        x = torch.cat(
            [
                scheduler.step(eps[i : i + 1].cpu(), t, x[i : i + 1].cpu(), generator=generators[i]).prev_sample
                for i in range(n_images)
            ]
        ).to(device)
        trajectory.append(x.cpu())
    images = x.clamp(-1, 1).cpu()
    return {
        "images": images.numpy(),
        "trajectories": torch.stack(trajectory, 1).numpy(),
        "timesteps": scheduler.timesteps.numpy(),
        "seeds": np.array([image_seed(sample_seed, i) for i in indices]),
    }


@torch.no_grad()
def measure_loss(
    model,
    images: np.ndarray,
    diffusion_cfg: dict,
    measure_cfg: dict,
    seed: int,
    stream: int,
    device: torch.device,
    indices=None,
    cond=None,
) -> np.ndarray:
    """Simple loss of each image, averaged over its fixed (t, eps) draws; float64 of shape (n_images,).

    `indices`: the images are these queries of their set (e.g. one generated query), measured with
    exactly the draws they get when the whole set is measured. `cond`: each image's condition (a conditional
    model's caption index), None for an unconditional model."""
    if indices is not None and len(indices) != len(images):
        raise ValueError(f"{len(indices)} query indices for {len(images)} images")
    a_bar = alphas_cumprod(diffusion_cfg).to(device)
    losses = np.zeros(len(images))
    batch = measure_cfg["batch_size"]
    query_index = range(len(images)) if indices is None else indices
    for q, image in enumerate(torch.from_numpy(images)):
        # one query's draws at a time (the same numbers: eps is seeded per query): all queries' eps at once would
        # be n_query x n_timesteps x n_noise images (CIFAR anchors, 1000 x 3000 x 3072 floats: 37 GB)
        t, eps = measurement_draws(
            len(images),
            images.shape[1:],
            measure_cfg["n_timesteps"],
            measure_cfg["n_noise"],
            diffusion_cfg["num_train_timesteps"],
            seed,
            stream,
            [query_index[q]],
        )
        total = 0.0
        for start in range(0, len(t), batch):
            tb = t[start : start + batch].to(device)
            x0 = image.to(device).expand(len(tb), *image.shape)
            c = None if cond is None else torch.full((len(tb),), int(cond[q]), dtype=torch.long, device=device)
            e = eps[0, start : start + batch].to(device)
            total += simple_loss(model, x0, tb, e, a_bar, c).double().sum().item()
        losses[q] = total / len(t)
    return losses


# ---------------------------------------------------------------- the model-family interface (families.registry)
def train_family_model(
    config: dict, dataset: dict, members, replicate: int, model_out, checkpoint_paths=None, weights=None
) -> None:
    train_model(config, dataset["train_images"], members, replicate, model_out, checkpoint_paths, weights=weights)


def checkpoint_identity(config: dict, dataset: dict, members, replicate: int, weights=None) -> dict:
    """The identity train_family_model records in its checkpoints (the dataset does not enter it)."""
    return weighted_identity(config, members, replicate, weights)


def training_replay(config: dict, dataset: dict, replicate: int, device="cpu", dtype=torch.float32) -> TrainingReplay:
    """train_model on all of dataset's training images: clip_grad_norm_ at every step (train.grad_clip)."""
    images = dataset["train_images"]
    seed = training_seed(config, replicate)
    x = torch.as_tensor(np.asarray(images), dtype=dtype, device=device)
    batches = TrainingBatches(
        x, np.arange(len(x)), config["train"]["batch_size"], seed, config["diffusion"]["num_train_timesteps"]
    )
    return TrainingReplay(initial_model(config, images.shape[1:], seed), batches, float(config["train"]["grad_clip"]))


def sampler_name(config: dict) -> str:
    return config["sample"]["scheduler"]


def generate_images(model, image_shape, config: dict, device, n_images: int, indices=None) -> dict:
    """DDIM / DDPM sampling with the sample section's scheduler and per-image seeds."""
    return generate(
        model, image_shape, config["diffusion"], config["sample"], config["seeds"]["sample"], n_images, device, indices
    )
