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

Likelihood measurements (measure.measurements; the targets every measurement file holds): `lds_measurements`
is the LDS table for every target (loss, elbo, timestep_loss_t<t>, trajectory), long format with a
`measurement` column: every method's scores (as chosen, on its own target) against that target's ground
truth, and the noise ceiling of that target. `measurement_substitution` is the K-FAC paper's ablation: the
kfac methods that differ only in their query measurement (e.g. `kfac` with the loss gradient, `kfac_elbo`
with the ELBO gradient), each against every target one of them is the gradient of (and the loss).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import load_json, load_npy, log, save_json
from workflow_scripts.core.contracts import ALL_QUERY_SETS
from workflow_scripts.core.lds import BootstrapRanks, noise_ceiling_summary
from workflow_scripts.families.likelihood import file_targets, load_measurement_targets, load_targets
from workflow_scripts.report.plotting import message_figure, plt, save_figure, save_table
from workflow_scripts.scorers import SCORERS

NOISE_CEILING = "noise ceiling (seed-to-seed)"


def scored_target(chosen: dict, query_set: str) -> str:
    """The target a method's scores of a query set predict (and its lambda was tuned on): chosen.json 'target'."""
    return (chosen.get("target") or {}).get(query_set, "loss")


def lds_table(
    method_dirs: dict[str, Path],
    subsets: dict,
    targets: dict,
    lds_cfg: dict,
    seed: int,
    measurement: str = "loss",
    ranks: BootstrapRanks | None = None,
) -> pd.DataFrame:
    """LDS of every method against `targets` ({query set: (n_subsets, n_seeds, n_query)}) of one measurement;
    query sets without that measurement (trajectory: held-out) have no rows. 'LDS tuned on evaluation' comes
    from the method's sweep, so it is given only where the method was tuned on this measurement.
    `ranks`: shared by the tables of several measurements (same subsets, bootstrap and seed)."""
    evaluation = subsets["evaluation"]
    masks = subsets["masks"][evaluation]
    ranks = ranks or BootstrapRanks(len(evaluation), lds_cfg["bootstrap_samples"], lds_cfg["ci"], seed)
    rows = []
    for name in (n for n in ALL_QUERY_SETS if n in targets):
        target = targets[name][evaluation]  # (n_eval, n_seeds, n_query)
        if target.shape[1] >= 2:
            ceiling = noise_ceiling_summary(target, lds_cfg["bootstrap_samples"], lds_cfg["ci"], seed)
            rows.append(
                {
                    "method": NOISE_CEILING,
                    "query_set": name,
                    "lambda": np.nan,
                    **ceiling,
                    "lds_tuned_on_evaluation": np.nan,
                    "note": "two retrainings of the same subset",
                    "scores_of": "",
                }
            )
        for method, directory in method_dirs.items():
            chosen = load_json(directory / "chosen.json", "scores")
            scores = None if "not_run" in chosen else load_npy(directory / f"{name}.npy", "scores")
            if scores is not None and np.isnan(scores).all():  # a set the scorer never scores: its note says why
                chosen = {**chosen, "not_run": (chosen.get("notes") or {}).get(name, "no query of this set scored")}
            if "not_run" in chosen:  # the method could not run here (or not on this set): a row that says why
                rows.append(
                    {
                        "method": method,
                        "query_set": name,
                        "lambda": np.nan,
                        "lds": np.nan,
                        "se": np.nan,
                        "ci_low": np.nan,
                        "ci_high": np.nan,
                        "n_queries": 0,
                        "n_queries_total": target.shape[-1],
                        "n_subsets": len(evaluation),
                        "lds_tuned_on_evaluation": np.nan,
                        "note": chosen["not_run"],
                        "scores_of": "",
                    }
                )
                continue
            sweep = pd.read_csv(directory / "sweep.csv")
            best_on_evaluation = sweep.loc[sweep["query_set"] == name, "lds_evaluation"].max()
            own = scored_target(chosen, name)
            if own != measurement:  # the sweep is of the method's own target
                best_on_evaluation = np.nan
            summary = ranks.lds(scores, masks, target.mean(1), (method, name), (measurement, name))
            note = (chosen.get("notes") or {}).get(name, "")
            if own != "loss":
                note = "; ".join(filter(None, [f"scores predict {own} (query gradients and lambda)", note]))
            for key, value in (chosen.get("setting") or {}).items():  # a setting swept beside lambda (AbU's params)
                note = "; ".join(filter(None, [f"{key} {value} (swept, chosen on tuning subsets)", note]))
            rows.append(
                {
                    "method": method,
                    "query_set": name,
                    "lambda": np.nan if chosen["lambda"] is None else chosen["lambda"],
                    **summary,
                    "lds_tuned_on_evaluation": best_on_evaluation,
                    "note": coverage_note(summary, note),
                    "scores_of": own,
                }
            )
    return pd.DataFrame(rows)


def coverage_note(summary: dict, note: str) -> str:
    """The row's note, prefixed with how many queries it covers when the method scored only some (NaN rows)."""
    if summary["n_queries"] == summary["n_queries_total"]:
        return note
    coverage = f"LDS over {summary['n_queries']} of {summary['n_queries_total']} queries"
    return f"{coverage}; {note}" if note else coverage


ABLATION_REFERENCES = ("trak", "d_trak")  # rows shown beside the K-FAC variants, when configured
ABLATION_COLUMNS = ("fisher_type", "kfac_approx", "ekfac", "quantization", "damping", "query_measurement")


def kfac_ablation(table: pd.DataFrame, method_dirs: dict[str, Path]) -> pd.DataFrame:
    """Rows of the kfac methods (settings from their chosen.json) plus the noise ceiling and reference rows."""
    settings = {}
    for method, directory in method_dirs.items():
        chosen = load_json(directory / "chosen.json", "scores")
        if chosen.get("config", {}).get("family") == "kfac":
            settings[method] = chosen.get("settings") or {}
    keep = table["method"].isin([*settings, NOISE_CEILING, *ABLATION_REFERENCES])
    ablation = table[keep].copy()
    for column in ABLATION_COLUMNS:
        ablation[column] = ablation["method"].map(lambda m: settings.get(m, {}).get(column, ""))
    return ablation[
        [
            "method",
            *ABLATION_COLUMNS,
            "query_set",
            "lds",
            "ci_low",
            "ci_high",
            "lambda",
            "lds_tuned_on_evaluation",
            "note",
        ]
    ]


def ablation_markdown(ablation: pd.DataFrame) -> str:
    if not (ablation["fisher_type"] != "").any():
        return "No kfac methods are configured (scores.methods): nothing to ablate.\n"
    lines = [
        "| method | Fisher | K-FAC | EK-FAC | query gradients | damping | query set | LDS (evaluation subsets) | 95% bootstrap CI | lambda (tuned) | query measurement |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ablation.to_dict("records"):
        ekfac = {True: "yes", False: "no"}.get(r["ekfac"], "")
        lam = "-" if np.isnan(r["lambda"]) else f"{r['lambda']:g}"
        lds = f"{r['lds']:.3f}" if not np.isnan(r["lds"]) else (r["note"] or "not run")
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if not np.isnan(r["lds"]) else ""
        lines.append(
            f"| {r['method']} | {r['fisher_type']} | {r['kfac_approx']} | {ekfac} | {r['quantization']} | "
            f"{r['damping']} | {r['query_set']} | {lds} | {ci} | {lam} | {r['query_measurement']} |"
        )
    lines.append("")
    lines.append(
        "lambda: relative to the mean eigenvalue of the fitted G, chosen on the tuning subsets; damping "
        "'absolute': the paper's untuned value, in units of G. Every row is evaluated against the loss; "
        "query measurement: what the query gradients are of (not the loss: a substitution, see "
        "measurement_substitution.md)."
    )
    return "\n".join(lines) + "\n"


def to_markdown(table: pd.DataFrame) -> str:
    lines = [
        "| method | query set | LDS (evaluation subsets) | SE | 95% bootstrap CI | lambda (tuned) | LDS tuned on evaluation* | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        note = r.note if isinstance(r.note, str) else ""
        if np.isnan(r.lds):
            lines.append(f"| {r.method} | {r.query_set} | {note or 'not run'} | | | | | |")
            continue
        lam = "-" if np.isnan(r[3]) else f"{r[3]:g}"
        tuned = "-" if np.isnan(r.lds_tuned_on_evaluation) else f"{r.lds_tuned_on_evaluation:.3f}"
        se = "-" if np.isnan(r.se) else f"{r.se:.3f}"  # no SE over a single scored query
        lines.append(
            f"| {r.method} | {r.query_set} | {r.lds:.3f} | {se} | [{r.ci_low:.3f}, {r.ci_high:.3f}] | {lam} | {tuned} | {note} |"
        )
    lines.append("")
    lines.append(
        "*best LDS over the lambda grid measured on the evaluation subsets themselves (how published repositories tune); "
        "not an honest estimate, shown for comparison only."
    )
    return "\n".join(lines) + "\n"


def plot(
    table: pd.DataFrame, path: str | Path, title: str = "Linear datamodelling score, 95% bootstrap CI over subsets"
) -> None:
    """Bar chart of the table's LDS with CIs, written as `path` (.png) and beside it as .pdf."""
    import seaborn as sns

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
        sub = table[table["query_set"] == name].set_index("method")
        sub = sub.loc[[m for m in order if m in sub.index]]  # seaborn draws no bar for a method this set lacks
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


# ---------------------------------------------------------------- likelihood measurements
def measurement_table(
    method_dirs: dict[str, Path],
    subsets: dict,
    paths: list[str],
    lds_cfg: dict,
    seed: int,
    ranks: BootstrapRanks | None = None,
) -> pd.DataFrame:
    """lds_table for every target the measurement files hold, stacked: first column `measurement`."""
    ranks = ranks or BootstrapRanks(len(subsets["evaluation"]), lds_cfg["bootstrap_samples"], lds_cfg["ci"], seed)
    parts = []
    for target in file_targets(paths):
        targets = load_measurement_targets(paths, lds_cfg["n_subsets"], lds_cfg["n_seeds"], target)
        log.info("evaluate: LDS against %s (%s)", target, ", ".join(targets))
        table = lds_table(method_dirs, subsets, targets, lds_cfg, seed, measurement=target, ranks=ranks)
        table.insert(0, "measurement", target)
        parts.append(table)
    return pd.concat(parts, ignore_index=True)


def _cell(lds: float, low: float, high: float) -> str:
    return f"{lds:.3f} [{low:.3f}, {high:.3f}]"


def lds_grid(table: pd.DataFrame) -> tuple[list[str], list[tuple[str, str]], np.ndarray]:
    """The LDS of the methods that ran as a grid: (methods, noise ceiling first; (measurement, query set) columns;
    values, NaN where a method has no such column)."""
    ran = table.dropna(subset=["lds"])
    if ran.empty:
        return [], [], np.empty((0, 0))
    columns = list(dict.fromkeys(zip(ran["measurement"], ran["query_set"])))
    methods = list(dict.fromkeys([NOISE_CEILING, *ran["method"]]))
    grid = ran.pivot_table(index="method", columns=["measurement", "query_set"], values="lds", aggfunc="first")
    return (
        methods,
        columns,
        grid.reindex(index=methods, columns=pd.MultiIndex.from_tuples(columns)).to_numpy(dtype=float),
    )


def measurement_overview(table: pd.DataFrame) -> str:
    """Compact Markdown view: one row per method, one column per (target, query set), the LDS alone (the long
    table below it has SE, CI, lambda and notes)."""
    methods, columns, values = lds_grid(table)
    if not methods:
        return ""
    lines = ["| method | " + " | ".join(f"{m} {q}" for m, q in columns) + " |", "|---|" + "---|" * len(columns)]
    for method, row in zip(methods, values):
        lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" if np.isfinite(v) else "" for v in row) + " |")
    return "\n".join(lines) + "\n\nLDS on the evaluation subsets per measured target and query set (details below).\n\n"


def measurement_markdown(table: pd.DataFrame) -> str:
    lines = [
        "| measurement | method | query set | LDS (evaluation subsets) | SE | 95% bootstrap CI | lambda (tuned) | scores predict | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.to_dict("records"):
        note = r["note"] if isinstance(r["note"], str) else ""
        if np.isnan(r["lds"]):
            lines.append(f"| {r['measurement']} | {r['method']} | {r['query_set']} | {note or 'not run'} | | | | | |")
            continue
        lam = "-" if np.isnan(r["lambda"]) else f"{r['lambda']:g}"
        lines.append(
            f"| {r['measurement']} | {r['method']} | {r['query_set']} | {r['lds']:.3f} | {r['se']:.3f} | "
            f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {lam} | {r['scores_of']} | {note} |"
        )
    lines.append("")
    lines.append(
        "measurement: the target whose change on retraining the LDS ranks (ground truth of every retrained "
        "model); scores predict: the measurement the method's scores are of, on which its lambda was tuned "
        "(a method is evaluated as chosen against every target). Noise ceiling: of that target."
    )
    return measurement_overview(table) + "\n".join(lines) + "\n"


def substitution_methods(method_dirs: dict[str, Path]) -> dict[str, str]:
    """{method: query measurement} of the methods (kfac or TRAK family) that differ from another one of their family
    ONLY in their query measurement (e.g. kfac / kfac_elbo, trak / trak_elbo); methods that did not run are left out."""
    groups: dict[str, dict[str, str]] = {}
    for method, directory in method_dirs.items():
        chosen = load_json(directory / "chosen.json", "scores")
        family = chosen.get("config", {}).get("family")
        if family not in SCORERS or not SCORERS[family].takes_query_measurement or "not_run" in chosen:
            continue
        # kfac: its resolved settings (kfac.* defaults included); the TRAK family: its method config
        settings = dict(chosen.get("settings") or {}) if family == "kfac" else dict(chosen["config"])
        target = settings.pop("query_measurement", "loss")
        groups.setdefault(json.dumps({**settings, "family": family}, sort_keys=True), {})[method] = target
    return {m: t for group in groups.values() if len(set(group.values())) > 1 for m, t in group.items()}


def measurement_substitution(measurements: pd.DataFrame, method_dirs: dict[str, Path]) -> pd.DataFrame:
    """The substitution ablation (long format): every substitution method against the loss and every target one
    of them is the gradient of; `matched`: the method's scores are of that very target. Noise ceiling rows
    per target."""
    methods = substitution_methods(method_dirs)
    targets = ["loss", *dict.fromkeys(t for t in methods.values() if t != "loss")]
    keep = measurements["measurement"].isin(targets) & measurements["method"].isin([NOISE_CEILING, *methods])
    out = measurements[keep].copy()
    out["query_measurement"] = out["method"].map(lambda m: methods.get(m, ""))
    out["matched"] = out["scores_of"] == out["measurement"]
    return out[
        [
            "measurement",
            "query_set",
            "method",
            "query_measurement",
            "scores_of",
            "matched",
            "lds",
            "se",
            "ci_low",
            "ci_high",
            "lambda",
            "note",
        ]
    ].reset_index(drop=True)


def substitution_markdown(table: pd.DataFrame) -> str:
    """Wide: one row per (target, query set), one column per method (its query measurement), the noise ceiling."""
    methods = [m for m in dict.fromkeys(table["method"]) if m != NOISE_CEILING]
    if not methods:
        return (
            "No kfac / TRAK-family methods that differ only in their query measurement are configured (scores.methods, "
            "query_measurement): no substitution to show.\n"
        )
    gradient = dict(zip(table["method"], table["query_measurement"]))
    lines = [
        "| measured change (target) | query set | noise ceiling | "
        + " | ".join(f"{m} ({gradient[m]} gradient)" for m in methods)
        + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for (target, query_set), rows in table.groupby(["measurement", "query_set"], sort=False):
        by = rows.set_index("method")
        cells = []
        for m in [NOISE_CEILING, *methods]:
            if m not in by.index:
                cells.append("")
                continue
            r = by.loc[m]
            text = _cell(r["lds"], r["ci_low"], r["ci_high"])
            if m != NOISE_CEILING and r["scores_of"] != gradient[m]:
                text += " (loss gradient: no trajectory)"
            cells.append(f"**{text}**" if m != NOISE_CEILING and r["matched"] else text)
        lines.append(f"| {target} | {query_set} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "LDS on the evaluation subsets [95% bootstrap CI over subsets]. Each column is one K-FAC influence "
        "or TRAK-family method (same curvature or training features, and damping grid) whose QUERY "
        "gradients are of the named measurement; bold: the gradient of the measured target itself, the others substitute "
        "another measurement's gradient (the K-FAC paper's measurement substitution: predict the ELBO "
        "change with the loss gradient). Each method's lambda is tuned on its own target."
    )
    return "\n".join(lines) + "\n"


def plot_measurements(table: pd.DataFrame, stem) -> None:
    """Heat map of the LDS: methods (rows) x (measurement, query set) (columns), noise ceiling first."""
    methods, columns, values = lds_grid(table)
    if not methods:
        save_figure(message_figure("LDS per measurement: no method produced scores"), stem)
        return
    fig, ax = plt.subplots(figsize=(2.0 + 0.85 * len(columns), 1.2 + 0.24 * len(methods)))
    image = ax.imshow(values, cmap="viridis", vmin=min(0.0, np.nanmin(values)), vmax=1.0, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    ax.set_xticks(
        range(len(columns)),
        [f"{m}\n{q}" for m, q in columns],
        fontsize=7,
        rotation=45,
        ha="right",
        rotation_mode="anchor",
    )
    ax.set_yticks(range(len(methods)), methods, fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="LDS (evaluation subsets)")
    ax.set_title("LDS per measurement target (columns) and method (rows)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, stem, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subsets", required=True)
    parser.add_argument("--measurements", nargs="+", required=True)
    parser.add_argument(
        "--scores", nargs="+", required=True, help="score directories, one per method (named by method)"
    )
    parser.add_argument("--table", required=True, help="output stem: writes .csv, .md and .json")
    parser.add_argument("--figure", required=True)
    parser.add_argument("--ablation", required=True, help="K-FAC ablation output stem: writes .csv and .md")
    parser.add_argument("--ablation-figure", required=True)
    parser.add_argument(
        "--measurements-table",
        required=True,
        help="LDS per measurement target, output stem: writes .csv, .md and .html",
    )
    parser.add_argument("--measurements-figure", required=True, help="its heat map (.png, and .pdf beside it)")
    parser.add_argument("--substitution", required=True, help="measurement substitution output stem: .csv, .md, .html")


def run(args, config: dict) -> None:
    subsets = core_data.load_subsets(args.subsets)
    targets = load_targets(args.measurements, config["lds"]["n_subsets"], config["lds"]["n_seeds"])
    method_dirs = {Path(d).name: Path(d) for d in args.scores}
    lds_cfg, seed = config["lds"], config["seeds"]["bootstrap"]
    ranks = BootstrapRanks(len(subsets["evaluation"]), lds_cfg["bootstrap_samples"], lds_cfg["ci"], seed)
    table = lds_table(method_dirs, subsets, targets, lds_cfg, seed, ranks=ranks)
    stem = Path(args.table)
    save_table(table, to_markdown(table), stem, "Linear datamodelling score")
    save_json(
        {
            f"{r.method}/{r.query_set}": {"lds": r.lds, "ci_low": r.ci_low, "ci_high": r.ci_high}
            for r in table.itertuples()
            if not np.isnan(r.lds)
        },
        stem.with_suffix(".json"),
    )
    plot(table, args.figure)
    ablation = kfac_ablation(table, method_dirs)
    save_table(ablation, ablation_markdown(ablation), args.ablation, "K-FAC influence ablation")
    plot(ablation, args.ablation_figure, "K-FAC influence ablation: LDS, 95% bootstrap CI over subsets")
    measurements = measurement_table(method_dirs, subsets, args.measurements, lds_cfg, seed, ranks)
    save_table(measurements, measurement_markdown(measurements), args.measurements_table, "LDS per measurement")
    plot_measurements(measurements, Path(args.measurements_figure).with_suffix(""))
    substitution = measurement_substitution(measurements, method_dirs)
    save_table(
        substitution,
        substitution_markdown(substitution),
        args.substitution,
        "Measurement substitution (K-FAC influence)",
    )
    log.info("evaluate, measurement substitution:\n%s", substitution_markdown(substitution))
    log.info("evaluate:\n%s", to_markdown(table))
