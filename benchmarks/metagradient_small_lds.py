#!/usr/bin/env python
"""Does the metagradient predict retraining? A small LDS check (not the benchmark's LDS: that needs the DAG rules).

Reduced default setup so it runs in minutes on one CPU thread: the params.yaml model (284,513 parameters), the first
--n-train training digits of the data stage's split, --steps steps at batch --batch (AdamW + cosine, clip 1), the
loss measurement with the measure stage's draws on the first --queries held-out digits. MAGIC scores S = -dm/dw at
w = 1 from workflow_scripts/engines/magic.py (float32), then three ground truths:
- fixed-seed LDS target (the method's own): retrain with the same seed and data order, examples outside each 50%
  subset weighted 0 (metagradient.train_function == train.train_model with weights, tested bit for bit);
- seed-averaged LDS target (the workflow's): train.train_model on the subset's members, seeds s = 0..--seeds-1
  (own data order per subset, as the train_subset rule does);
- leave-1%-out (fixed seed): max(1, N/100) random examples weighted 0, --loo-sets times; Spearman over the
  removal sets of predicted vs actual change, per query (the paper's Figure 3 protocol).
Also: LDS of the fixed-seed retrained models as predictors of the seed-averaged target (how much of the
seed-averaged target a fixed-seed method can reach) and the seed-to-seed noise ceiling.

    .venv/bin/python benchmarks/metagradient_small_lds.py      # ~10 min on the loaded 2-core machine
Writes benchmarks/results/metagradient_small_lds.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from workflow_scripts.core import data
from workflow_scripts.core.common import load_torch
from workflow_scripts.core.lds import lds_per_query, rowwise_spearman
from workflow_scripts.dag.config import load_config
from workflow_scripts.engines import magic as mg
from workflow_scripts.families import ddpm as train


def measure(problem, params, queries) -> np.ndarray:
    return np.array([mg.query_value_and_grad(problem, params, queries, q)[0] for q in range(len(queries))])


def summary(values: np.ndarray) -> str:
    return f"{values.mean():.3f} +- {values.std(ddof=1) / np.sqrt(len(values)):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--queries", type=int, default=6)
    parser.add_argument("--subsets", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--loo-sets", type=int, default=12)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "metagradient_small_lds.json"))
    parser.add_argument("--summarise", metavar="JSON", help="only print the table of an earlier run's results")
    args = parser.parse_args()
    if args.summarise:
        print(report(json.loads(Path(args.summarise).read_text())))
        return
    torch.set_num_threads(1)
    start = time.perf_counter()

    config = load_config(REPO / "params.yaml")
    config["train"].update(steps=args.steps, batch_size=args.batch, resume_every=10**6)
    config["compute"].update(device="cpu", threads=1)
    dataset = data.make_dataset(config["data"], config["seeds"]["split"])
    images, n = dataset["train_images"][: args.n_train], args.n_train
    problem, state0 = mg.build_problem(config, images)
    queries = mg.measurement_queries(config, dataset["heldout_images"], stream=1, indices=np.arange(args.queries))

    t0 = time.perf_counter()
    result = mg.metagradients(problem, state0, queries)
    time_magic = time.perf_counter() - t0
    scores, base = result.scores, result.values
    masks = data.make_subsets(
        n, {**config["lds"], "n_subsets": args.subsets, "n_tuning": 2}, config["seeds"]["subsets"]
    )["masks"]

    fixed = np.stack(
        [measure(problem, mg.train_function(problem, state0, mask.astype(np.float64)), queries) for mask in masks]
    )
    seeded = np.zeros((args.subsets, args.seeds, args.queries))
    with tempfile.TemporaryDirectory() as tmp:
        for j, mask in enumerate(masks):
            for s in range(args.seeds):
                path = train.train_model(
                    config, images, np.flatnonzero(mask), s, Path(tmp) / f"m{j}_{s}.pt", device=torch.device("cpu")
                )
                params = {k: v for k, v in load_torch(path)["state_dict"].items()}
                seeded[j, s] = measure(problem, params, queries)
    k = max(1, n // 100)
    rng = np.random.default_rng(0)
    removals = [rng.choice(n, k, replace=False) for _ in range(args.loo_sets)]
    loo_actual, loo_pred = [], []
    for removed in removals:
        w = np.ones(n)
        w[removed] = 0
        loo_actual.append(measure(problem, mg.train_function(problem, state0, w), queries) - base)
        loo_pred.append(scores[:, removed].sum(1))
    loo_actual, loo_pred = np.array(loo_actual).T, np.array(loo_pred).T  # (Q, sets)

    lds_fixed = lds_per_query(scores, masks, fixed)
    lds_seeded = lds_per_query(scores, masks, seeded.mean(1))
    fixed_as_predictor = rowwise_spearman(fixed.T, seeded.mean(1).T)
    ceiling = rowwise_spearman(seeded[:, 0].T, seeded[:, 1].T) if args.seeds > 1 else np.full(args.queries, np.nan)
    loo_spearman = np.array([spearmanr(a, p).statistic for a, p in zip(loo_actual, loo_pred)])
    subset_pred = scores @ (~masks).T  # (Q, M) predicted change
    out = {
        "setup": vars(args) | {"n_params": problem.n_params(), "every": result.info["every"], "leave_out_size": k},
        "time_s": {"metagradient": time_magic, "total": time.perf_counter() - start},
        "lds_fixed_seed": lds_fixed.tolist(),
        "lds_seed_averaged": lds_seeded.tolist(),
        "fixed_seed_models_vs_seed_averaged": fixed_as_predictor.tolist(),
        "seed_to_seed_ceiling": ceiling.tolist(),
        "leave_out_spearman": loo_spearman.tolist(),
        "leave_out_actual": loo_actual.tolist(),
        "leave_out_predicted": loo_pred.tolist(),
        "subset_actual_change_fixed": (fixed - base).T.tolist(),
        "subset_predicted_change": subset_pred.tolist(),
        "loadavg_end": [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(report(out))
    print(f"\nmetagradient {time_magic:.0f} s, total {time.perf_counter() - start:.0f} s; results: {args.out}")


def report(out: dict) -> str:
    """The Markdown table of a results dictionary (also: --summarise FILE)."""
    setup = out["setup"]
    k, n = setup["leave_out_size"], setup["n_train"]
    actual, predicted = np.array(out["subset_actual_change_fixed"]), np.array(out["subset_predicted_change"])
    loo_actual, loo_pred = np.array(out["leave_out_actual"]), np.array(out["leave_out_predicted"])
    slopes = np.array([np.polyfit(p, a, 1)[0] for a, p in zip(actual, predicted)])
    pearson = np.array([np.corrcoef(a, p)[0, 1] for a, p in zip(actual, predicted)])
    rows = [
        f"| quantity (mean over {setup['queries']} held-out queries +- SE) | value |",
        "|---|---|",
        f"| LDS, fixed-seed target ({setup['subsets']} subsets of 50%) | {summary(np.array(out['lds_fixed_seed']))} |",
        f"| LDS, seed-averaged target ({setup['seeds']} seeds) | {summary(np.array(out['lds_seed_averaged']))} |",
        f"| fixed-seed retrained models as predictors of the seed-averaged target | "
        f"{summary(np.array(out['fixed_seed_models_vs_seed_averaged']))} |",
        f"| seed-to-seed noise ceiling | {summary(np.array(out['seed_to_seed_ceiling']))} |",
        f"| leave-{k}-out ({100 * k / n:.0f}%), Spearman over {setup['loo_sets']} removal sets | "
        f"{summary(np.array(out['leave_out_spearman']))} |",
        f"| leave-{k}-out: median abs(predicted) / abs(actual) change | {np.median(np.abs(loo_pred) / np.abs(loo_actual)):.2f} |",
        f"| 50% subsets: actual change, mean (predicted) | {actual.mean():.4f} ({predicted.mean():.4f}) |",
        f"| 50% subsets: Pearson over subsets of actual vs predicted | {summary(pearson)} |",
        f"| 50% subsets: slope of actual on predicted (range over queries) | {np.median(slopes):.2f} "
        f"({slopes.min():.2f}-{slopes.max():.2f}) |",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
