"""Stage `scores`: one attribution method's score matrices, its lambda chosen on TUNING subsets.

For each lambda of scores.lambda_grid (methods without one: a single entry) the LDS of every query
set is computed on the TUNING subsets and, for the record, on the EVALUATION subsets. The lambda
with the best mean TUNING LDS over the query sets is kept; its matrices are written as
<query_set>.npy (n_query x n_train, float32) beside sweep.csv.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from . import data as data_stage
from .common import ArtefactError, log, save_json, save_npy, save_text
from .gradients import open_store, read_sidecar
from .lds import lds_per_query
from .measure import QUERY_SETS, load_queries, load_targets
from .scorers import get_family


class ScorerInputs:
    """Lazy access to what scorers read: images, query images and cached gradient features."""

    query_sets = QUERY_SETS

    def __init__(self, dataset: str, samples: str, features_dir: str | None = None):
        self.dataset, self.samples, self.features_dir = dataset, samples, features_dir
        self._queries = None

    def train_images(self) -> np.ndarray:
        return data_stage.load_dataset(self.dataset)["train_images"]

    def queries(self) -> dict[str, np.ndarray]:
        if self._queries is None:
            self._queries = load_queries(self.dataset, self.samples)
        return self._queries

    def features(self, output_function: str, split: str) -> np.ndarray:
        if self.features_dir is None:
            raise ArtefactError("this scorer needs gradient features, but no --features directory was given")
        path = Path(self.features_dir) / f"{split}.npy"
        array = open_store(path)
        made_by = read_sidecar(path)["made_by"]
        if made_by["output_function"] != output_function:
            raise ArtefactError(f"{self.features_dir}: features of output function {made_by['output_function']!r}, "
                                f"the method needs {output_function!r}")
        return np.asarray(array)


def sweep(results: list, masks: np.ndarray, tuning: np.ndarray, evaluation: np.ndarray,
          targets: dict[str, np.ndarray]) -> pd.DataFrame:
    """LDS of every (lambda, query set) on tuning and evaluation subsets; targets are seed-averaged."""
    rows = []
    for lam, matrices in results:
        for name, scores in matrices.items():
            target = targets[name].mean(1)  # (n_subsets, n_query)
            rows.append({"lambda": np.nan if lam is None else lam, "query_set": name,
                         "lds_tuning": lds_per_query(scores, masks[tuning], target[tuning]).mean(),
                         "lds_evaluation": lds_per_query(scores, masks[evaluation], target[evaluation]).mean()})
    return pd.DataFrame(rows)


def choose(results: list, table: pd.DataFrame) -> int:
    """Index into results of the lambda with the best mean TUNING LDS over query sets."""
    mean_tuning = table.groupby("lambda", dropna=False, sort=False)["lds_tuning"].mean().to_numpy()
    return int(np.nanargmax(mean_tuning)) if len(results) > 1 else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--subsets", required=True)
    parser.add_argument("--measurements", nargs="+", required=True, help="per-model measurements, subset-major")
    parser.add_argument("--features", help="gradient store directory (gradient-based methods)")
    parser.add_argument("--out-dir", required=True)


def run(args, config: dict) -> None:
    methods = config["scores"]["methods"]
    if args.method not in methods:
        raise ValueError(f"method {args.method!r} is not in scores.methods ({sorted(methods)})")
    method_cfg = methods[args.method]
    family = get_family(method_cfg["family"])
    inputs = ScorerInputs(args.dataset, args.samples, args.features)
    results = family.compute(method_cfg, inputs, config["scores"]["lambda_grid"])
    subsets = data_stage.load_subsets(args.subsets)
    targets = load_targets(args.measurements, config["lds"]["n_subsets"], config["lds"]["n_seeds"])
    table = sweep(results, subsets["masks"], subsets["tuning"], subsets["evaluation"], targets)
    best = choose(results, table)
    chosen_lambda, matrices = results[best]
    out = Path(args.out_dir)
    for name, scores in matrices.items():
        if not np.isfinite(scores).all():
            raise FloatingPointError(f"{args.method}: non-finite scores for {name}")
        save_npy(scores.astype(np.float32), out / f"{name}.npy")
    save_text(table.to_csv(index=False), out / "sweep.csv")
    save_json({"method": args.method, "config": method_cfg, "lambda": chosen_lambda}, out / "chosen.json")
    log.info("scores %s: lambda %s; tuning LDS %s", args.method, chosen_lambda,
             table[table["lambda"].eq(chosen_lambda) | table["lambda"].isna()].set_index("query_set")["lds_tuning"].round(3).to_dict())
