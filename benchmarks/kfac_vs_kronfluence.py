"""K-FAC influence: this workflow's implementation (curvlinops + vmap, workflow_scripts.core.curvature / engines.kfac)
against kronfluence 1.0.1 (Analyzer(cpu=True), strategies "kfac" and "ekfac") on the same model, data, MC draws
and damping. Each (tool, variant) runs in its own subprocess (one torch thread) so that time and peak memory
(ru_maxrss) are its own.

    .venv/bin/python benchmarks/kfac_vs_kronfluence.py [--n-train 100 --n-query 8 --draws 16 --query-draws 16]

Setup: the default params.yaml UNet (284k parameters, 50 Linear/Conv2d layers), trained briefly on the first
n_train digits; queries = n_query held-out digits; loss measurement. MC draws: G uses `draws` (t, eps) rows per
training example (curvature's stream), training gradients `draws` other rows per example, queries `query_draws`
rows each -- the identical rows are fed to kronfluence. Sampled targets of the MC-Fisher come from each tool's own
RNG (the only source of difference for ekfac/mc besides int8 queries on our side).

kronfluence has no notion of "an example = K draws": its per-sample gradients are per forward row, so it scores
(n_query*query_draws) x (n_train*draws) row pairs and the benchmark averages them per (query, example) -- the
same bilinear quantity (scores are linear in both gradients), divided by N for the docs/methods.md convention.
Conventions that differ (reported, not hidden):
- kronfluence's K-FAC divides the output-gradient factor of weight-shared layers (conv, attention projections)
  by the number of positions as well (ours: curvlinops K-FAC-expand, the GGN's scale); EK-FAC eigenvalues agree.
  `ours_kf_convention` rescales our factors the kronfluence way to show this is the whole difference.
- empirical Fisher: curvlinops scales it as 4/(N K D) sum J^T r r^T J, kronfluence (gradients of our loss)
  as 4/(N K D^2) ...: the damping passed to kronfluence is divided by D so both solve the same system.
Output: benchmarks/results/kfac_vs_kronfluence.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ---------------------------------------------------------------------------------------------------------------
# Shared setup (parent process): config, data, briefly trained model
# ---------------------------------------------------------------------------------------------------------------
def make_setup(args, workdir: Path) -> dict:
    import torch

    from workflow_scripts.core import data as core_data
    from workflow_scripts.dag.config import load_config
    from workflow_scripts.families.ddpm import train_model

    torch.set_num_threads(1)
    config = load_config(REPO / "params.yaml")
    config["data"] = {**config["data"], "n_train": args.n_train, "n_heldout": args.n_query}
    config["train"] = {
        **config["train"],
        "steps": args.train_steps,
        "checkpoint_every": args.train_steps,
        "resume_every": args.train_steps,
    }
    config["compute"] = {"device": "cpu", "threads": 1}
    dataset = core_data.make_dataset(config["data"], config["seeds"]["split"])
    np.savez(workdir / "data.npz", train=dataset["train_images"], query=dataset["heldout_images"])
    t0 = time.perf_counter()
    train_model(config, dataset["train_images"], np.arange(args.n_train), 0, workdir / "model.pt")
    setup = {"config": config, "train_seconds": time.perf_counter() - t0}
    (workdir / "setup.json").write_text(json.dumps(setup))
    return setup


def load_setup(workdir: Path):
    import torch

    from workflow_scripts.families.ddpm import load_model

    setup = json.loads((workdir / "setup.json").read_text())
    config = setup["config"]
    model, _ = load_model(workdir / "model.pt", config["model"], "cpu")
    arrays = np.load(workdir / "data.npz")
    torch.set_num_threads(1)
    return config, model, arrays["train"], arrays["query"]


def score_cfg(config: dict, args) -> dict:
    return {
        **config,
        "kfac": {
            "gradient_draws": args.draws,
            "query_draws": args.query_draws,
            "batch_size": args.batch_rows,
            "quantization": args.quantization,
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------------------
def run_ours(args, workdir: Path) -> dict:

    from workflow_scripts.engines import kfac as K
    from workflow_scripts.stages import curvature as curvature_mod

    config, model, train, query = load_setup(workdir)
    base_rss = maxrss_mb()
    settings = {
        "fisher_type": args.fisher,
        "kfac_approx": "expand",
        "ekfac": args.strategy == "ekfac",
        "draws": args.draws,
        "batch_size": args.batch_rows,
    }
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    curvature = curvature_mod.fit_curvature(model, train, settings, config["diffusion"], config["seeds"]["gradients"])
    t1, c1 = time.perf_counter(), time.process_time()
    lam = args.damping
    result = K.kfac_scores(model, curvature, train, {"heldout": query}, score_cfg(config, args), [lam])
    t2, c2 = time.perf_counter(), time.process_time()
    if profiler:
        profiler.disable()
    scores = result[0][1]["heldout"]
    out = {
        "fit_seconds": t1 - t0,
        "score_seconds": t2 - t1,
        "total_seconds": t2 - t0,
        "fit_cpu_seconds": c1 - c0,
        "score_cpu_seconds": c2 - c1,
        "total_cpu_seconds": c2 - c0,
        "base_rss_mb": base_rss,
        "peak_rss_mb": maxrss_mb(),
        "absolute_damping": curvature.absolute_damping(lam),
        "mean_eigenvalue": curvature.mean_eigenvalue(),
        "n_params": curvature.layout.n_params,
    }
    np.save(workdir / f"ours_{args.fisher}_{args.strategy}.npy", scores)
    if profiler:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(25)
        (workdir / f"profile_ours_{args.fisher}_{args.strategy}.txt").write_text(buf.getvalue())
        out["profile"] = buf.getvalue()
    if args.strategy == "kfac":  # diagnostic (untimed): our factors in kronfluence's convention
        positions = layer_positions(model, train)
        rescaled = copy.deepcopy(curvature)
        for b in rescaled.blocks:
            b.g_vals = b.g_vals / positions[b.module]
        same_absolute = curvature.absolute_damping(lam) / rescaled.mean_eigenvalue()  # kronfluence gets this damping
        kf = K.kfac_scores(model, rescaled, train, {"heldout": query}, score_cfg(config, args), [same_absolute])[0][1][
            "heldout"
        ]
        np.save(workdir / f"ourskf_{args.fisher}_{args.strategy}.npy", kf)
    return out


# The params.yaml K-FAC ablation on held-out queries: name -> (fisher, kfac_approx, ekfac, quantization, damping).
# damping None: --damping relative to the variant's mean eigenvalue; a number: absolute (kfac_default_damping, the
# paper's untuned 1e-8). kfac_elbo / kfac_trajectory are left out: their query measurements (the ELBO, a generated
# query's sampling trajectory) would have to be written as kronfluence Tasks.
ABLATION = {
    "kfac": ("mc", "expand", False, "int8", None),
    "kfac_reduce": ("mc", "reduce", False, "int8", None),
    "kfac_empirical": ("empirical", "expand", False, "int8", None),
    "kfac_empirical_reduce": ("empirical", "reduce", False, "int8", None),
    "ekfac": ("mc", "expand", True, "int8", None),
    "kfac_float32": ("mc", "expand", False, "float32", None),
    "kfac_default_damping": ("mc", "expand", False, "int8", 1e-8),
}


def run_ours_family(args, workdir: Path) -> dict:
    """The ablation as the workflow runs it: one fit per distinct curvature (rule curvature), then every variant
    scored in ONE pass of training gradients (rule scores_kfac_family: engines.kfac.family_scores)."""
    from workflow_scripts.engines import kfac as K
    from workflow_scripts.stages import curvature as curvature_mod

    config, model, train, query = load_setup(workdir)
    base_rss = maxrss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    fits = {}
    for fisher, approx, ekfac, _, _ in ABLATION.values():
        if (fisher, approx, ekfac) not in fits:
            settings = {
                "fisher_type": fisher,
                "kfac_approx": approx,
                "ekfac": ekfac,
                "draws": args.draws,
                "batch_size": args.batch_rows,
            }
            fits[fisher, approx, ekfac] = curvature_mod.fit_curvature(
                model, train, settings, config["diffusion"], config["seeds"]["gradients"]
            )
    t1, c1 = time.perf_counter(), time.process_time()
    sides, absolute = {}, {}
    for name, (fisher, approx, ekfac, quantization, damping) in ABLATION.items():
        curvature = fits[fisher, approx, ekfac]
        lam = args.damping if damping is None else damping / curvature.mean_eigenvalue()
        sides[name] = K.QuerySide(curvature, [lam], quantization)
        absolute[name] = curvature.absolute_damping(lam)
    result = K.family_scores(model, train, {"heldout": query}, score_cfg(config, args), sides)
    t2, c2 = time.perf_counter(), time.process_time()
    for name, [(_, matrices)] in result.items():
        np.save(workdir / f"ours_{name}.npy", matrices["heldout"])
    return {
        "fits": len(fits),
        "fit_seconds": t1 - t0,
        "score_seconds": t2 - t1,
        "total_seconds": t2 - t0,
        "fit_cpu_seconds": c1 - c0,
        "score_cpu_seconds": c2 - c1,
        "total_cpu_seconds": c2 - c0,
        "base_rss_mb": base_rss,
        "peak_rss_mb": maxrss_mb(),
        "absolute_damping": absolute,
    }


def layer_positions(model, images) -> dict[str, float]:
    """Weight-sharing positions per Linear/Conv2d layer (output elements per row / output features)."""
    import torch

    from workflow_scripts.core.curvature import curvature_modules

    counts, handles = {}, []
    for name, module in curvature_modules(model):
        out_features = module.out_channels if isinstance(module, torch.nn.Conv2d) else module.out_features
        handles.append(
            module.register_forward_hook(
                lambda m, i, o, name=name, f=out_features: counts.__setitem__(name, o.numel() / (o.shape[0] * f))
            )
        )
    with torch.no_grad():
        model(torch.from_numpy(images[:2]), torch.tensor([1, 2]))
    for h in handles:
        h.remove()
    return counts


def run_kronfluence(args, workdir: Path) -> dict:
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs
    from torch.utils.data import TensorDataset

    from workflow_scripts.core import curvature as C
    from workflow_scripts.core.contracts import QUERY_SETS
    from workflow_scripts.engines import kfac as K
    from workflow_scripts.families.ddpm import alphas_cumprod

    config, model, train, query = load_setup(workdir)
    cfg = score_cfg(config, args)
    shape, D = train.shape[1:], int(np.prod(train.shape[1:]))

    def rows(measurement, images):  # (x_t, t, eps) per (image, draw), image-major: the rows our vmap averages
        d = measurement.draws(len(images), shape)
        x0 = torch.from_numpy(images)[:, None]
        x_t = d["signal"][..., None, None, None] * x0 + d["noise"][..., None, None, None] * d["eps"]
        return TensorDataset(x_t.flatten(0, 1), d["t"].flatten(), d["eps"].flatten(0, 1))

    train_rows = rows(K.loss_measurement(cfg, "train"), train)
    query_rows = rows(K.loss_measurement(cfg, "query", stream_index=QUERY_SETS.index("heldout")), query)
    packed = [
        (x, y)
        for x, y in C.DrawBatches(
            torch.from_numpy(train),
            args.draws,
            alphas_cumprod(config["diffusion"]),
            config["seeds"]["gradients"],
            C.CURVATURE_STREAM,
            args.batch_rows,
        )
    ]
    X, Y = torch.cat([p[0] for p in packed]), torch.cat([p[1] for p in packed])
    fit_rows = TensorDataset(X[:, :-1].reshape(-1, *shape), X[:, -1].round().long(), Y.reshape(-1, *shape))

    class DiffusionTask(Task):
        """Per row: ||eps - eps_theta(x_t, t)||^2 / D (summed over the batch, kronfluence's convention)."""

        def compute_train_loss(self, batch, model, sample=False):
            x_t, t, eps = batch
            pred = model(x_t, t).sample
            if sample:  # target from the model's Gaussian whose NLL is our loss: N(pred, D/2)
                with torch.no_grad():
                    eps = pred + (D / 2) ** 0.5 * torch.randn_like(pred)
            return (eps - pred).pow(2).flatten(1).sum(1).div(D).sum()

        def compute_measurement(self, batch, model):
            x_t, t, eps = batch
            return (eps - model(x_t, t).sample).pow(2).flatten(1).mean(1).sum()

    if args.variant:  # one variant of the ablation: the damping our family run used for it
        ours_damping = json.loads((workdir / "ours_ablation.json").read_text())["absolute_damping"][args.variant]
    else:
        ours_damping = json.loads((workdir / f"ours_{args.fisher}_{args.strategy}.json").read_text())[
            "absolute_damping"
        ]
    damping = ours_damping / (D if args.fisher == "empirical" else 1.0)
    torch.manual_seed(0)
    base_rss = maxrss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    task = DiffusionTask()
    model = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name="bench",
        model=model,
        task=task,
        cpu=True,
        output_dir=str(workdir / "kronfluence"),
        disable_tqdm=True,
        log_level=40,
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    # --kronfluence-precision float64: its covariances and EK-FAC Lambda accumulated in float64, as ours are
    # (core/curvature.py "Precision"); float32 is kronfluence's default
    precision = {"float32": torch.float32, "float64": torch.float64}[args.kronfluence_precision]
    factor_args = FactorArguments(
        strategy=args.strategy,
        use_empirical_fisher=args.fisher == "empirical",
        activation_covariance_dtype=precision,
        gradient_covariance_dtype=precision,
        lambda_dtype=precision,
    )
    name = args.variant or f"{args.fisher}_{args.strategy}"
    analyzer.fit_all_factors(
        factors_name=name,
        dataset=fit_rows,
        per_device_batch_size=args.batch_rows,
        factor_args=factor_args,
        overwrite_output_dir=True,
    )
    t1, c1 = time.perf_counter(), time.process_time()
    analyzer.compute_pairwise_scores(
        scores_name=name,
        factors_name=name,
        query_dataset=query_rows,
        train_dataset=train_rows,
        per_device_query_batch_size=len(query_rows),
        per_device_train_batch_size=args.batch_rows,
        score_args=ScoreArguments(damping_factor=damping),
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores(scores_name=name)["all_modules"]
    t2, c2 = time.perf_counter(), time.process_time()
    per_pair = scores.double().reshape(len(query), args.query_draws, len(train), args.draws).mean((1, 3)) / len(train)
    np.save(workdir / f"kronfluence_{name}.npy", per_pair.numpy().astype(np.float32))
    return {
        "fit_seconds": t1 - t0,
        "score_seconds": t2 - t1,
        "total_seconds": t2 - t0,
        "fit_cpu_seconds": c1 - c0,
        "score_cpu_seconds": c2 - c1,
        "total_cpu_seconds": c2 - c0,
        "base_rss_mb": base_rss,
        "peak_rss_mb": maxrss_mb(),
        "absolute_damping": damping,
        "score_rows": list(scores.shape),
    }


# ---------------------------------------------------------------------------------------------------------------
# Parent: run everything, compare, report
# ---------------------------------------------------------------------------------------------------------------
def correlations(a: np.ndarray, b: np.ndarray) -> dict:
    from scipy.stats import pearsonr, spearmanr

    pear = [pearsonr(x, y)[0] for x, y in zip(a, b)]
    spear = [spearmanr(x, y)[0] for x, y in zip(a, b)]
    return {
        "pearson_per_query": [float(p) for p in pear],
        "pearson_min": float(np.min(pear)),
        "pearson_mean": float(np.mean(pear)),
        "spearman_mean": float(np.mean(spear)),
        "scale_ratio": float(np.linalg.norm(b) / np.linalg.norm(a)),
    }


def worker_argv(args, tool, fisher, strategy, workdir):
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        tool,
        "--fisher",
        fisher,
        "--strategy",
        strategy,
        "--workdir",
        str(workdir),
    ]
    for key in (
        "n_train",
        "n_query",
        "draws",
        "query_draws",
        "batch_rows",
        "damping",
        "quantization",
        "kronfluence_precision",
    ):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return argv + (["--profile"] if args.profile and tool == "ours" else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-query", type=int, default=8)
    parser.add_argument("--draws", type=int, default=16, help="(t, eps) rows per training example, for G and gradients")
    parser.add_argument("--query-draws", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--batch-rows", type=int, default=256)
    parser.add_argument("--damping", type=float, default=1e-3, help="relative to the mean eigenvalue of our G")
    parser.add_argument("--quantization", default="int8", choices=["int8", "float32"])
    parser.add_argument("--variants", default="mc:kfac,mc:ekfac,empirical:kfac,empirical:ekfac")
    parser.add_argument(
        "--kronfluence-precision",
        default="float32",
        choices=["float32", "float64"],
        help="kronfluence's covariance and Lambda dtype (float32: its default; float64: the precision of ours)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool and variant; the fastest is reported")
    parser.add_argument("--profile", action="store_true", help="cProfile our worker")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "kfac_vs_kronfluence.json"))
    parser.add_argument("--worker", choices=["ours", "kronfluence"], help=argparse.SUPPRESS)
    parser.add_argument("--fisher", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="the K-FAC ablation set: our fits + one family scoring pass vs kronfluence run once per variant",
    )
    args = parser.parse_args()

    if args.worker:
        import logging

        logging.disable(logging.WARNING)
        workdir = Path(args.workdir)
        if args.worker == "ours":
            result = (run_ours_family if args.strategy == "ablation" else run_ours)(args, workdir)
            name = "ablation" if args.strategy == "ablation" else f"{args.fisher}_{args.strategy}"
        else:
            result = run_kronfluence(args, workdir)
            name = args.variant or f"{args.fisher}_{args.strategy}"
        (workdir / f"{args.worker}_{name}.json").write_text(json.dumps(result))
        return 0

    import importlib.metadata as md

    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="kfac_bench_") as tmp:
        workdir = Path(tmp)
        setup = make_setup(args, workdir)
        runs = []
        if args.ablation:
            runs.append(ablation_row(args, workdir))
        for variant in [] if args.ablation else args.variants.split(","):
            fisher, strategy = variant.split(":")
            row = {"fisher_type": fisher, "strategy": strategy}
            for _ in range(args.repeats):  # alternate the tools; keep each tool's fastest run (shared machine)
                for tool in ("ours", "kronfluence"):
                    proc = subprocess.run(
                        worker_argv(args, tool, fisher, strategy, workdir), capture_output=True, text=True
                    )
                    if proc.returncode:
                        sys.stderr.write(proc.stderr[-4000:])
                        raise SystemExit(f"{tool} {variant} failed")
                    run = json.loads((workdir / f"{tool}_{fisher}_{strategy}.json").read_text())
                    run["all_total_seconds"] = row.get(tool, {}).get("all_total_seconds", []) + [run["total_seconds"]]
                    if tool not in row or run["total_seconds"] < row[tool]["total_seconds"]:
                        row[tool] = run
                    else:
                        row[tool]["all_total_seconds"] = run["all_total_seconds"]
            ours = np.load(workdir / f"ours_{fisher}_{strategy}.npy")
            kron = np.load(workdir / f"kronfluence_{fisher}_{strategy}.npy")
            row["agreement"] = correlations(ours, kron)
            if strategy == "kfac":
                row["agreement_kf_convention"] = correlations(
                    np.load(workdir / f"ourskf_{fisher}_{strategy}.npy"), kron
                )
            row["time_ratio"] = row["kronfluence"]["total_seconds"] / row["ours"]["total_seconds"]
            row["cpu_time_ratio"] = row["kronfluence"]["total_cpu_seconds"] / row["ours"]["total_cpu_seconds"]
            runs.append(row)
            print(
                f"{variant}: ours {row['ours']['total_seconds']:.1f}s, kronfluence {row['kronfluence']['total_seconds']:.1f}s, "
                f"pearson {row['agreement']['pearson_mean']:.4f}",
                file=sys.stderr,
                flush=True,
            )
    result = {
        "setup": {
            k: getattr(args, k)
            for k in (
                "n_train",
                "n_query",
                "draws",
                "query_draws",
                "train_steps",
                "batch_rows",
                "damping",
                "quantization",
                "kronfluence_precision",
                "repeats",
            )
        },
        "load_average_before_after": [load_before, list(os.getloadavg())],
        "cpu_count": os.cpu_count(),
        "model": setup["config"]["model"],
        "threads": 1,
        "versions": {p: md.version(p) for p in ("torch", "curvlinops-for-pytorch", "kronfluence", "diffusers")},
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_ablation(result) if args.ablation else markdown(result))
    return 0


def ablation_row(args, workdir: Path) -> dict:
    """Per repeat: our family run (ablation worker), then kronfluence once per variant; CPU seconds summed over
    kronfluence's runs; the median over repeats."""
    import statistics

    def worker(tool: str, extra: list[str]) -> dict:
        argv = worker_argv(args, tool, "mc", "ablation", workdir) + extra
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{tool} {' '.join(extra)} failed")
        name = "ablation" if tool == "ours" else extra[-1]
        return json.loads((workdir / f"{tool}_{name}.json").read_text())

    ours, kron = [], []
    for repeat in range(args.repeats):
        ours.append(worker("ours", []))
        per_variant = {}
        for name, (fisher, _, ekfac, _, _) in ABLATION.items():
            strategy = "ekfac" if ekfac else "kfac"
            per_variant[name] = worker("kronfluence", ["--fisher", fisher, "--strategy", strategy, "--variant", name])
        kron.append(per_variant)
        print(
            f"ablation repeat {repeat + 1}: ours {ours[-1]['total_cpu_seconds']:.1f} CPU s, kronfluence "
            f"{sum(r['total_cpu_seconds'] for r in per_variant.values()):.1f} CPU s",
            file=sys.stderr,
            flush=True,
        )
    median = lambda xs: float(statistics.median(xs))  # noqa: E731
    return {
        "variants": list(ABLATION),
        "ours_fits": ours[0]["fits"],
        "ours_cpu_seconds": {
            k: median([o[k] for o in ours]) for k in ("fit_cpu_seconds", "score_cpu_seconds", "total_cpu_seconds")
        },
        "kronfluence_cpu_seconds": {
            k: median([sum(r[k] for r in per.values()) for per in kron])
            for k in ("fit_cpu_seconds", "score_cpu_seconds", "total_cpu_seconds")
        },
        "kronfluence_cpu_seconds_per_variant": {
            name: median([per[name]["total_cpu_seconds"] for per in kron]) for name in ABLATION
        },
        "all_total_cpu_seconds": {
            "ours": [o["total_cpu_seconds"] for o in ours],
            "kronfluence": [sum(r["total_cpu_seconds"] for r in per.values()) for per in kron],
        },
        "peak_rss_mb": {
            "ours": max(o["peak_rss_mb"] for o in ours),
            "kronfluence": max(r["peak_rss_mb"] for per in kron for r in per.values()),
        },
        "agreement": {
            name: correlations(np.load(workdir / f"ours_{name}.npy"), np.load(workdir / f"kronfluence_{name}.npy"))
            for name in ABLATION
        },
    }


def markdown_ablation(result: dict) -> str:
    (r,) = result["runs"]
    o, k = r["ours_cpu_seconds"], r["kronfluence_cpu_seconds"]
    lines = [
        f"Ablation set ({len(r['variants'])} variants: {', '.join(r['variants'])}), CPU seconds, median of "
        f"{result['setup']['repeats']}:",
        "",
        "| | fit | score | total |",
        "|---|---|---|---|",
        f"| ours: {r['ours_fits']} fits + one scoring pass | {o['fit_cpu_seconds']:.1f} | {o['score_cpu_seconds']:.1f} | "
        f"{o['total_cpu_seconds']:.1f} |",
        f"| kronfluence: one run per variant | {k['fit_cpu_seconds']:.1f} | {k['score_cpu_seconds']:.1f} | "
        f"{k['total_cpu_seconds']:.1f} |",
        f"| ratio | | | {k['total_cpu_seconds'] / o['total_cpu_seconds']:.2f}x |",
        "",
        "| variant | Pearson per query, mean (min) | Spearman mean |",
        "|---|---|---|",
    ]
    for name, a in r["agreement"].items():
        lines.append(f"| {name} | {a['pearson_mean']:.4f} ({a['pearson_min']:.4f}) | {a['spearman_mean']:.4f} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    lines = [
        "| Fisher | strategy | ours fit / score / total (s) | kronfluence fit / score / total (s) | time ratio (CPU-time ratio) | "
        "peak RSS ours / kronfluence (MB, above baseline) | Pearson per query mean (min) | Spearman mean | "
        "Pearson, ours in kronfluence's K-FAC convention |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        o, k, a = r["ours"], r["kronfluence"], r["agreement"]
        conv = r.get("agreement_kf_convention")
        conv = "" if conv is None else f"{conv['pearson_mean']:.4f}"
        lines.append(
            f"| {r['fisher_type']} | {r['strategy']} | {o['fit_seconds']:.1f} / {o['score_seconds']:.1f} / {o['total_seconds']:.1f} | "
            f"{k['fit_seconds']:.1f} / {k['score_seconds']:.1f} / {k['total_seconds']:.1f} | {r['time_ratio']:.1f}x "
            f"({r['cpu_time_ratio']:.1f}x) | "
            f"{o['peak_rss_mb']:.0f} (+{o['peak_rss_mb'] - o['base_rss_mb']:.0f}) / {k['peak_rss_mb']:.0f} "
            f"(+{k['peak_rss_mb'] - k['base_rss_mb']:.0f}) | {a['pearson_mean']:.4f} ({a['pearson_min']:.4f}) | "
            f"{a['spearman_mean']:.4f} | {conv} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
