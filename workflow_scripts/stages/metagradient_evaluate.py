"""Stage `metagradient_evaluate`: the metagradient (MAGIC) table, on its own fixed-seed ground truth and the usual one.

Rows per metagradient method and query set, over the queries it attributed (max_queries; the table says how many):
- LDS, fixed-seed target: Spearman over the EVALUATION subsets of the prediction sum_{i not in S_j} S[q, i] and
  m_q of the model retrained with the full model's seed and data order, the examples outside S_j weighted 0
  (fixed_seed/subset<j>), the target the metagradient differentiates;
- LDS, seed-averaged target: the LDS table's number (same subsets, models retrained on the subset, averaged over
  lds.n_seeds seeds);
- leave-out Spearman: Spearman over the fixed_seed.loo_sets leave-out sets of the predicted change
  sum_{i removed} S[q, i] and the actual change m_q(fixed_seed/loo<k>) - m_q(full model) (the paper reports ~0.9
  for leave-1%-out); the note gives the median |predicted| / |actual| change.
Reference rows on the same queries: the fixed-seed retrained models themselves as predictors of the seed-averaged
target (the most a fixed-seed method can reach on it) and the seed-to-seed noise ceiling.
Mean over queries, SE over queries, 95% bootstrap CI over subsets (leave-out: over sets).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import ArtefactError, load_json, load_npy, load_npz, log
from workflow_scripts.core.contracts import QUERY_SETS
from workflow_scripts.core.fixed_seed import load_sets
from workflow_scripts.core.lds import (
    lds_per_query,
    noise_ceiling_per_query,
    rowwise_spearman,
    scored_queries,
    summarise,
)
from workflow_scripts.families.likelihood import load_targets
from workflow_scripts.report.plotting import save_table

FIXED_SEED_LDS = "LDS, fixed-seed target"
SEED_AVERAGED_LDS = "LDS, seed-averaged target"
LOO_SPEARMAN = "leave-out Spearman (predicted vs actual change)"
FIXED_SEED_PREDICTOR = "reference: fixed-seed retrained models as predictors of the seed-averaged target"
NOISE_CEILING = "reference: noise ceiling (seed-to-seed)"


def load_fixed_seed(paths: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """{set name (directory name: full, subset<j>, loo<k>): {query set: (n_query,) measurement}}."""
    out = {}
    for path in paths:
        arrays = load_npz(path, QUERY_SETS)
        out[Path(path).parent.name] = {name: arrays[name].astype(np.float64) for name in QUERY_SETS}
    if out and "full" not in out:
        raise ArtefactError("the fixed-seed measurements need the full model's (fixed_seed/full/measurement.npz)")
    return out


def _masked(values: np.ndarray, scored: np.ndarray) -> np.ndarray:
    return np.where(scored, values, np.nan)


def method_rows(
    method: str,
    scores: np.ndarray,
    name: str,
    subsets: dict,
    seed_averaged: np.ndarray,
    sets: dict,
    fixed: dict,
    lds_cfg: dict,
    seed: int,
) -> list[dict]:
    """The table rows of one method and query set. seed_averaged: (n_subsets, n_seeds, n_query) measurements."""
    scored = scored_queries(scores)
    n_total = len(scored)
    if not scored.all():
        log.warning(
            "metagradient table %s %s: %d of %d queries attributed; rows are over those only",
            method,
            name,
            int(scored.sum()),
            n_total,
        )
    evaluation = subsets["evaluation"]
    set_names = [str(n) for n in sets["names"]]
    subset_names = [f"subset{j:03d}" for j in evaluation]
    missing = [n for n in subset_names if n not in fixed]
    if missing:
        raise ArtefactError(f"no fixed-seed measurement for {missing[:5]} (evaluation subsets)")
    masks = subsets["masks"][evaluation]
    for j, n in zip(evaluation, subset_names):
        if n in set_names and not np.array_equal(sets["masks"][set_names.index(n)], subsets["masks"][j]):
            raise ArtefactError(
                f"fixed_seed/sets.npz: {n} is not LDS subset {j} of data/subsets.npz; rerun rule fixed_seed_sets"
            )
    fixed_target = np.stack([fixed[n][name] for n in subset_names])  # (n_eval, n_query)
    averaged = seed_averaged[evaluation].mean(1)
    n_boot, ci = lds_cfg["bootstrap_samples"], lds_cfg["ci"]
    rows = []

    def add(target: str, per_fn, n_sets: int, note: str = ""):
        summary = summarise(per_fn, n_sets, n_boot, ci, seed)
        rows.append(
            {
                "method": method,
                "query_set": name,
                "target": target,
                "value": summary["lds"],
                "se": summary["se"],
                "ci_low": summary["ci_low"],
                "ci_high": summary["ci_high"],
                "n_queries": summary["n_queries"],
                "n_queries_total": n_total,
                "n_sets": n_sets,
                "note": note,
            }
        )

    add(FIXED_SEED_LDS, lambda idx: lds_per_query(scores, masks[idx], fixed_target[idx]), len(evaluation))
    add(SEED_AVERAGED_LDS, lambda idx: lds_per_query(scores, masks[idx], averaged[idx]), len(evaluation))
    loo_names = [n for n in set_names if n.startswith("loo")]
    if len(loo_names) >= 2:
        removed = ~sets["masks"][[set_names.index(n) for n in loo_names]]  # (n_loo, N)
        predicted = np.where(
            scored[:, None], np.nan_to_num(scores.astype(np.float64)) @ removed.T.astype(np.float64), np.nan
        )  # (n_query, n_loo)
        actual = np.stack([fixed[n][name] - fixed["full"][name] for n in loo_names], axis=1)
        ratio = np.median(np.abs(predicted[scored]) / np.maximum(np.abs(actual[scored]), 1e-300))
        size = int(removed[0].sum())

        def loo(idx):
            out = np.full(n_total, np.nan)
            out[scored] = rowwise_spearman(predicted[scored][:, idx], actual[scored][:, idx])
            return out

        add(
            LOO_SPEARMAN,
            loo,
            len(loo_names),
            f"{size} of {removed.shape[1]} examples removed per set; median |predicted| / |actual| change {ratio:.2f}",
        )
    else:
        log.warning(
            "metagradient table: %d leave-out sets (fixed_seed.loo_sets); a Spearman needs at least 2", len(loo_names)
        )
    add(
        FIXED_SEED_PREDICTOR,
        lambda idx: _masked(rowwise_spearman(fixed_target[idx].T, averaged[idx].T), scored),
        len(evaluation),
        "no scores: the measured fixed-seed m_q itself",
    )
    if seed_averaged.shape[1] >= 2:
        add(
            NOISE_CEILING,
            lambda idx: _masked(noise_ceiling_per_query(seed_averaged[evaluation][idx]), scored),
            len(evaluation),
            "two retrainings of the same subset, different seeds",
        )
    return rows


def metagradient_table(
    method_dirs: dict[str, Path], subsets: dict, targets: dict, sets: dict, fixed: dict, lds_cfg: dict, seed: int
) -> pd.DataFrame:
    rows = []
    for method, directory in method_dirs.items():
        for name in QUERY_SETS:
            scores = load_npy(directory / f"{name}.npy", "scores")
            rows += method_rows(method, scores, name, subsets, targets[name], sets, fixed, lds_cfg, seed)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "No metagradient method is configured (scores.methods): no fixed-seed ground truth was computed.\n"
    lines = [
        "| method | query set | target | value | SE | 95% bootstrap CI | queries | subsets / sets | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        se = "-" if np.isnan(r.se) else f"{r.se:.3f}"
        lines.append(
            f"| {r.method} | {r.query_set} | {r.target} | {r.value:.3f} | {se} | [{r.ci_low:.3f}, {r.ci_high:.3f}] "
            f"| {r.n_queries} of {r.n_queries_total} | {r.n_sets} | {r.note} |"
        )
    lines.append("")
    lines.append(
        "Mean over the attributed queries (the others were not attributed: metagradient max_queries), SE over "
        "those queries ('-' for one), 95% bootstrap CI over the evaluation subsets (leave-out: over the sets). "
        "Fixed-seed target: retrained with the full model's seed and data order, the removed examples "
        "weighted 0 -- what the metagradient differentiates; seed-averaged target: the LDS table's."
    )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subsets", required=True)
    parser.add_argument("--measurements", nargs="+", required=True, help="the LDS retrainings' measurements")
    parser.add_argument("--fixed-seed-sets", help="fixed_seed/sets.npz (absent without a metagradient method)")
    parser.add_argument("--fixed-seed", nargs="*", default=[], help="fixed_seed/<name>/measurement.npz, full included")
    parser.add_argument("--scores", nargs="*", default=[], help="score directories of the metagradient methods")
    parser.add_argument("--table", required=True, help="output stem: writes .csv, .md and .html")


def run(args, config: dict) -> None:
    stem = Path(args.table)
    if args.scores:
        if not args.fixed_seed_sets or not args.fixed_seed:
            raise ValueError("metagradient methods need --fixed-seed-sets and --fixed-seed measurements")
        for directory in args.scores:
            chosen = load_json(Path(directory) / "chosen.json", "scores")
            if chosen.get("config", {}).get("family") != "metagradient":
                raise ArtefactError(f"{directory}: not a metagradient method's scores")
        subsets = core_data.load_subsets(args.subsets)
        targets = load_targets(args.measurements, config["lds"]["n_subsets"], config["lds"]["n_seeds"])
        table = metagradient_table(
            {Path(d).name: Path(d) for d in args.scores},
            subsets,
            targets,
            load_sets(args.fixed_seed_sets),
            load_fixed_seed(args.fixed_seed),
            config["lds"],
            config["seeds"]["bootstrap"],
        )
    else:
        table = pd.DataFrame()
    markdown = to_markdown(table)
    save_table(table, markdown, stem, "Metagradient attribution")
    log.info("metagradient_evaluate:\n%s", markdown)
