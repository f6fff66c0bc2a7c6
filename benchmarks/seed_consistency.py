"""How much of a retraining's measured loss is the subset, and how much the seed? On a run's LDS measurements.

    python benchmarks/seed_consistency.py results/digits-latent [results/other-run ...]

Each LDS retraining j, s is trained on subset j with seed seeds.train + s: the seed (initialisation, data order,
noise draws) is shared by every subset, so a model's loss on a query q is, as a two-way layout,

    y[j, s, q] = mu_q + subset_q[j] + seed_q[s] + interaction_q[j, s].

The seed's main effect shifts every subset alike and leaves the LDS (a rank correlation over subsets) untouched;
the interaction is the noise that limits it. Per query, the two-way analysis of variance without replication gives
the mean squares of the subset effect (MS_subset) and of the interaction (MS_res), and the consistency of the subset
ranking between seeds (intra-class correlation, consistency form):

    ICC = (MS_subset - MS_res) / (MS_subset + (n_seeds - 1) MS_res),

the Pearson-scale counterpart of the noise ceiling of the LDS table (the Spearman correlation between two seeds'
measurements over subsets, also printed). Prints one Markdown row per run and query set: the median and pooled ICC
over queries, the mean noise ceiling, and the standard deviations of the three effects (median over queries).
Reads only the measurement files (measurements/subset<j>_seed<s>.npz, the primary target); no model is loaded.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.core.contracts import QUERY_SETS
from workflow_scripts.core.lds import noise_ceiling_per_query

NAME = re.compile(r"subset(\d+)_seed(\d+)\.npz")


def load_layout(run: Path) -> dict[str, np.ndarray]:
    """{query set: (n_subsets, n_seeds, n_query)} of the primary target, from every measurement of the run."""
    found = {
        tuple(map(int, m.groups())): p for p in (run / "measurements").glob("*.npz") if (m := NAME.fullmatch(p.name))
    }
    if not found:
        raise SystemExit(f"{run}/measurements has no subset<j>_seed<s>.npz: is {run} a finished run?")
    subsets = sorted({j for j, _ in found})
    seeds = sorted({s for _, s in found})
    missing = [f"subset{j:03d}_seed{s}" for j in subsets for s in seeds if (j, s) not in found]
    if missing:
        raise SystemExit(f"{run}/measurements lacks {', '.join(missing[:5])}: the layout must be complete")
    layout = {}
    for name in QUERY_SETS:
        rows = []
        for j in subsets:
            row = []
            for s in seeds:
                with np.load(found[(j, s)]) as z:
                    key = name if "measurement" not in z.files else f"{name}__{z['measurement']}"
                    if key not in z.files:
                        break
                    row.append(np.asarray(z[key], np.float64))
            rows.append(row)
        if all(len(row) == len(seeds) for row in rows):
            layout[name] = np.array(rows)
    return layout


def decompose(y: np.ndarray) -> dict:
    """Two-way analysis of variance without replication of y (n_subsets, n_seeds, n_query), per query."""
    n_subsets, n_seeds, _ = y.shape
    if n_seeds < 2 or n_subsets < 2:
        raise SystemExit("the decomposition needs at least 2 subsets and 2 seeds")
    subset_mean = y.mean(1, keepdims=True)
    seed_mean = y.mean(0, keepdims=True)
    grand = y.mean((0, 1), keepdims=True)
    ms_subset = n_seeds * ((subset_mean - grand) ** 2).sum((0, 1)) / (n_subsets - 1)
    ms_seed = n_subsets * ((seed_mean - grand) ** 2).sum((0, 1)) / (n_seeds - 1)
    residual = y - subset_mean - seed_mean + grand
    ms_res = (residual**2).sum((0, 1)) / ((n_subsets - 1) * (n_seeds - 1))
    icc = (ms_subset - ms_res) / (ms_subset + (n_seeds - 1) * ms_res)
    return {
        "icc_median": float(np.median(icc)),
        "icc_pooled": float((ms_subset - ms_res).sum() / (ms_subset + (n_seeds - 1) * ms_res).sum()),
        "ceiling": float(np.nanmean(noise_ceiling_per_query(y))),
        # the effects' standard deviations (variance components, clipped at 0), median over queries
        "sd_subset": float(np.median(np.sqrt(np.clip((ms_subset - ms_res) / n_seeds, 0, None)))),
        "sd_seed": float(np.median(np.sqrt(np.clip((ms_seed - ms_res) / n_subsets, 0, None)))),
        "sd_interaction": float(np.median(np.sqrt(ms_res))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="results/<benchmark> directories")
    args = parser.parse_args()
    print(
        "| run | query set | subsets x seeds | ICC (median over queries) | ICC (pooled) | noise ceiling (mean) "
        "| sd subset | sd seed | sd interaction |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        for name, y in load_layout(run).items():
            d = decompose(y)
            print(
                f"| {run} | {name} | {y.shape[0]} x {y.shape[1]} | {d['icc_median']:.3f} | {d['icc_pooled']:.3f} "
                f"| {d['ceiling']:.3f} | {d['sd_subset']:.2e} | {d['sd_seed']:.2e} | {d['sd_interaction']:.2e} |"
            )


if __name__ == "__main__":
    main()
