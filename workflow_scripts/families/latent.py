"""The latent, text-conditional model family (model.family latent): LoRA fine-tunes of a Stable-Diffusion-style
base pipeline, attributed to the fine-tuning images.

The base is a diffusers directory (AutoencoderKL `vae`, CLIP `text_encoder` + `tokenizer`, UNet2DConditionModel
`unet`, a DDPM-type `scheduler`) read with `from_pretrained` from a LOCAL directory: the published miniSD
(`lambdalabs/miniSD-diffusers`, configs/artbench*.yaml) or the miniature base that the DAG itself pretrains
(stage base_pipeline, `build_miniature` / `pretrain_miniature` below). Everything the base holds is frozen; the
only trainable parameters are peft LoRA adapters on the UNet's attention projections (model.lora.targets).

Model inputs are VAE latents, vae.encode(x).latent_dist.mode() * scaling_factor, encoded once per data set
(stage encode, `encode_images`): latents.npz has the same keys as the data stage's dataset.npz, so every stage
that trains, measures or differentiates a model reads it where a pixel family reads dataset.npz. The condition
of an example is the index of its caption in the data set's caption table (one caption per class, e.g.
"a post impressionism painting"); index len(captions) is the empty caption of classifier-free guidance.

`LatentDenoiser` is the model every engine sees: forward(x_t, t, cond) -> eps_theta(x_t, t, caption[cond]). Its
frozen weights are BUFFERS, not parameters, so `named_parameters()` -- which the training optimiser, the gradient
stores, the projections, K-FAC and the metagradient all iterate over -- yields the LoRA parameters alone.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import numpy as np
import torch
from torch import nn
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
from workflow_scripts.core.seeds import INIT_STREAM, image_seed, training_seed
from workflow_scripts.families.ddpm import (
    Batch,
    TrainingBatches,
    TrainingReplay,
    alphas_cumprod,
    simple_loss,
    weighted_identity,
)

CHECKPOINT_KIND = "latent-lora"
CONDITIONAL = True  # the denoiser takes a caption index per example (families.registry.is_conditional)
LORA_DEFAULTS = {"rank": 4, "alpha": 4, "targets": ["to_q", "to_k", "to_v", "to_out.0"]}
# Streams of seeds.train for the fine-tuning's own draws (the shared ones: core/seeds.py)
CAPTION_DROPOUT_STREAM, FLIP_STREAM = 61, 62
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class PipelineMissing(FileNotFoundError):
    """The base pipeline directory named by model.pipeline is absent or incomplete."""


# ---------------------------------------------------------------------------------------------- the base pipeline
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_pipeline_dir(path) -> Path:
    """The base pipeline directory, checked before anything loads from it (never downloaded at run time)."""
    path = Path(path)
    missing = [part for part in ("model_index.json", *PIPELINE_PARTS) if not (path / part).exists()]
    if missing:
        raise PipelineMissing(
            f"model.pipeline: {path} is not a diffusers pipeline directory (missing: {', '.join(missing)}). "
            "Fetch the published base once with: huggingface-cli download lambdalabs/miniSD-diffusers "
            f"--local-dir {shlex.quote(str(path))}   (or set model.pipeline: null for the miniature base the workflow pretrains)"
        )
    return path


def pipeline_digest(path) -> str:
    """sha256 over the pipeline's weight and config files (names and bytes): which base a LoRA belongs to."""
    h = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(root)).encode())
        h.update(file.read_bytes())
    return h.hexdigest()


BASE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def base_dtype(model_cfg: dict, device) -> torch.dtype:
    """model.base_dtype of the frozen base (UNet, VAE, text encoder): `auto` (the default) is float16 on a GPU, as
    the published fine-tunes hold it, and float32 elsewhere. The LoRA parameters are float32 in every case."""
    name = model_cfg.get("base_dtype", "auto")
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return BASE_DTYPES[name]


def load_components(path, device="cpu", dtype=torch.float32) -> dict:
    """unet, vae, text_encoder (frozen, eval, in `dtype`), tokenizer and the scheduler config of a local pipeline
    directory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = check_pipeline_dir(path)
    parts = {
        "unet": UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype, local_files_only=True),
        "vae": AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, local_files_only=True),
        "text_encoder": CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype, local_files_only=True),
    }
    for module in parts.values():
        module.requires_grad_(False).to(device).eval()
    parts["tokenizer"] = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    parts["scheduler_config"] = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return parts


def check_scheduler(scheduler_config: dict, diffusion_cfg: dict, path) -> None:
    """The DAG's diffusion section must describe the pipeline's forward process (the engines use it)."""
    expected = {
        "num_train_timesteps": diffusion_cfg["num_train_timesteps"],
        "beta_start": diffusion_cfg["beta_start"],
        "beta_end": diffusion_cfg["beta_end"],
        "beta_schedule": diffusion_cfg.get("beta_schedule", "linear"),
    }
    for key, value in expected.items():
        got = scheduler_config.get(key)
        if got != value and not (isinstance(value, float) and np.isclose(got, value)):
            raise ArtefactError(f"diffusion.{key} is {value!r}, but the pipeline {path} was trained with {got!r}")


@torch.no_grad()
def caption_embeddings(text_encoder, tokenizer, captions, device="cpu") -> torch.Tensor:
    """(len(captions) + 1, L, E) last hidden states of the frozen text encoder; the last row is the empty caption."""
    tokens = tokenizer(
        [*captions, ""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return text_encoder(tokens.input_ids.to(device))[0].float()


class LatentDenoiser(nn.Module):
    """eps_theta(x_t, t, cond) of the LoRA-adapted UNet conditioned on caption[cond] (cond = len(captions): empty).

    Only the LoRA weights are parameters (see the module docstring)."""

    conditional = True

    def __init__(self, unet, embeddings: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.register_buffer("embeddings", embeddings.to(self.base_dtype), persistent=False)

    @property
    def base_dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype  # not unet.dtype: that reads the (float32) LoRA parameters

    @property
    def unconditional(self) -> int:
        return len(self.embeddings) - 1

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # a reduced-precision base computes in its dtype (peft runs the float32 LoRA branch in float32 and adds it
        # back in the base's dtype); the prediction, and so every loss and gradient, is at least float32
        prediction = self.unet(x_t.to(self.base_dtype), t, encoder_hidden_states=self.embeddings[cond]).sample
        return prediction.to(torch.promote_types(prediction.dtype, torch.float32))  # float64 (tests) stays float64


def freeze_to_buffers(module: nn.Module) -> None:
    """Turn every parameter that does not require grad into a buffer of the same name and tensor."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and not p.requires_grad:
                del sub._parameters[name]
                sub.register_buffer(name, p.data)


def lora_settings(model_cfg: dict) -> dict:
    return {**LORA_DEFAULTS, **model_cfg.get("lora", {})}


def add_lora(unet, model_cfg: dict, seed: int) -> None:
    """peft LoRA adapters (model.lora: rank, alpha, targets) on the UNet, initialised from the seed; B = 0, so the
    adapted UNet starts as the base."""
    from diffusers.models.attention_processor import AttnProcessor
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    settings = lora_settings(model_cfg)
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(
            r=settings["rank"],
            lora_alpha=settings["alpha"],
            target_modules=list(settings["targets"]),
            init_lora_weights="gaussian",
        )
    )
    cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights stay float32 on a float16 base
    # Plain matmul attention: same maths as SDPA, and torch.func.vmap has batching rules for it.
    unet.set_attn_processor(AttnProcessor())
    freeze_to_buffers(unet)


def lora_state(model: LatentDenoiser) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def make_denoiser(pipeline, model_cfg: dict, captions, seed: int, device) -> tuple[LatentDenoiser, dict]:
    parts = load_components(pipeline, device, base_dtype(model_cfg, device))
    add_lora(parts["unet"], model_cfg, seed)
    embeddings = caption_embeddings(parts["text_encoder"], parts["tokenizer"], list(captions), device)
    model = LatentDenoiser(parts["unet"], embeddings).to(device)
    return model, parts


def load_model(path, model_cfg: dict, device="cpu") -> tuple[LatentDenoiser, dict]:
    """A LoRA checkpoint on its base pipeline (the one it was trained on, checked by digest)."""
    payload = load_torch(path)
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        raise ArtefactError(f"{path}: not a LoRA checkpoint of the latent family")
    if payload["config"].get("model") != model_cfg:
        raise ArtefactError(f"{path}: made with model config {payload['config'].get('model')}, expected {model_cfg}")
    model, parts = make_denoiser(payload["pipeline"], model_cfg, payload["captions"], 0, device)
    try:
        model.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as exc:
        raise ArtefactError(f"{path}: LoRA weights do not fit the model ({exc})") from exc
    missing = set(dict(model.named_parameters())) - set(payload["state_dict"])
    if missing:
        raise ArtefactError(f"{path}: LoRA weights missing for {sorted(missing)[:3]} ...")
    # for sampling and the figures; plain attributes (not submodules: no parameters, not in the state dict)
    object.__setattr__(model, "vae", parts["vae"])
    model.scheduler_config, model.captions = parts["scheduler_config"], list(payload["captions"])
    return model.eval(), payload


# ---------------------------------------------------------------------------------------------- model inputs
def encode_resolution(data_cfg: dict, vae_config) -> int:
    """The image size the encode stage gives the VAE: data.resolution when the data set has one (ArtBench's 256 px
    for miniSD, whatever the VAE config's sample_size says), else the VAE's own sample_size (the miniature base
    upsamples the 8x8 digits to it)."""
    return int(data_cfg.get("resolution") or vae_config["sample_size"])


@torch.no_grad()
def encode_images(vae, images: np.ndarray, batch_size: int, device, resolution: int | None = None) -> np.ndarray:
    """VAE latents mode() * scaling_factor of images in [-1, 1] (n, C, H, W), resized to `resolution` first."""
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="encode", mininterval=5):
        x = torch.from_numpy(np.asarray(images[start : start + batch_size], np.float32)).to(device)
        if resolution and x.shape[-1] != resolution:
            x = nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        x = x.to(vae.dtype)
        out.append((vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    return vae.decode(latents).sample.clamp(-1, 1).float().cpu().numpy()


# ---------------------------------------------------------------------------------------------- fine-tuning
class FineTuningBatches(TrainingBatches):
    """The batch of every fine-tuning step: the DDPM training's (indices, t, eps), then per example from the step's
    CAPTION_DROPOUT_STREAM generator a caption-dropout draw (to the empty caption) and a horizontal-flip draw of
    the latent, in that order."""

    def __init__(self, config: dict, latents: torch.Tensor, labels: torch.Tensor, members, seed: int, unconditional):
        super().__init__(
            latents, members, config["train"]["batch_size"], seed, config["diffusion"]["num_train_timesteps"]
        )
        self.labels, self.unconditional = labels, int(unconditional)
        self.dropout = float(config["model"].get("caption_dropout", 0.0))

    def __call__(self, step: int) -> Batch:
        batch = super().__call__(step)
        device, n = self.images.device, len(batch.idx)
        extra = generator(self.seed, CAPTION_DROPOUT_STREAM, step)
        drop = torch.rand(n, generator=extra).to(device) < self.dropout
        flip = (torch.rand(n, generator=extra) < 0.5).to(device)
        labels = self.labels[batch.idx]
        return batch._replace(
            x0=torch.where(flip.view(-1, 1, 1, 1), batch.x0.flip(-1), batch.x0),
            cond=torch.where(drop, torch.full_like(labels, self.unconditional), labels),
        )


def init_seed(seed: int) -> int:
    """The LoRA initialisation seed of a fine-tuning with training seed `seed`."""
    return int(rng(seed, INIT_STREAM).integers(2**31))


def fine_tuning_setup(config: dict, dataset: dict, members, replicate: int, device, dtype=torch.float32):
    """(model with freshly initialised LoRA, base components, FineTuningBatches) of a fine-tuning on dataset's
    latents[members] with their captions: what train_family_model and its replay (training_replay) start from."""
    captions, pipeline = [str(c) for c in dataset["captions"]], str(dataset["pipeline"])
    seed = training_seed(config, replicate)
    model, parts = make_denoiser(pipeline, config["model"], captions, init_seed(seed), device)
    check_scheduler(parts["scheduler_config"], config["diffusion"], pipeline)
    latents = torch.as_tensor(np.asarray(dataset["train_images"]), dtype=dtype, device=device)
    labels = torch.as_tensor(np.asarray(dataset["train_labels"], np.int64), device=device)
    return model, parts, FineTuningBatches(config, latents, labels, members, seed, model.unconditional)


def checkpoint_identity(config: dict, dataset: dict, members, replicate: int, weights=None) -> dict:
    """What a LoRA checkpoint records: the training's identity and the base pipeline it belongs to."""
    return {
        **weighted_identity(config, members, replicate, weights),
        "pipeline_sha256": str(dataset["pipeline_sha256"]),
    }


def training_replay(config: dict, dataset: dict, replicate: int, device="cpu", dtype=torch.float32) -> TrainingReplay:
    """train_family_model on all training latents: clip_grad_norm_ only when train.grad_clip is set."""
    members = np.arange(len(dataset["train_images"]))
    model, _, batches = fine_tuning_setup(config, dataset, members, replicate, device, dtype)
    if model.base_dtype == torch.float16:  # its training scales the loss and skips overflowing steps
        raise ValueError(
            "the metagradient replays float32 fine-tuning: a float16 base (model.base_dtype, auto on a GPU) trains "
            "with loss scaling, which the replay does not follow; set model.base_dtype: float32"
        )
    return TrainingReplay(
        model, batches, float(config["train"]["grad_clip"]) if config["train"].get("grad_clip") else None
    )


def train_family_model(
    config: dict, dataset: dict, members, replicate: int, model_out, checkpoint_paths=None, weights=None
) -> None:
    """LoRA fine-tuning on dataset's latents[members] with their captions (AdamW, cosine with warm-up, random
    horizontal flips of the latent, caption dropout model.caption_dropout). Resumable bit-identically."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    device = select_device(config["compute"])
    train_cfg = config["train"]
    latents = dataset["train_images"]
    captions, pipeline = [str(c) for c in dataset["captions"]], str(dataset["pipeline"])
    identity = checkpoint_identity(config, dataset, members, replicate, weights)
    model_out = Path(model_out)
    resume = TrainingResume(model_out, identity)

    model, _, batches = fine_tuning_setup(config, dataset, members, replicate, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])
    schedule = get_cosine_schedule_with_warmup(
        optimizer, int(train_cfg["warmup_fraction"] * train_cfg["steps"]), train_cfg["steps"]
    )
    # a float16 base: the activations' gradients would underflow for small losses, so scale the loss (as the
    # published fine-tunes' mixed precision does); the LoRA gradients are unscaled before clipping and stepping
    scaler = torch.amp.GradScaler(device.type) if model.base_dtype == torch.float16 else None
    start = resume.restore(model, optimizer, schedule, scaler, strict=False)  # the LoRA weights alone

    a_bar = alphas_cumprod(config["diffusion"]).to(device)
    w_all = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device)
    checkpoint_paths = checkpoint_paths or {}

    def payload(step, **extra):
        return {
            "kind": CHECKPOINT_KIND,
            "state_dict": lora_state(model),
            "config": identity,
            "step": step,
            "image_shape": tuple(int(s) for s in latents.shape[1:]),
            "captions": captions,
            "pipeline": pipeline,
            **extra,
        }

    model.train()
    progress = tqdm(range(start, train_cfg["steps"]), desc=f"train {model_out.parent.name}", mininterval=5)
    for step in progress:
        batch = batches(step)
        per_example = simple_loss(model, batch.x0, batch.t, batch.eps, a_bar, batch.cond)
        loss = per_example.mean() if w_all is None else (w_all[batch.idx] * per_example).mean()
        check_training_loss(loss.item(), step, train_cfg["steps"], str(model_out), "train.lr", train_cfg["lr"])
        optimizer.zero_grad(set_to_none=True)
        lr = schedule.get_last_lr()[0]
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        if train_cfg.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg["grad_clip"])
        if scaler is None:
            optimizer.step()
        else:  # skips a step whose gradients overflowed
            scaler.step(optimizer)
            scaler.update()
        schedule.step()
        done = step + 1
        if done in checkpoint_paths:
            save_torch(payload(done, lr=lr), checkpoint_paths[done])
        if done % train_cfg["resume_every"] == 0 and done < train_cfg["steps"]:
            resume.save(done, lora_state(model), optimizer, schedule, scaler)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    save_torch(payload(train_cfg["steps"]), model_out)
    resume.finish()


# ---------------------------------------------------------------------------------------------- sampling
def prompt_labels(n_captions: int, indices) -> np.ndarray:
    """Generated query i uses caption i mod n_captions: an equal share per prompt, independent of the others."""
    return np.asarray([int(i) % n_captions for i in indices], np.int64)


def guidance_scale(sample_cfg: dict) -> float:
    """sample.guidance_scale, Stable Diffusion's customary 7.5 when absent."""
    return float(sample_cfg.get("guidance_scale", 7.5))


def guided_noise_prediction(model: LatentDenoiser, x, t, cond, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + guidance (eps_c - eps_u) of the prompts `cond`, both in one batch."""
    uncond = torch.full_like(cond, model.unconditional)
    eps_u, eps_c = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def sampling_scheduler(model: LatentDenoiser, sample_cfg: dict):
    from diffusers import DDIMScheduler, DDPMScheduler

    config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    if sample_cfg["scheduler"] == "ddim":
        scheduler = DDIMScheduler.from_config(config)
    else:
        scheduler = DDPMScheduler.from_config(config)
    scheduler.set_timesteps(sample_cfg["num_inference_steps"])
    return scheduler


@torch.no_grad()
def generate_images(model: LatentDenoiser, image_shape, config: dict, device, n_images: int, indices=None) -> dict:
    """DDIM (eta 0) / DDPM sampling with classifier-free guidance (sample.guidance_scale) in latent space.

    `images` are the final latents (the model inputs of the generated queries), `decoded` their VAE decodings,
    `labels` the caption index of each query and `prompts` its caption."""
    sample_cfg = config["sample"]
    guidance = guidance_scale(sample_cfg)
    indices = list(range(n_images)) if indices is None else [int(i) for i in indices]
    scheduler = sampling_scheduler(model, sample_cfg)
    seeds = [image_seed(config["seeds"]["sample"], i) for i in indices]
    generators = [generator(s) for s in seeds]
    x = torch.stack([torch.randn(*image_shape, generator=g) for g in generators]).to(device)
    x = x * scheduler.init_noise_sigma
    labels = prompt_labels(model.unconditional, indices)
    cond = torch.from_numpy(labels).to(device)
    trajectory = [x.cpu()]
    for t in tqdm(scheduler.timesteps, desc=f"sample ({sample_cfg['scheduler']}, guidance {guidance})", mininterval=5):
        tt = t.to(device).expand(len(x))
        eps = guided_noise_prediction(model, x, tt, cond, guidance)
        x = torch.cat(
            [
                scheduler.step(eps[i : i + 1].cpu(), t, x[i : i + 1].cpu(), generator=generators[i]).prev_sample
                for i in range(len(x))
            ]
        ).to(device)
        trajectory.append(x.cpu())
    return {
        "images": x.cpu().numpy(),
        "decoded": decode_latents(model.vae, x),
        "labels": labels,
        "prompts": np.asarray([model_caption(model, c) for c in labels]),
        "trajectories": torch.stack(trajectory, 1).numpy(),
        "timesteps": scheduler.timesteps.numpy(),
        "seeds": np.asarray(seeds),
    }


def model_caption(model: LatentDenoiser, index: int) -> str:
    return model.captions[int(index)]


def sampler_name(config: dict) -> str:
    return f"{config['sample']['scheduler']} + classifier-free guidance {guidance_scale(config['sample'])}"
