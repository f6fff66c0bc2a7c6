"""Stage `evaluate`: the LDS table (CSV, Markdown, JSON metrics) and its bar chart.

Each method is reported on the EVALUATION subsets with the lambda chosen on the TUNING subsets:
mean LDS over queries, its standard error, and a bootstrap CI over subsets. The column
`lds_tuned_on_evaluation` is the best evaluation LDS over the lambda grid -- the number the
published repositories report (they tune on the subsets they report) -- labelled as such.
The noise ceiling row is the seed-to-seed rank correlation of the measured targets.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import data as data_stage
from .common import load_npz, log, save_json, save_text
from .lds import lds_summary, noise_ceiling_summary
from .measure import QUERY_SETS, load_targets

NOISE_CEILING = "noise ceiling (seed-to-seed)"


def lds_table(method_dirs: dict[str, Path], subsets: dict, targets: dict, lds_cfg: dict, seed: int) -> pd.DataFrame:
    evaluation = subsets["evaluation"]
    masks = subsets["masks"][evaluation]
    rows = []
    for name in QUERY_SETS:
        target = targets[name][evaluation]  # (n_eval, n_seeds, n_query)
        if target.shape[1] >= 2:
            ceiling = noise_ceiling_summary(target, lds_cfg["bootstrap_samples"], lds_cfg["ci"], seed)
            rows.append({"method": NOISE_CEILING, "query_set": name, "lambda": np.nan, **ceiling,
                         "lds_tuned_on_evaluation": np.nan, "note": "two retrainings of the same subset"})
        for method, directory in method_dirs.items():
            chosen = json.loads((directory / "chosen.json").read_text())
            if "not_run" in chosen:  # the method could not run here: a row that says why, no number
                rows.append({"method": method, "query_set": name, "lambda": np.nan, "lds": np.nan, "se": np.nan,
                             "ci_low": np.nan, "ci_high": np.nan, "n_queries": 0, "n_subsets": len(evaluation),
                             "lds_tuned_on_evaluation": np.nan, "note": chosen["not_run"]})
                continue
            scores = np.load(directory / f"{name}.npy")
            sweep = pd.read_csv(directory / "sweep.csv")
            best_on_evaluation = sweep.loc[sweep["query_set"] == name, "lds_evaluation"].max()
            summary = lds_summary(scores, masks, target.mean(1), lds_cfg["bootstrap_samples"], lds_cfg["ci"], seed)
            rows.append({"method": method, "query_set": name, "lambda": np.nan if chosen["lambda"] is None else chosen["lambda"],
                         **summary, "lds_tuned_on_evaluation": best_on_evaluation,
                         "note": (chosen.get("notes") or {}).get(name, "")})
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["| method | query set | LDS (evaluation subsets) | SE | 95% bootstrap CI | lambda (tuned) | LDS tuned on evaluation* | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        note = r.note if isinstance(r.note, str) else ""
        if np.isnan(r.lds):
            lines.append(f"| {r.method} | {r.query_set} | {note or 'not run'} | | | | | |")
            continue
        lam = "-" if np.isnan(r[3]) else f"{r[3]:g}"
        tuned = "-" if np.isnan(r.lds_tuned_on_evaluation) else f"{r.lds_tuned_on_evaluation:.3f}"
        lines.append(f"| {r.method} | {r.query_set} | {r.lds:.3f} | {r.se:.3f} | [{r.ci_low:.3f}, {r.ci_high:.3f}] | {lam} | {tuned} | {note} |")
    lines.append("")
    lines.append("*best LDS over the lambda grid measured on the evaluation subsets themselves (how published repositories tune); "
                 "not an honest estimate, shown for comparison only.")
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    table = table.dropna(subset=["lds"])  # methods that did not run have no bar (the table says why)
    order = list(dict.fromkeys(table["method"]))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(order), 4))
    sns.barplot(data=table, x="method", y="lds", hue="query_set", order=order, ax=ax, errorbar=None)
    # seaborn's own error bars would bootstrap over rows; draw ours (bootstrap CI over subsets).
    for container, name in zip(ax.containers, table["query_set"].unique()):
        sub = table[table["query_set"] == name].set_index("method").loc[order]
        x = [bar.get_x() + bar.get_width() / 2 for bar in container]
        # A percentile bootstrap CI need not contain the point estimate; clip so the bar stays drawable.
        yerr = [(sub["lds"] - sub["ci_low"]).clip(lower=0), (sub["ci_high"] - sub["lds"]).clip(lower=0)]
        ax.errorbar(x, sub["lds"], yerr=yerr, fmt="none", c="k", capsize=3)
    ax.axhline(0, c="grey", lw=0.8)
    ax.set_ylabel("LDS (Spearman), evaluation subsets")
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=30)
    ax.set_title("Linear datamodelling score, 95% bootstrap CI over subsets")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subsets", required=True)
    parser.add_argument("--measurements", nargs="+", required=True)
    parser.add_argument("--scores", nargs="+", required=True, help="score directories, one per method (named by method)")
    parser.add_argument("--table", required=True, help="output stem: writes .csv, .md and .json")
    parser.add_argument("--figure", required=True)


def run(args, config: dict) -> None:
    subsets = data_stage.load_subsets(args.subsets)
    targets = load_targets(args.measurements, config["lds"]["n_subsets"], config["lds"]["n_seeds"])
    method_dirs = {Path(d).name: Path(d) for d in args.scores}
    table = lds_table(method_dirs, subsets, targets, config["lds"], config["seeds"]["bootstrap"])
    stem = Path(args.table)
    save_text(table.to_csv(index=False), stem.with_suffix(".csv"))
    save_text(to_markdown(table), stem.with_suffix(".md"))
    save_json({f"{r.method}/{r.query_set}": {"lds": r.lds, "ci_low": r.ci_low, "ci_high": r.ci_high}
               for r in table.itertuples() if not np.isnan(r.lds)},
              stem.with_suffix(".json"))
    plot(table, args.figure)
    log.info("evaluate:\n%s", to_markdown(table))
