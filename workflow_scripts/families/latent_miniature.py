"""The miniature base pipeline of the latent family (model.pipeline null): what the DAG builds in place of miniSD.

It keeps every part of a Stable Diffusion base at a size this machine trains in minutes:
  - a small AutoencoderKL (one downsampling: 16x16 images -> 4 x 8 x 8 latents), trained to reconstruct;
  - a small CLIP text encoder over a character-level tokenizer of its own vocabulary (a-z; words end in </w>),
    randomly initialised and frozen (the UNet's cross-attention learns to read its fixed features);
  - a small UNet2DConditionModel with cross-attention, trained on the VAE's latents with caption dropout
    (base.caption_dropout) so that classifier-free guidance works.
The base sees only digits OUTSIDE the attribution pool (neither training nor held-out images), in negative (dark
strokes on white) and captioned "a {digit} in negative"; the pool's digits are white on black with captions
"a {digit} digit" that the base never read. The LoRA fine-tune therefore has a style and words to learn (the
findings page measures the change). The result is saved with StableDiffusionPipeline.save_pretrained and read
back through exactly the local-directory code path that reads miniSD (latent.load_components).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from workflow_scripts.core.common import check_training_loss, generator, log, rng
from workflow_scripts.families.ddpm import alphas_cumprod
from workflow_scripts.families.latent import DIGIT_NAMES, caption_embeddings

BASE_DEFAULTS = {
    "resolution": 16,  # digits are upsampled from 8x8 so that the autoencoder has room to downsample
    "vae_channels": [16, 32],
    "latent_channels": 4,
    "unet_channels": [32, 64],
    "text_width": 32,
    "text_layers": 2,
    "vae_steps": 600,
    "unet_steps": 1500,
    "batch_size": 64,
    "lr": 0.002,
    "caption_dropout": 0.1,
    "kl_weight": 1.0e-4,
}
VOCAB = "abcdefghijklmnopqrstuvwxyz"
MAX_TOKENS = 32
VAE_STREAM, UNET_STREAM, TEXT_STREAM = 71, 72, 73


def base_settings(config: dict) -> dict:
    return {**BASE_DEFAULTS, **config.get("base", {})}


def write_tokenizer(path: Path):
    """A CLIPTokenizer over single characters (every a-z, alone and word-final); no merges."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in VOCAB:
            vocab[c + suffix] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=MAX_TOKENS, pad_token="<|endoftext|>"
    )


def build_components(settings: dict, image_channels: int, vocab_size: int, seed: int) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(int(rng(seed, TEXT_STREAM).integers(2**31)))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=settings["text_width"],
            intermediate_size=2 * settings["text_width"],
            num_hidden_layers=settings["text_layers"],
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae_channels, unet_channels = tuple(settings["vae_channels"]), tuple(settings["unet_channels"])
    torch.manual_seed(int(rng(seed, VAE_STREAM).integers(2**31)))
    vae = AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=vae_channels,
        latent_channels=settings["latent_channels"],
        norm_num_groups=8,
        sample_size=settings["resolution"],
    )
    torch.manual_seed(int(rng(seed, UNET_STREAM).integers(2**31)))
    latent_size = settings["resolution"] // 2 ** (len(vae_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=settings["latent_channels"],
        out_channels=settings["latent_channels"],
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(unet_channels) - 1) + ("UpBlock2D",),
        block_out_channels=unet_channels,
        layers_per_block=1,
        cross_attention_dim=settings["text_width"],
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return {"text_encoder": text_encoder, "vae": vae, "unet": unet}


def base_images(digits: np.ndarray, labels: np.ndarray, resolution: int) -> tuple[torch.Tensor, np.ndarray]:
    """The base's images: the digits given, in negative, upsampled to the resolution."""
    x = -torch.from_numpy(np.asarray(digits, np.float32))
    x = nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x, np.asarray(labels, np.int64)


def base_captions() -> list[str]:
    return [f"a {name} in negative" for name in DIGIT_NAMES]


def pool_captions() -> list[str]:
    return [f"a {name} digit" for name in DIGIT_NAMES]


def train_vae(vae, images: torch.Tensor, settings: dict, seed: int) -> float:
    """Reconstruction (MSE) + kl_weight x KL; returns the final reconstruction error."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings["lr"])
    vae.train()
    error = float("nan")
    for step in tqdm(range(settings["vae_steps"]), desc="base vae", mininterval=5):
        g = generator(seed, VAE_STREAM, step)
        idx = torch.randint(0, len(images), (settings["batch_size"],), generator=g)
        posterior = vae.encode(images[idx]).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        reconstruction = vae.decode(z).sample
        error_t = (reconstruction - images[idx]).pow(2).mean()
        loss = error_t + settings["kl_weight"] * posterior.kl().mean() / images[0].numel()
        check_training_loss(
            loss.item(), step, settings["vae_steps"], "the miniature base's VAE", "base.lr", settings["lr"]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        error = error_t.item()
    vae.eval().requires_grad_(False)
    return error


def train_unet(unet, latents: torch.Tensor, cond: torch.Tensor, embeddings, settings, diffusion_cfg, seed) -> float:
    """The base's own denoising training (eps-prediction, caption dropout); returns the last loss."""
    a_bar = alphas_cumprod(diffusion_cfg)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings["lr"])
    unconditional = len(embeddings) - 1
    unet.train()
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(settings["unet_steps"]), desc="base unet", mininterval=5):
        g = generator(seed, UNET_STREAM, step)
        idx = torch.randint(0, len(latents), (settings["batch_size"],), generator=g)
        t = torch.randint(0, diffusion_cfg["num_train_timesteps"], (len(idx),), generator=g)
        eps = torch.randn(len(idx), *latents.shape[1:], generator=g)
        c = torch.where(torch.rand(len(idx), generator=g) < settings["caption_dropout"], unconditional, cond[idx])
        a = a_bar[t].view(-1, 1, 1, 1)
        prediction = unet(a.sqrt() * latents[idx] + (1 - a).sqrt() * eps, t, encoder_hidden_states=embeddings[c]).sample
        loss = (prediction - eps).pow(2).mean()
        check_training_loss(
            loss.item(), step, settings["unet_steps"], "the miniature base's UNet", "base.lr", settings["lr"]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    unet.eval().requires_grad_(False)
    return loss.item()


def build_and_pretrain(config: dict, digits: np.ndarray, labels: np.ndarray, out_dir) -> dict:
    """Build the miniature base, pretrain its VAE and UNet on `digits` (outside the pool), save it as a diffusers
    directory at out_dir (written next to it, then moved in place: a killed job leaves no half directory)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    settings, seed = base_settings(config), config["seeds"]["train"]
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = write_tokenizer(staging / "tokenizer-source")
    images, classes = base_images(digits, labels, settings["resolution"])
    parts = build_components(settings, images.shape[1], len(tokenizer), seed)
    vae_error = train_vae(parts["vae"], images, settings, seed)
    with torch.no_grad():
        raw = parts["vae"].encode(images).latent_dist.mode()
    parts["vae"].register_to_config(scaling_factor=float(1.0 / raw.std()))  # unit-variance latents, as SD's 0.18215
    latents = raw * parts["vae"].config.scaling_factor
    parts["text_encoder"].eval().requires_grad_(False)
    embeddings = caption_embeddings(parts["text_encoder"], tokenizer, base_captions())
    unet_loss = train_unet(
        parts["unet"], latents, torch.from_numpy(classes), embeddings, settings, config["diffusion"], seed
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=config["diffusion"]["num_train_timesteps"],
        beta_start=config["diffusion"]["beta_start"],
        beta_end=config["diffusion"]["beta_end"],
        beta_schedule=config["diffusion"].get("beta_schedule", "linear"),
        clip_sample=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=tokenizer,
        unet=parts["unet"],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(staging)
    shutil.rmtree(staging / "tokenizer-source")
    report = {
        "base_images": len(images),
        "vae_reconstruction_mse": vae_error,
        "unet_final_loss": unet_loss,
        "scaling_factor": parts["vae"].config.scaling_factor,
        "unet_parameters": sum(p.numel() for p in parts["unet"].parameters()),
    }
    (staging / "pretraining.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    log.info("base pipeline: %s", report)
    return report
