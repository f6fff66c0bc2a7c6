"""Every method on the queries one method attributed (e.g. the metagradient's first max_queries), on the
metagradient's targets.

    python benchmarks/lds_on_queries.py [--results results/digits] [--of metagradient] [--config params.yaml ...]

A method that scores only some queries (NaN rows) is compared in the LDS table with the others' means over ALL
queries. This prints, for every method on exactly the queries `--of` scored: the LDS on the fixed-seed target, the
LDS on the seed-averaged loss target (the LDS table's) and the leave-out Spearman on the fixed-seed leave-1%-out
sets -- the rows of `tables/metagradient.md`, computed by the same code (metagradient_evaluate.method_rows) for
every method -- and the noise ceiling on those queries. Mean over the queries (SE). Reads a finished run's scores
and measurement files (the run must include a metagradient method: its fixed-seed retrainings).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflow_scripts.core import data as core_data
from workflow_scripts.core.contracts import QUERY_SETS
from workflow_scripts.core.fixed_seed import load_sets
from workflow_scripts.core.lds import scored_queries
from workflow_scripts.dag import paths
from workflow_scripts.dag.config import load_config
from workflow_scripts.families.likelihood import load_targets
from workflow_scripts.stages import metagradient_evaluate as M

COLUMNS = {
    M.FIXED_SEED_LDS: "LDS fixed-seed",
    M.SEED_AVERAGED_LDS: "LDS seed-averaged",
    M.LOO_SPEARMAN: "leave-out Spearman",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results/digits", help="the run's results/<benchmark> directory")
    parser.add_argument("--of", default="metagradient", help="the method whose scored queries to evaluate on")
    parser.add_argument("--config", nargs="+", default=["params.yaml"], help="params.yaml, then the run's overlays")
    args = parser.parse_args()

    M.log.setLevel(logging.ERROR)  # every other method is masked to --of's queries on purpose: no warning per method
    config = load_config(*args.config)
    root = Path(args.results)
    subsets = core_data.load_subsets(root / "data/subsets.npz")
    files = [str(root / "measurements" / Path(p).name) for p in paths.measurement_files(config)]
    targets = load_targets(files, config["lds"]["n_subsets"], config["lds"]["n_seeds"])
    sets = load_sets(root / "fixed_seed/sets.npz")
    fixed = M.load_fixed_seed(sorted(str(p) for p in (root / "fixed_seed").glob("*/measurement.npz")))
    methods = [
        d.name
        for d in (root / "scores").iterdir()
        if (d / "chosen.json").exists() and "not_run" not in json.loads((d / "chosen.json").read_text())
    ]
    order = {m: k for k, m in enumerate(config["scores"]["methods"])}
    methods.sort(key=lambda m: order.get(m, len(order)))

    ceiling = "noise ceiling (seed-to-seed)"
    table, keep = {ceiling: {}}, {}  # {row: {(query set, column): cell}}, the ceiling's row first
    for name in QUERY_SETS:
        keep[name] = scored_queries(np.load(root / "scores" / args.of / f"{name}.npy"))
        for method in methods:
            scores = np.load(root / "scores" / method / f"{name}.npy").astype(np.float64)
            scores[~keep[name]] = np.nan  # the same queries as --of
            for row in M.method_rows(
                method, scores, name, subsets, targets[name], sets, fixed, config["lds"], config["seeds"]["bootstrap"]
            ):
                # the noise ceiling (the same for every method) goes in the seed-averaged column of its own row
                key, label = (
                    (ceiling, COLUMNS[M.SEED_AVERAGED_LDS])
                    if row["target"] == M.NOISE_CEILING
                    else (method, COLUMNS.get(row["target"]))
                )
                if label:
                    se = "-" if np.isnan(row["se"]) else f"{row['se']:.3f}"
                    table.setdefault(key, {})[(name, label)] = f"{row['value']:.3f} ({se})"
    columns = [(name, label) for name in QUERY_SETS for label in COLUMNS.values()]
    print("| method | " + " | ".join(f"{name}: {label}" for name, label in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for method, cells in table.items():
        print(f"| {method} | " + " | ".join(cells.get(c, "") for c in columns) + " |")
    print(
        "\nmean over the queries (SE over them); queries: "
        + ", ".join(f"{name} {np.flatnonzero(k).tolist()}" for name, k in keep.items())
        + f"; {len(subsets['evaluation'])} evaluation subsets; leave-out sets: "
        f"{sum(str(n).startswith('loo') for n in sets['names'])}; the noise ceiling is of the seed-averaged target"
    )


if __name__ == "__main__":
    main()
