"""Stage `sample`: generate the query images from the full model, keeping every sampling trajectory
(model.family vesde: the probability-flow ODE of vesde.generate_vesde).

Image i starts from, and draws its ancestral noise from, its own generator seeded with
seeds.sample * 1000 + i, so an image does not depend on how many others are generated with it.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm import tqdm

from .common import generator, log, save_npz, select_device
from .diffusion import load_family_model


def make_sampling_scheduler(diffusion_cfg: dict, sample_cfg: dict):
    kwargs = dict(num_train_timesteps=diffusion_cfg["num_train_timesteps"], beta_start=diffusion_cfg["beta_start"],
                  beta_end=diffusion_cfg["beta_end"], beta_schedule="linear", clip_sample=True)
    if sample_cfg["scheduler"] == "ddim":
        scheduler = DDIMScheduler(**kwargs, set_alpha_to_one=True)
    else:
        scheduler = DDPMScheduler(**kwargs, variance_type="fixed_small")
    scheduler.set_timesteps(sample_cfg["num_inference_steps"])
    return scheduler


def image_seed(sample_seed: int, i: int) -> int:
    return sample_seed * 1000 + i


@torch.no_grad()
def generate(model, image_shape, diffusion_cfg: dict, sample_cfg: dict, sample_seed: int, n_images: int,
             device: torch.device, indices=None) -> dict[str, np.ndarray]:
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
        x = torch.cat([scheduler.step(eps[i : i + 1].cpu(), t, x[i : i + 1].cpu(), generator=generators[i]).prev_sample
                       for i in range(n_images)]).to(device)
        trajectory.append(x.cpu())
    images = x.clamp(-1, 1).cpu()
    return {"images": images.numpy(), "trajectories": torch.stack(trajectory, 1).numpy(),
            "timesteps": scheduler.timesteps.numpy(), "seeds": np.array([image_seed(sample_seed, i) for i in indices])}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)


def generate_images(model, image_shape, config: dict, device, n_images: int | None = None, indices=None) -> dict:
    """generate() for the configured model family; vesde: the probability-flow ODE (vesde.generate_vesde) with
    sample.num_inference_steps Heun steps, from the same per-image seeds (sample.scheduler is a DDPM setting)."""
    n_images = config["sample"]["n_generated"] if n_images is None else n_images
    if config["model"].get("family", "ddpm") == "vesde":
        from .vesde import generate_vesde, vesde_settings

        return generate_vesde(model, image_shape, vesde_settings(config["model"]), config["sample"]["num_inference_steps"],
                              config["seeds"]["sample"], n_images, device, indices)
    return generate(model, image_shape, config["diffusion"], config["sample"], config["seeds"]["sample"], n_images,
                    device, indices)


def run(args, config: dict) -> None:
    device = select_device(config["compute"])
    model, payload = load_family_model(args.model, config["model"], device)
    result = generate_images(model, payload["image_shape"], config, device)
    save_npz(args.out, **result)
    sampler = "probability-flow ODE (Heun)" if config["model"].get("family") == "vesde" else config["sample"]["scheduler"]
    log.info("sample: %d images with %s, %d steps", len(result["images"]), sampler, len(result["timesteps"]))
