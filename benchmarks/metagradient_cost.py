#!/usr/bin/env python
"""Cost of the metagradient (MAGIC) scores as a multiple of one training run, and its peak memory.

Setup: the default params.yaml (300 training digits of the data stage's split, 284,513-parameter UNet, batch 64,
AdamW + cosine schedule; --steps overrides train.steps), CPU, one torch thread. Every measurement runs in its own
subprocess (clean peak RSS = ru_maxrss; baseline = VmRSS after imports, data and model set-up):
- train:   train.train_model on all training examples (what the workflow runs for every model);
- forward: the functional training function of workflow_scripts.engines.magic (no checkpoints), for comparison;
- meta Q:  metagradients for Q held-out queries (loss measurement, the measure stage's draws): forward pass with
           state checkpoints every ceil(sqrt(T)) steps (--every), query gradients, reverse pass. The cost of one
           further query is (meta Q2 - meta Q1) / (Q2 - Q1).
Wall and CPU times are both reported: on the shared machine the wall time also counts waiting for a core.

    .venv/bin/python benchmarks/metagradient_cost.py                       # 600 steps, Q = 1 and 3: ~25 min loaded
    .venv/bin/python benchmarks/metagradient_cost.py --steps 60 --queries 1,2   # quick check, ~3 min
Writes benchmarks/results/metagradient_cost.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from workflow_scripts.core import data
    from workflow_scripts.dag.config import load_config
    from workflow_scripts.engines import magic as mg
    from workflow_scripts.families import ddpm as train

    config = load_config(REPO / "params.yaml")
    config["train"]["steps"] = args.steps
    config["compute"].update(device="cpu", threads=1)
    dataset = data.make_dataset(config["data"], config["seeds"]["split"])
    images, heldout = dataset["train_images"], dataset["heldout_images"]
    problem, state0 = mg.build_problem(config, images)
    queries = (
        mg.measurement_queries(config, heldout, stream=1, indices=np.arange(args.queries))
        if args.worker == "meta"
        else None
    )
    baseline = _rss_mb()
    load_before = _loadavg()
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    out = {"worker": args.worker, "steps": args.steps, "n_train": len(images), "n_params": problem.n_params()}
    if args.worker == "train":
        with tempfile.TemporaryDirectory() as tmp:
            train.train_model(
                config, images, np.arange(len(images)), 0, Path(tmp) / "model.pt", device=torch.device("cpu")
            )
    elif args.worker == "forward":
        mg.train(problem, state0, np.ones(len(images)))
    else:
        result = mg.metagradients(
            problem, state0, queries, every=args.every, measure_batch_size=int(config["measure"]["batch_size"])
        )
        out.update(
            info={k: v for k, v in result.info.items() if k != "peak_rss_mb"},
            queries=args.queries,
            score_abs_mean=float(np.abs(result.scores).mean()),
        )
    out.update(
        wall_s=time.perf_counter() - t0,
        cpu_s=_cpu_seconds() - cpu0,
        baseline_rss_mb=baseline,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        loadavg_before=load_before,
        loadavg_after=_loadavg(),
    )
    return out


def run_worker(kind: str, steps: int, queries: int = 0, every: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(steps), "--queries", str(queries)]
    if every:
        cmd += ["--every", str(every)]
    print(
        f"running {kind} (steps {steps}{f', {queries} queries' if kind == 'meta' else ''}) ...",
        file=sys.stderr,
        flush=True,
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    train = results["train"]
    rows = [
        "| run | wall (s) | CPU (s) | x training (wall) | x training (CPU) | peak RSS MB (above baseline) | load avg (1 min) before -> after |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(name, r, wall=None, cpu=None, rss=True):
        wall = r["wall_s"] if wall is None else wall
        cpu = r["cpu_s"] if cpu is None else cpu
        mem = f"{r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f})" if rss else "-"
        load = f"{r['loadavg_before'][0]:.1f} -> {r['loadavg_after'][0]:.1f}" if rss else "-"
        rows.append(
            f"| {name} | {wall:.1f} | {cpu:.1f} | {wall / train['wall_s']:.2f} | {cpu / train['cpu_s']:.2f} | {mem} | {load} |"
        )

    row("one training run (train.train_model)", train)
    row("functional training (metagradient.train, no checkpoints)", results["forward"])
    for r in results["meta"]:
        info = r["info"]
        row(
            f"metagradient, {r['queries']} quer{'y' if r['queries'] == 1 else 'ies'} (every {info['every']}: "
            f"forward {info['time_forward']:.0f} s, query grads {info['time_query_gradients']:.0f} s, reverse "
            f"{info['time_reverse']:.0f} s of which recompute {info['time_recompute']:.0f} s)",
            r,
        )
    per = results["per_additional_query"]
    rows.append(
        f"| each further query | {per['wall_s']:.1f} | {per['cpu_s']:.1f} | {per['wall_s'] / train['wall_s']:.2f} | "
        f"{per['cpu_s'] / train['cpu_s']:.2f} | +{per['adjoint_mb']:.1f} (adjoint state) | - |"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps (default: params.yaml's 600)")
    parser.add_argument("--queries", default="1,3", help="query counts of the metagradient runs (worker: one count)")
    parser.add_argument("--every", type=int, default=None, help="checkpoint interval (default ceil(sqrt(steps)))")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "metagradient_cost.json"))
    parser.add_argument("--worker", choices=["train", "forward", "meta"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.queries = int(args.queries)
        print(json.dumps(worker(args)))
        return

    import torch

    counts = sorted({int(q) for q in args.queries.split(",")})
    if len(counts) < 2:
        parser.error("--queries needs two counts (the cost of a further query is their difference)")
    results = {
        "train": run_worker("train", args.steps),
        "forward": run_worker("forward", args.steps),
        "meta": [run_worker("meta", args.steps, q, args.every) for q in counts],
    }
    lo, hi = results["meta"][0], results["meta"][-1]
    dq = hi["queries"] - lo["queries"]
    results["per_additional_query"] = {
        "wall_s": (hi["wall_s"] - lo["wall_s"]) / dq,
        "cpu_s": (hi["cpu_s"] - lo["cpu_s"]) / dq,
        "adjoint_mb": (hi["info"]["adjoint_mb"] - lo["info"]["adjoint_mb"]) / dq,
    }
    train_wall, train_cpu = results["train"]["wall_s"], results["train"]["cpu_s"]
    results["summary"] = {
        "first_query_x_training_wall": lo["wall_s"] / lo["queries"] / train_wall if lo["queries"] == 1 else None,
        "first_query_x_training_cpu": lo["cpu_s"] / train_cpu if lo["queries"] == 1 else None,
        "further_query_x_training_wall": results["per_additional_query"]["wall_s"] / train_wall,
        "further_query_x_training_cpu": results["per_additional_query"]["cpu_s"] / train_cpu,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results["meta"]),
        "peak_rss_above_baseline_mb": max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in results["meta"]),
    }
    results["machine"] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": 1,
        "loadavg_end": _loadavg(),
    }
    results["setup"] = {
        "steps": args.steps,
        "queries": counts,
        "every": args.every or "ceil(sqrt(steps))",
        "config": "params.yaml (300 digits, batch 64, UNet 284,513 params)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
