"""K-FAC / EK-FAC factors accumulated in float64 (workflow_scripts/core/curvature.py) against the former float32
accumulation (the same file at a given git revision), on the default params.yaml UNet: fit time, peak memory, and
how far the two fits' scores are apart at the damping grid's values.

    .venv/bin/python benchmarks/kfac_float64_factors.py [--former 0687239] [--n-train 50 --draws 16 --train-steps 100]
                                                        [--repeats 1]

--former REV is any older revision of core/curvature.py (e.g. 9a1a0f6: float64 products in the EK-FAC correction);
"now" is the checkout's.

Each (version, variant) runs in its own subprocess (one torch thread): fit CPU / wall time and ru_maxrss are its own.
Scores: float32 queries (no int8 rounding), loss measurement, n_query held-out digits. Output: a Markdown table on
stdout and benchmarks/results/kfac_float64_factors.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LAMBDAS = [1e-7, 1e-6, 1e-5, 1e-3]


def worker(args) -> None:
    workdir = Path(args.workdir)
    if args.version == "former":  # the former core/curvature.py replaces the current one before anything imports it
        spec = importlib.util.spec_from_file_location("workflow_scripts.core.curvature", workdir / "former.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["workflow_scripts.core.curvature"] = module
        spec.loader.exec_module(module)
    import torch

    from workflow_scripts.engines import kfac as K
    from workflow_scripts.families.ddpm import load_model
    from workflow_scripts.stages import curvature as stage

    torch.set_num_threads(1)
    setup = json.loads((workdir / "setup.json").read_text())
    config = setup["config"]
    model, _ = load_model(workdir / "model.pt", config["model"], "cpu")
    arrays = np.load(workdir / "data.npz")
    settings = {"fisher_type": "mc", "kfac_approx": "expand", "ekfac": args.variant == "ekfac", "draws": args.draws}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0, c0 = time.perf_counter(), time.process_time()
    cur = stage.fit_curvature(model, arrays["train"], settings, config["diffusion"], config["seeds"]["gradients"])
    t1, c1 = time.perf_counter(), time.process_time()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = {**config, "kfac": {"gradient_draws": args.draws, "query_draws": args.draws, "quantization": "float32"}}
    result = K.kfac_scores(model, cur, arrays["train"], {"heldout": arrays["query"]}, cfg, LAMBDAS)
    np.save(workdir / f"{args.version}_{args.variant}.npy", np.stack([m["heldout"] for _, m in result]))
    out = {"fit_seconds": t1 - t0, "fit_cpu_seconds": c1 - c0, "peak_rss_mb": peak, "base_rss_mb": base}
    (workdir / f"{args.version}_{args.variant}.json").write_text(json.dumps(out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--former", default="0687239", help="git revision of the float32 core/curvature.py")
    parser.add_argument("--n-train", type=int, default=50)
    parser.add_argument("--n-query", type=int, default=8)
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved fits per version; the median is reported")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "kfac_float64_factors.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--version", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    import torch

    from workflow_scripts.core import data as core_data
    from workflow_scripts.dag.config import load_config
    from workflow_scripts.families.ddpm import train_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="kfac_float64_") as tmp:
        workdir = Path(tmp)
        former = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{args.former}:workflow_scripts/core/curvature.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (workdir / "former.py").write_text(former)
        config = load_config(REPO / "params.yaml")
        config["data"] = {**config["data"], "n_train": args.n_train, "n_heldout": args.n_query}
        steps = args.train_steps
        config["train"] = {**config["train"], "steps": steps, "checkpoint_every": steps, "resume_every": steps}
        config["compute"] = {"device": "cpu", "threads": 1}
        dataset = core_data.make_dataset(config["data"], config["seeds"]["split"])
        np.savez(workdir / "data.npz", train=dataset["train_images"], query=dataset["heldout_images"])
        train_model(config, dataset["train_images"], np.arange(args.n_train), 0, workdir / "model.pt")
        (workdir / "setup.json").write_text(json.dumps({"config": config}))
        rows = []
        for variant in ("kfac", "ekfac"):
            row = {"variant": variant}
            runs = {"former": [], "float64": []}
            for _ in range(args.repeats):  # interleaved: both versions see the same machine load
                for version in runs:
                    argv = [sys.executable, __file__, "--worker", "--version", version, "--variant", variant]
                    argv += ["--workdir", str(workdir), "--draws", str(args.draws)]
                    subprocess.run(argv, check=True)
                    runs[version].append(json.loads((workdir / f"{version}_{variant}.json").read_text()))
            for version, results in runs.items():  # the median fit time; the largest peak memory
                row[version] = {
                    "fit_cpu_seconds": float(np.median([r["fit_cpu_seconds"] for r in results])),
                    "fit_seconds": float(np.median([r["fit_seconds"] for r in results])),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                    "all_fit_cpu_seconds": [r["fit_cpu_seconds"] for r in results],
                }
            a, b = (np.load(workdir / f"{v}_{variant}.npy").astype(np.float64) for v in ("former", "float64"))
            row["relative_difference"] = {
                f"{lam:g}": float(np.linalg.norm(a[i] - b[i]) / np.linalg.norm(b[i])) for i, lam in enumerate(LAMBDAS)
            }
            row["pearson_min"] = {
                f"{lam:g}": float(min(np.corrcoef(x, y)[0, 1] for x, y in zip(a[i], b[i])))
                for i, lam in enumerate(LAMBDAS)
            }
            rows.append(row)
    result = {"setup": vars(args), "lambdas": LAMBDAS, "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        "| variant | fit CPU s former / now | peak RSS MB former / now | "
        + " | ".join(f"scores rel. diff. (min Pearson) at {lam:g}" for lam in LAMBDAS)
        + " |"
    )
    print("|---" * (3 + len(LAMBDAS)) + "|")
    for r in rows:
        f, n = r["former"], r["float64"]
        diffs = " | ".join(
            f"{r['relative_difference'][f'{lam:g}']:.2e} ({r['pearson_min'][f'{lam:g}']:.4f})" for lam in LAMBDAS
        )
        print(
            f"| {r['variant']} | {f['fit_cpu_seconds']:.1f} / {n['fit_cpu_seconds']:.1f} | "
            f"{f['peak_rss_mb']:.0f} / {n['peak_rss_mb']:.0f} | {diffs} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
