"""Expected GPU-hours of the paper-scale configurations: the pixel-space DDPM overlays (configs/cifar2.yaml,
cifar10.yaml, mnist.yaml, celeba.yaml) and the latent family's (configs/artbench2.yaml, artbench5.yaml; the CPU
miniature configs/latent.yaml is priced the same way).

    python benchmarks/gpu_hours.py [--configs cifar2 cifar10 mnist celeba artbench2 artbench5] [--no-cpu]
                                   [--batch 4] [--threads 2] [--gpu-tflops 312] [--util-batched 0.3]
                                   [--util-per-example 0.15]

1. Builds the configuration's network and counts, with torch.utils.flop_counter (matmuls and convolutions;
   elementwise work is not counted), the FLOPs per image of one forward pass and of one training step (forward +
   backward of the simple loss w.r.t. the trained parameters). The count only needs shapes, so it runs on the meta
   device: nothing is allocated, not even for Stable Diffusion's 860M-parameter UNet. Unless --no-cpu, the network
   is also built on the CPU and the seconds of a training step of --batch images are measured.
   - pixel families: the DDPM UNet2DModel of model.*.
   - latent family: the LoRA-adapted UNet2DConditionModel (model.lora, families/latent.py: add_lora,
     LatentDenoiser) of the base pipeline: the unet/vae/text_encoder configs of the local directory model.pipeline
     if it is there, else the miniature base's architecture (model.pipeline null, families/latent_miniature.py),
     else the published miniSD architecture written below. Only the LoRA weights get gradients, so a training step
     costs less than three forward passes. The VAE's encoder and decoder passes are counted too.
2. Counts the network passes of every stage of the configuration's DAG (the same functions the Snakefile uses:
   workflow_scripts/dag/paths.py), in forward-pass equivalents: a training image = one forward + backward (the counted
   training-step FLOPs); a per-example gradient = the same; a DAS vector-output sketch with r directions = one
   forward + r backward passes. Latent family: a sampling step with classifier-free guidance = 2 forward passes (the
   sample and regenerate stages), + one VAE decoder pass per image made; the encode stage = one VAE encoder pass per
   training and held-out image; the base_pipeline stage (miniature base only) = its pretraining steps; the text
   encoder's few passes (one caption table per job) are left out. Methods the family refuses are absent from the
   configuration and cost nothing.
3. Converts to GPU-hours with an assumed GPU: --gpu-tflops dense bf16 peak (A100: 312) at an assumed utilisation,
   --util-batched for batched training / sampling / measurement and --util-per-example for the per-example
   gradient stages (torch.func vmap over examples, far from peak). Every assumption is printed with the table.

Not counted: the scores stage's linear algebra (CPU, minutes), the classifier (seconds), data loading, job start-up.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.dag import paths
from workflow_scripts.dag.config import image_size, load_config
from workflow_scripts.families.ddpm import alphas_cumprod, build_model, predict_noise, simple_loss
from workflow_scripts.families.latent import LatentDenoiser, add_lora, encode_resolution, lora_settings
from workflow_scripts.families.latent_miniature import MAX_TOKENS, base_settings, build_components, write_tokenizer
from workflow_scripts.families.likelihood import measure_settings, model_family

# benchmarks/metagradient_cost.py (digits default model, CPU): training runs per metagradient job and per query
METAGRADIENT_JOB_RUNS, METAGRADIENT_QUERY_RUNS = 3.0, 2.6
# a full-weight training step in forward passes (the pixel UNet's measured ratio): the miniature base's pretraining
FULL_TRAINING_STEP = 3.0

CHANNELS = {
    "digits": 1,
    "mnist": 1,
    "cifar10": 3,
    "cifar2": 3,
    "artbench2": 3,
    "artbench5": 3,
    "artbench10": 3,
    "celeba": 3,
}

# lambdalabs/miniSD-diffusers, the base of configs/artbench*.yaml when its directory is not here: Stable Diffusion
# v1's UNet (860M parameters), AutoencoderKL and CLIP ViT-L/14 text encoder, fine-tuned at 256 px (latents 4x32x32)
MINISD = {
    "unet": {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    },
    "vae": {
        "sample_size": 256,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "scaling_factor": 0.18215,
    },
    "text": (77, 768),  # caption embeddings: tokens x width
    "source": "published miniSD architecture (lambdalabs/miniSD-diffusers, not found locally)",
}


def image_shape(config: dict) -> tuple[int, int, int]:
    size = image_size(config["data"])
    return CHANNELS[config["data"]["dataset"]], size, size


def latent_architecture(config: dict) -> dict:
    """The base pipeline's unet and vae configs and caption-embedding shape: those of its local directory
    (model.pipeline, or the miniature the DAG pretrained), else the miniature base's (model.pipeline null), else
    the published miniSD."""
    directory = REPO / paths.base_pipeline_dir(config)
    if (directory / "unet" / "config.json").is_file():
        read = lambda part: json.loads((directory / part / "config.json").read_text())  # noqa: E731
        text = read("text_encoder")
        return {
            "unet": read("unet"),
            "vae": read("vae"),
            "text": (text["max_position_embeddings"], text["hidden_size"]),
            "source": f"configs of {directory}",
        }
    if config["model"].get("pipeline"):
        return MINISD
    settings = base_settings(config)
    with tempfile.TemporaryDirectory() as tmp, torch.device("meta"):
        vocabulary = len(write_tokenizer(Path(tmp)))
        parts = build_components(settings, CHANNELS[config["data"]["dataset"]], vocabulary, seed=0)
    return {
        "unet": dict(parts["unet"].config),
        "vae": dict(parts["vae"].config),
        "text": (MAX_TOKENS, settings["text_width"]),
        "source": "miniature base (families/latent_miniature.py, section base)",
    }


def latent_shape(config: dict, vae_config: dict) -> tuple[int, int, int]:
    """The encode stage's latents: images at latent.encode_resolution, downsampled once per VAE block but the last."""
    size = encode_resolution(config["data"], vae_config) // 2 ** (len(vae_config["block_out_channels"]) - 1)
    return vae_config["latent_channels"], size, size


def network(config: dict, device) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """The configuration's denoiser on `device` with random weights (its FLOPs and speed do not depend on them) and
    its input shape."""
    if model_family(config["model"]) != "latent":
        shape = image_shape(config)
        with torch.device(device):
            return build_model(config["model"], shape), shape
    from diffusers import UNet2DConditionModel

    arch = latent_architecture(config)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(arch["unet"]).requires_grad_(False)  # frozen, as load_components
        add_lora(unet, config["model"], seed=0)
        # one caption and the empty one: the length of the caption table does not change the cost of a pass
        model = LatentDenoiser(unet, torch.zeros(2, *arch["text"]))
    return model, latent_shape(config, arch["vae"])


def count_flops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def vae_flops(config: dict, vae_config: dict) -> dict:
    """FLOPs per image of the VAE encoder at the encode stage's resolution (latent.encode_resolution) and of the
    decoder."""
    from diffusers import AutoencoderKL

    size = encode_resolution(config["data"], vae_config)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config)
        x = torch.zeros(1, vae.config.in_channels, size, size)
    z = vae.encode(x).latent_dist.mode()
    return {
        "encode_flops": count_flops(lambda: vae.encode(x).latent_dist.mode()),
        "decode_flops": count_flops(lambda: vae.decode(z).sample),
        "vae_resolution": size,
    }


def training_inputs(config: dict, model, shape, batch: int, device) -> tuple:
    """(x0, t, eps, a_bar, cond) of a simple-loss step; cond (caption 0) only for a conditional model."""
    generator = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, batch, *shape, generator=generator).to(device)
    t = torch.randint(0, config["diffusion"]["num_train_timesteps"], (batch,), generator=generator).to(device)
    cond = torch.zeros(batch, dtype=torch.long, device=device) if getattr(model, "conditional", False) else None
    return x, t, eps, alphas_cumprod(config["diffusion"]).to(device), cond


def cpu_seconds_per_step(config: dict, batch: int, repeats: int = 2) -> float:
    """CPU seconds of a training step (AdamW over the trained parameters) of `batch` images, min after a warm-up."""
    torch.manual_seed(0)
    model, shape = network(config, "cpu")
    inputs = training_inputs(config, model, shape, batch, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds = []
    for _ in range(repeats + 1):  # the first step warms up
        start = time.perf_counter()
        optimizer.zero_grad()
        simple_loss(model, *inputs).mean().backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return min(seconds[1:])


def measure_model(config: dict, batch: int, cpu: bool = True) -> dict:
    """FLOPs per image of a forward pass and of a training step (counted on the meta device), the latent family's
    VAE passes, and (cpu) the CPU seconds per training step of `batch` images."""
    model, shape = network(config, "meta")
    x, t, eps, a_bar, cond = training_inputs(config, model, shape, batch, "meta")
    with torch.no_grad():
        forward = count_flops(lambda: predict_noise(model, x, t, cond)) / batch
    cost = {
        # the latent family's frozen base is held in buffers: the state dict has base + LoRA, parameters LoRA only
        "params": sum(v.numel() for v in model.state_dict().values()),
        "trained": sum(p.numel() for p in model.parameters()),
        "forward_flops": forward,
        "train_flops": count_flops(lambda: simple_loss(model, x, t, eps, a_bar, cond).mean().backward()) / batch,
        "input_shape": shape,
        "cpu_batch": batch,
        "cpu_seconds_per_step": cpu_seconds_per_step(config, batch) if cpu else None,
    }
    if model_family(config["model"]) == "latent":
        arch = latent_architecture(config)
        cost.update(vae_flops(config, arch["vae"]), source=arch["source"])
    return cost


def stage_passes(config: dict, cost: dict) -> list[tuple[str, str, float, str]]:
    """(stage, kind, forward-pass equivalents, how counted) of every stage; kind: batched or per_example.
    cost: measure_model's counts."""
    d, lds, cf, s, m = config["data"], config["lds"], config["counterfactual"], config["sample"], config["measure"]
    k = config["kfac"]
    tr = cost["train_flops"] / cost["forward_flops"]  # forward-pass equivalents of one training image
    latent = model_family(config["model"]) == "latent"
    # the latent family's sampler evaluates the unconditional and the captioned branch at every step (classifier-free
    # guidance) and decodes each image it makes with the VAE (counted in forward-pass equivalents)
    guided = 2 if latent else 1
    decode = cost["decode_flops"] / cost["forward_flops"] if latent else 0.0
    per_step = " x 2 passes (guidance) + 1 VAE decode each" if latent else ""
    n_models = lds["n_subsets"] * lds["n_seeds"]
    n_cf = cf["queries"] * len(paths.counterfactual_methods(config))
    n_query = s["n_generated"] + d["n_heldout"]
    per_model = config["train"]["steps"] * config["train"]["batch_size"] * tr
    draws = m["n_timesteps"] * m["n_noise"]
    steps = s["num_inference_steps"]
    rows = [
        (
            "train_full",
            "batched",
            per_model,
            f"1 model x {config['train']['steps']} steps x {config['train']['batch_size']}",
        ),
        (
            "train_member (ensembles)",
            "batched",
            len(paths.ensemble_members(config)) * per_model,
            f"{len(paths.ensemble_members(config))} extra full models",
        ),
        ("train_subset (LDS)", "batched", n_models * per_model, f"{lds['n_subsets']} subsets x {lds['n_seeds']} seeds"),
        (
            "train_subset (counterfactual)",
            "batched",
            n_cf * per_model,
            f"{cf['queries']} queries x {len(paths.counterfactual_methods(config))} (methods + random)",
        ),
        (
            "sample",
            "batched",
            s["n_generated"] * (steps * guided + decode),
            f"{s['n_generated']} x {steps} {s['scheduler'].upper()} steps{per_step}",
        ),
        ("measure", "batched", n_models * n_query * draws, f"{n_models} models x {n_query} queries x {draws} draws"),
        (
            "regenerate",
            "batched",
            n_cf * 2 * (steps * guided + decode + draws),
            f"{n_cf} x 2 models x ({steps} steps{per_step} + {draws} draws)",
        ),
    ]
    if latent:
        encode = cost["encode_flops"] / cost["forward_flops"]
        rows.append(
            (
                "encode",
                "batched",
                (d["n_train"] + d["n_heldout"]) * encode,
                f"{d['n_train'] + d['n_heldout']} images x 1 VAE encoder pass at {cost['vae_resolution']} px",
            )
        )
    if latent and not config["model"].get("pipeline"):
        # the miniature base trains all its weights: a step of the UNet and of the VAE (encoder + decoder) counted
        # as FULL_TRAINING_STEP forward passes of each
        b = base_settings(config)
        vae = (cost["encode_flops"] + cost["decode_flops"]) / cost["forward_flops"]
        rows.append(
            (
                "base_pipeline",
                "batched",
                b["batch_size"] * FULL_TRAINING_STEP * (b["unet_steps"] + b["vae_steps"] * vae),
                f"({b['unet_steps']} UNet + {b['vae_steps']} VAE steps) x {b['batch_size']} x {FULL_TRAINING_STEP:g}",
            )
        )
    ls = measure_settings(m, model_family(config["model"]))
    extra = {
        "elbo": ls["elbo"]["n_timesteps"] * ls["elbo"]["n_noise"] + ls["elbo"]["decoder_draws"],
        "timestep_loss": len(ls["timestep_loss"]["timesteps"]) * ls["timestep_loss"]["n_noise"],
    }
    per_query = sum(extra.get(name, 0) for name in ls["measurements"])
    trajectory = s["n_generated"] * steps if "trajectory" in ls["measurements"] else 0
    rows.append(
        (
            "measure (likelihood targets)",
            "batched",
            n_models * (n_query * per_query + trajectory),
            f"{n_models} models x ({n_query} queries x {per_query} draws + trajectories)",
        )
    )
    # metagradient: the measured cost model of benchmarks/metagradient_cost.py (in training runs of the full model:
    # ~3 for a job's forward pass, recomputation and graphs, ~2.6 per attributed query), and its fixed-seed ground
    # truth (one retraining + measurement per set, the full model measured too)
    meta_runs = sum(
        METAGRADIENT_JOB_RUNS + METAGRADIENT_QUERY_RUNS * len(chunk)
        for method in paths.metagradient_methods(config)
        for chunk in paths.metagradient_chunks(config, method)
    )
    if paths.metagradient_methods(config):
        n_fixed = len(paths.fixed_seed_names(config))
        rows.append(("metagradient", "batched", meta_runs * per_model, f"{meta_runs:.1f} training runs (cost model)"))
        rows.append(
            (
                "fixed-seed ground truth",
                "batched",
                n_fixed * per_model + (n_fixed + 1) * n_query * (draws + per_query),
                f"{n_fixed} retrainings + {n_fixed + 1} measurements",
            )
        )
    # gradient stores: every distinct store directory the methods read (paths.method_stores, as the DAG)
    stores = {}
    for method in config["scores"]["methods"]:
        stores.update({directory: kind for directory, kind in paths.method_stores(config, method).values()})
    gradient_passes, n_train = 0.0, d["n_train"]
    for directory, kind in stores.items():
        if kind.startswith("measurement_"):  # query gradients of a likelihood measurement (K-FAC ELBO / trajectory)
            target = kind.removeprefix("measurement_")
            per_query_draws = {**extra, "loss": draws, "trajectory": steps}.get(target, draws)
            gradient_passes += n_query * per_query_draws * tr
            continue
        spec = paths.parse_feature_tag(directory.rsplit("/", 1)[1])
        if kind == "journey":  # per sampling step: the sampler's (guided) x0-prediction, then one loss gradient
            gradient_passes += s["n_generated"] * spec["timesteps"] * (guided + tr)
        elif (
            kind == "sketch"
        ):  # one forward + r backward passes (backward ~ train - forward) per timestep, + residual forward
            r = spec["output_directions"]
            gradient_passes += (n_train + n_query) * spec["timesteps"] * (1 + r * (tr - 1)) + n_train * spec[
                "timesteps"
            ]
        else:
            gradient_passes += (n_train + n_query) * spec["timesteps"] * tr + n_train * spec["timesteps"]
    rows.append(("gradients", "per_example", gradient_passes, f"{len(stores)} stores (K timesteps per image)"))
    kfac_methods = [mm for mm, c in config["scores"]["methods"].items() if c["family"] == "kfac"]
    variants = {paths.curvature_variant(config, mm) for mm in kfac_methods}
    fit = sum((2 if v.endswith("ekfac") else 1) * n_train * k["draws"] * tr for v in variants)  # EK-FAC: a second pass
    rows.append(("curvature", "per_example", fit, f"{len(variants)} variants x {n_train} x {k['draws']} draws"))
    batch = k.get("query_batch")
    passes = 1 if batch is None else sum(math.ceil(n / batch) for n in (s["n_generated"], d["n_heldout"]))
    query_draws = draws if k["query_draws"] == "measure" else k["query_draws"]
    # one job for the whole family (rule scores_kfac_family): the training gradients are streamed once per query
    # group for every method, and each query measurement's query gradients are computed once
    measurements = {config["scores"]["methods"][mm].get("query_measurement", "loss") for mm in kfac_methods}
    kfac = (
        (passes * n_train * k["gradient_draws"] + len(measurements) * n_query * query_draws) * tr if kfac_methods else 0
    )
    rows.append(
        (
            "scores (kfac)",
            "per_example",
            kfac,
            f"{len(kfac_methods)} methods in one pass: {passes} passes x {n_train} x {k['gradient_draws']} draws"
            f" + queries of {len(measurements)} measurements",
        )
    )
    return rows


def count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n / 1e3:.1f}k"


def describe(name: str, config: dict, cost: dict) -> str:
    """The printed head line of a configuration: its network, trained parameters and FLOPs."""
    cpu = cost["cpu_seconds_per_step"]
    line = (
        f"{name}: {cost['params']:,} parameters, {cost['trained']:,} trained; input {cost['input_shape']}; "
        f"{cost['forward_flops'] / 1e9:.2f} GFLOPs forward, {cost['train_flops'] / 1e9:.2f} GFLOPs training per "
        f"image (ratio {cost['train_flops'] / cost['forward_flops']:.2f}); "
        + ("CPU not measured" if cpu is None else f"CPU {cpu:.2f} s per step of {cost['cpu_batch']} images")
    )
    if "source" in cost:
        lora = lora_settings(config["model"])
        line += (
            f"\n  latent: {cost['source']}; LoRA rank {lora['rank']} on {', '.join(lora['targets'])}: "
            f"{cost['trained']:,} parameters; VAE {cost['encode_flops'] / 1e9:.2f} GFLOPs encoder / "
            f"{cost['decode_flops'] / 1e9:.2f} GFLOPs decoder per image at {cost['vae_resolution']} px"
        )
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs", nargs="+", default=["cifar2", "cifar10", "mnist", "celeba", "artbench2", "artbench5"]
    )
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU timing (FLOPs are counted without it)")
    parser.add_argument("--batch", type=int, default=4, help="images per measured CPU training step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu-tflops", type=float, default=312.0, help="assumed dense bf16 peak (A100: 312)")
    parser.add_argument(
        "--util-batched", type=float, default=0.30, help="assumed utilisation: training, sampling, measure"
    )
    parser.add_argument(
        "--util-per-example", type=float, default=0.15, help="assumed utilisation: per-example gradients"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("Assumptions:")
    print(
        f"  GPU: {args.gpu_tflops:g} TFLOP/s dense bf16 peak (A100 80GB), utilisation {args.util_batched:.0%} for batched "
        f"training / sampling / measurement, {args.util_per_example:.0%} for per-example gradients (vmap)"
    )
    print(
        "  FLOPs: torch.utils.flop_counter (matmul + convolution) of the configuration's network on the meta device, "
        "per image; a training image and a per-example gradient = forward + backward w.r.t. the trained parameters; "
        "the scores stage's CPU linear algebra, the classifier, data loading and job start-up are not counted"
    )
    print(
        "  latent family: the LoRA-adapted UNet2DConditionModel (frozen base: no weight gradients); sampling and "
        "regeneration with classifier-free guidance = 2 passes per step + 1 VAE decode per image; encode = 1 VAE "
        "encoder pass per training / held-out image; base_pipeline (miniature base only) = its pretraining steps at "
        f"{FULL_TRAINING_STEP:g} forward passes each; the text encoder (one caption table per job) is negligible and "
        "not counted"
    )
    print(
        "  CPU: not measured (--no-cpu)\n"
        if args.no_cpu
        else f"  CPU: seconds per training step of {args.batch} images, {args.threads} threads, min of 2 after a "
        "warm-up, on this machine (shared, 2 cores): the GPU-less reference point\n"
    )
    table = [
        "| configuration | UNet parameters | GFLOPs forward / training image | CPU s per training image (measured) | "
        + " | ".join(
            [
                "training (full + ensemble members + LDS + counterfactual)",
                "measure (all targets)",
                "gradients + curvature + K-FAC scores",
                "metagradient + fixed-seed ground truth",
                "sample + regenerate + encode + base_pipeline",
                "total",
            ]
        )
        + " |",
        "|" + "---|" * 10,
    ]
    for name in args.configs:
        config = load_config(REPO / "params.yaml", REPO / "configs" / f"{name}.yaml")
        cost = measure_model(config, args.batch, cpu=not args.no_cpu)
        print(describe(name, config, cost))
        hours = {}
        for stage, kind, passes, how in stage_passes(config, cost):
            flops = passes * cost["forward_flops"]
            util = args.util_batched if kind == "batched" else args.util_per_example
            hours[stage] = flops / (args.gpu_tflops * 1e12 * util) / 3600
            print(f"  {stage:32s} {flops:10.3e} FLOPs  {hours[stage]:8.1f} GPU-h   ({how})")
        group = lambda *names: sum(hours.get(n, 0.0) for n in names)  # noqa: E731
        total = sum(hours.values())
        seconds = f" ({total * 3600:.0f} GPU-seconds)" if total < 1 else ""
        print(f"  {'total':32s} {'':10s}        {total:8.1f} GPU-h{seconds}\n")
        params = count(cost["params"])
        if cost["trained"] != cost["params"]:  # a frozen base + LoRA
            params = f"{count(cost['params'] - cost['trained'])} + LoRA {count(cost['trained'])}"
        cpu = cost["cpu_seconds_per_step"]
        table.append(
            f"| {name} | {params} | {cost['forward_flops'] / 1e9:.2f} / {cost['train_flops'] / 1e9:.2f} | "
            + ("not measured" if cpu is None else f"{cpu / cost['cpu_batch']:.2f}")
            + f" | {group('train_full', 'train_member (ensembles)', 'train_subset (LDS)', 'train_subset (counterfactual)'):.0f} | "
            f"{group('measure', 'measure (likelihood targets)'):.0f} | "
            f"{group('gradients', 'curvature', 'scores (kfac)'):.0f} | "
            f"{group('metagradient', 'fixed-seed ground truth'):.0f} | "
            f"{group('sample', 'regenerate', 'encode', 'base_pipeline'):.1f} | "
            + (f"**{total:.0f}** |" if total >= 1 else f"**{total * 3600:.0f} GPU-seconds** |")
        )
    print("\n".join(table))


if __name__ == "__main__":
    main()
