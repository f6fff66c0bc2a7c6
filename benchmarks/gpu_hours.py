"""Expected GPU-hours of the paper-scale configurations (configs/cifar2.yaml, cifar10.yaml, mnist.yaml, celeba.yaml).

    python benchmarks/gpu_hours.py [--configs cifar2 cifar10 mnist celeba] [--batch 4] [--threads 2] [--gpu-tflops 312]
                                   [--util-batched 0.3] [--util-per-example 0.15] [--markdown]

1. Measures the reference UNet of each configuration here: FLOPs of one forward pass and of one training step
   (forward + backward of the simple loss) per image with torch.utils.flop_counter (matmuls and convolutions;
   elementwise work is not counted), and the CPU seconds of a training step of --batch images.
2. Counts the network passes of every stage of the configuration's DAG (the same functions the Snakefile uses:
   workflow_scripts/dag/paths.py), in forward-pass equivalents: a training image = one forward + backward (the counted
   training-step FLOPs); a per-example gradient = the same; a DAS vector-output sketch with r directions = one
   forward + r backward passes.
3. Converts to GPU-hours with an assumed GPU: --gpu-tflops dense bf16 peak (A100: 312) at an assumed utilisation,
   --util-batched for batched training / sampling / measurement and --util-per-example for the per-example
   gradient stages (torch.func vmap over examples, far from peak). Every assumption is printed with the table.

Not counted: the scores stage's linear algebra (CPU, minutes), the classifier (seconds), data loading, job start-up.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.dag import paths
from workflow_scripts.dag.config import image_size, load_config
from workflow_scripts.families.ddpm import alphas_cumprod, build_model, simple_loss
from workflow_scripts.families.likelihood import measure_settings

# benchmarks/metagradient_cost.py (digits default model, CPU): training runs per metagradient job and per query
METAGRADIENT_JOB_RUNS, METAGRADIENT_QUERY_RUNS = 3.0, 2.6

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


def image_shape(config: dict) -> tuple[int, int, int]:
    size = image_size(config["data"])
    return CHANNELS[config["data"]["dataset"]], size, size


def measure_model(config: dict, batch: int, repeats: int = 2) -> dict:
    """FLOPs per image of a forward pass and of a training step; CPU seconds per training step of `batch` images."""
    shape = image_shape(config)
    torch.manual_seed(0)
    model = build_model(config["model"], shape)
    a_bar = alphas_cumprod(config["diffusion"])
    x, eps = torch.randn(batch, *shape), torch.randn(batch, *shape)
    t = torch.randint(0, config["diffusion"]["num_train_timesteps"], (batch,))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t)
    forward = counter.get_total_flops() / batch
    counter = FlopCounterMode(display=False)
    with counter:
        simple_loss(model, x, t, eps, a_bar).mean().backward()
    step = counter.get_total_flops() / batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds = []
    for _ in range(repeats + 1):  # the first step warms up
        start = time.perf_counter()
        optimizer.zero_grad()
        simple_loss(model, x, t, eps, a_bar).mean().backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "forward_flops": forward,
        "train_flops": step,
        "cpu_seconds_per_step": min(seconds[1:]),
        "cpu_batch": batch,
    }


def stage_passes(config: dict, train_over_forward: float) -> list[tuple[str, str, float, str]]:
    """(stage, kind, forward-pass equivalents, how counted) of every stage; kind: batched or per_example."""
    d, lds, cf, s, m = config["data"], config["lds"], config["counterfactual"], config["sample"], config["measure"]
    k = config["kfac"]
    tr = train_over_forward  # forward-pass equivalents of one training image (forward + backward)
    n_models = lds["n_subsets"] * lds["n_seeds"]
    n_cf = cf["queries"] * len(paths.counterfactual_methods(config))
    n_query = s["n_generated"] + d["n_heldout"]
    per_model = config["train"]["steps"] * config["train"]["batch_size"] * tr
    draws = m["n_timesteps"] * m["n_noise"]
    rows = [
        (
            "train_full",
            "batched",
            per_model,
            f"1 model x {config['train']['steps']} steps x {config['train']['batch_size']}",
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
            s["n_generated"] * s["num_inference_steps"],
            f"{s['n_generated']} x {s['num_inference_steps']} DDIM steps",
        ),
        ("measure", "batched", n_models * n_query * draws, f"{n_models} models x {n_query} queries x {draws} draws"),
        (
            "regenerate",
            "batched",
            n_cf * 2 * (s["num_inference_steps"] + draws),
            f"{n_cf} x 2 models x ({s['num_inference_steps']} steps + {draws} draws)",
        ),
    ]
    # the likelihood targets of measure.measurements (the loss is counted above): ELBO draws + decoder, per-timestep
    # losses, and one forward pass per sampling step of a generated query's trajectory
    ls = measure_settings(m, "ddpm")
    extra = {
        "elbo": ls["elbo"]["n_timesteps"] * ls["elbo"]["n_noise"] + ls["elbo"]["decoder_draws"],
        "timestep_loss": len(ls["timestep_loss"]["timesteps"]) * ls["timestep_loss"]["n_noise"],
    }
    per_query = sum(extra.get(name, 0) for name in ls["measurements"])
    trajectory = s["n_generated"] * s["num_inference_steps"] if "trajectory" in ls["measurements"] else 0
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
            per_query_draws = {**extra, "loss": draws, "trajectory": s["num_inference_steps"]}.get(target, draws)
            gradient_passes += n_query * per_query_draws * tr
            continue
        spec = paths.parse_feature_tag(directory.rsplit("/", 1)[1])
        if kind == "journey":
            gradient_passes += s["n_generated"] * spec["timesteps"] * tr
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
    kfac = len(kfac_methods) * (passes * n_train * k["gradient_draws"] + n_query * query_draws) * tr
    rows.append(
        (
            "scores (kfac)",
            "per_example",
            kfac,
            f"{len(kfac_methods)} methods x ({passes} passes x {n_train} x {k['gradient_draws']} draws + queries)",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["cifar2", "cifar10", "mnist", "celeba"])
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
        "  FLOPs: torch.utils.flop_counter (matmul + convolution) of the configuration's UNet, per image; a training "
        "image and a per-example gradient = forward + backward; the scores stage's CPU linear algebra, the classifier, "
        "data loading and job start-up are not counted"
    )
    print(
        f"  CPU: seconds per training step of {args.batch} images, {args.threads} threads, min of 2 after a warm-up, "
        "on this machine (shared, 2 cores): the GPU-less reference point\n"
    )
    table = [
        "| configuration | UNet parameters | GFLOPs forward / training image | CPU s per training image (measured) | "
        + " | ".join(
            [
                "training (full + LDS + counterfactual)",
                "measure (all targets)",
                "gradients + curvature + K-FAC scores",
                "metagradient + fixed-seed ground truth",
                "sample + regenerate",
                "total",
            ]
        )
        + " |",
        "|" + "---|" * 10,
    ]
    for name in args.configs:
        config = load_config(REPO / "params.yaml", REPO / "configs" / f"{name}.yaml")
        cost = measure_model(config, args.batch)
        rows = stage_passes(config, cost["train_flops"] / cost["forward_flops"])
        hours = {}
        print(
            f"{name}: {cost['params']:,} parameters, {cost['forward_flops'] / 1e9:.2f} GFLOPs forward, "
            f"{cost['train_flops'] / 1e9:.2f} GFLOPs training per image; CPU {cost['cpu_seconds_per_step']:.2f} s "
            f"per step of {cost['cpu_batch']} images"
        )
        for stage, kind, passes, how in rows:
            flops = passes * cost["forward_flops"]
            util = args.util_batched if kind == "batched" else args.util_per_example
            hours[stage] = flops / (args.gpu_tflops * 1e12 * util) / 3600
            print(f"  {stage:32s} {flops:10.3e} FLOPs  {hours[stage]:8.1f} GPU-h   ({how})")
        group = lambda *names: sum(hours[n] for n in names)  # noqa: E731
        total = sum(hours.values())
        print(f"  {'total':32s} {'':10s}        {total:8.1f} GPU-h\n")
        table.append(
            f"| {name} | {cost['params'] / 1e6:.1f}M | {cost['forward_flops'] / 1e9:.2f} / "
            f"{cost['train_flops'] / 1e9:.2f} | {cost['cpu_seconds_per_step'] / cost['cpu_batch']:.2f} | "
            f"{group('train_full', 'train_subset (LDS)', 'train_subset (counterfactual)'):.0f} | "
            f"{group('measure', 'measure (likelihood targets)'):.0f} | "
            f"{group('gradients', 'curvature', 'scores (kfac)'):.0f} | "
            f"{sum(hours.get(n, 0.0) for n in ('metagradient', 'fixed-seed ground truth')):.0f} | "
            f"{group('sample', 'regenerate'):.1f} | **{total:.0f}** |"
        )
    print("\n".join(table))


if __name__ == "__main__":
    main()
