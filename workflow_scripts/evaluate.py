"""Stage `evaluate`: the LDS table (CSV, Markdown, JSON metrics) and its bar chart.

Each method is reported on the EVALUATION subsets with the lambda chosen on the TUNING subsets:
mean LDS over queries, its standard error, and a bootstrap CI over subsets. The column
`lds_tuned_on_evaluation` is the best evaluation LDS over the lambda grid -- the number the
published repositories report (they tune on the subsets they report) -- labelled as such.
The noise ceiling row is the seed-to-seed rank correlation of the measured targets.

Both tables are also written as small HTML pages (.html) for the report.

The K-FAC ablation table repeats the rows of the kfac methods with their resolved settings (Fisher type,
expand/reduce, EK-FAC, query-gradient quantisation, damping) as columns, beside the noise ceiling and
TRAK / D-TRAK for reference.
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
from .plotting import html_page, markdown_to_html

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
                             "ci_low": np.nan, "ci_high": np.nan, "n_queries": 0,
                             "n_queries_total": target.shape[-1], "n_subsets": len(evaluation),
                             "lds_tuned_on_evaluation": np.nan, "note": chosen["not_run"]})
                continue
            scores = np.load(directory / f"{name}.npy")
            sweep = pd.read_csv(directory / "sweep.csv")
            best_on_evaluation = sweep.loc[sweep["query_set"] == name, "lds_evaluation"].max()
            summary = lds_summary(scores, masks, target.mean(1), lds_cfg["bootstrap_samples"], lds_cfg["ci"], seed)
            rows.append({"method": method, "query_set": name, "lambda": np.nan if chosen["lambda"] is None else chosen["lambda"],
                         **summary, "lds_tuned_on_evaluation": best_on_evaluation,
                         "note": coverage_note(summary, (chosen.get("notes") or {}).get(name, ""))})
    return pd.DataFrame(rows)


def coverage_note(summary: dict, note: str) -> str:
    """The row's note, prefixed with how many queries it covers when the method scored only some (NaN rows)."""
    if summary["n_queries"] == summary["n_queries_total"]:
        return note
    coverage = f"LDS over {summary['n_queries']} of {summary['n_queries_total']} queries"
    return f"{coverage}; {note}" if note else coverage


ABLATION_REFERENCES = ("trak", "d_trak")  # rows shown beside the K-FAC variants, when configured
ABLATION_COLUMNS = ("fisher_type", "kfac_approx", "ekfac", "quantization", "damping")


def kfac_ablation(table: pd.DataFrame, method_dirs: dict[str, Path]) -> pd.DataFrame:
    """Rows of the kfac methods (settings from their chosen.json) plus the noise ceiling and reference rows."""
    settings = {}
    for method, directory in method_dirs.items():
        chosen = json.loads((directory / "chosen.json").read_text())
        if chosen.get("config", {}).get("family") == "kfac":
            settings[method] = chosen.get("settings") or {}
    keep = table["method"].isin([*settings, NOISE_CEILING, *ABLATION_REFERENCES])
    ablation = table[keep].copy()
    for column in ABLATION_COLUMNS:
        ablation[column] = ablation["method"].map(lambda m: settings.get(m, {}).get(column, ""))
    return ablation[["method", *ABLATION_COLUMNS, "query_set", "lds", "ci_low", "ci_high", "lambda",
                     "lds_tuned_on_evaluation", "note"]]


def ablation_markdown(ablation: pd.DataFrame) -> str:
    if not (ablation["fisher_type"] != "").any():
        return "No kfac methods are configured (scores.methods): nothing to ablate.\n"
    lines = ["| method | Fisher | K-FAC | EK-FAC | query gradients | damping | query set | LDS (evaluation subsets) | 95% bootstrap CI | lambda (tuned) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ablation.itertuples():
        ekfac = {True: "yes", False: "no"}.get(r.ekfac, "")
        lam = "-" if np.isnan(r[11]) else f"{r[11]:g}"
        lds = f"{r.lds:.3f}" if not np.isnan(r.lds) else (r.note or "not run")
        ci = f"[{r.ci_low:.3f}, {r.ci_high:.3f}]" if not np.isnan(r.lds) else ""
        lines.append(f"| {r.method} | {r.fisher_type} | {r.kfac_approx} | {ekfac} | {r.quantization} | {r.damping} | "
                     f"{r.query_set} | {lds} | {ci} | {lam} |")
    lines.append("")
    lines.append("lambda: relative to the mean eigenvalue of the fitted G, chosen on the tuning subsets; damping "
                 "'absolute': the paper's untuned value, in units of G.")
    return "\n".join(lines) + "\n"


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
        se = "-" if np.isnan(r.se) else f"{r.se:.3f}"  # no SE over a single scored query
        lines.append(f"| {r.method} | {r.query_set} | {r.lds:.3f} | {se} | [{r.ci_low:.3f}, {r.ci_high:.3f}] | {lam} | {tuned} | {note} |")
    lines.append("")
    lines.append("*best LDS over the lambda grid measured on the evaluation subsets themselves (how published repositories tune); "
                 "not an honest estimate, shown for comparison only.")
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, path: str | Path,
         title: str = "Linear datamodelling score, 95% bootstrap CI over subsets") -> None:
    """Bar chart of the table's LDS with CIs, written as `path` (.png) and beside it as .pdf."""
    import seaborn as sns

    from .plotting import plt, save_figure

    stem = Path(path).with_suffix("")

    table = table.dropna(subset=["lds"])  # methods that did not run have no bar (the table says why)
    if table.empty:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}:\nno method produced scores", ha="center", va="center")
        save_figure(fig, stem, dpi=120)
        return
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
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, stem, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subsets", required=True)
    parser.add_argument("--measurements", nargs="+", required=True)
    parser.add_argument("--scores", nargs="+", required=True, help="score directories, one per method (named by method)")
    parser.add_argument("--table", required=True, help="output stem: writes .csv, .md and .json")
    parser.add_argument("--figure", required=True)
    parser.add_argument("--ablation", required=True, help="K-FAC ablation output stem: writes .csv and .md")
    parser.add_argument("--ablation-figure", required=True)


def run(args, config: dict) -> None:
    subsets = data_stage.load_subsets(args.subsets)
    targets = load_targets(args.measurements, config["lds"]["n_subsets"], config["lds"]["n_seeds"])
    method_dirs = {Path(d).name: Path(d) for d in args.scores}
    table = lds_table(method_dirs, subsets, targets, config["lds"], config["seeds"]["bootstrap"])
    stem = Path(args.table)
    save_text(table.to_csv(index=False), stem.with_suffix(".csv"))
    save_text(to_markdown(table), stem.with_suffix(".md"))
    save_text(html_page("Linear datamodelling score", markdown_to_html(to_markdown(table))), stem.with_suffix(".html"))
    save_json({f"{r.method}/{r.query_set}": {"lds": r.lds, "ci_low": r.ci_low, "ci_high": r.ci_high}
               for r in table.itertuples() if not np.isnan(r.lds)},
              stem.with_suffix(".json"))
    plot(table, args.figure)
    ablation = kfac_ablation(table, method_dirs)
    ablation_stem = Path(args.ablation)
    save_text(ablation.to_csv(index=False), ablation_stem.with_suffix(".csv"))
    save_text(ablation_markdown(ablation), ablation_stem.with_suffix(".md"))
    save_text(html_page("K-FAC influence ablation", markdown_to_html(ablation_markdown(ablation))),
              ablation_stem.with_suffix(".html"))
    plot(ablation, args.ablation_figure,
         "K-FAC influence ablation: LDS, 95% bootstrap CI over subsets")
    log.info("evaluate:\n%s", to_markdown(table))
