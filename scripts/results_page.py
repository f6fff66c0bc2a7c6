#!/usr/bin/env python3
"""Write the results page (docs/results.md) from the tables of a finished run.

    python scripts/results_page.py [--results results/digits] [--out docs/results.md]
                                   [--commit SHA] [--note TEXT]

Reads results/<benchmark>/tables/*.csv, the tables the workflow writes (rules evaluate,
metagradient_evaluate, counterfactual_evaluate, likelihood_sanity), and writes one Markdown page:
a header with the date of the tables' files (their modification times, UTC) and the git commit
(`git rev-parse --short HEAD` of the checkout holding the results, else of this repository;
--commit overrides it), then every table in the layout of the Markdown the workflow writes beside
each CSV. The long tables are condensed: lds_measurements as its methods x targets overview;
counterfactual_per_query is left out (it has one row per retraining). A CSV this script does not
know is shown as a plain table of its columns.

Standard library + pandas only: the page can be built without the workflow's package.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
NOISE_CEILING = "noise ceiling (seed-to-seed)"
ORDER = (
    "lds",
    "kfac_ablation",
    "lds_measurements",
    "measurement_substitution",
    "metagradient",
    "counterfactual",
    "bpd_sanity",
)
LEFT_OUT = {"counterfactual_per_query": "one row per (method, query): every counterfactual value"}
TITLES = {
    "lds": "LDS of every method (loss target)",
    "kfac_ablation": "K-FAC influence ablation",
    "lds_measurements": "LDS per measurement target",
    "measurement_substitution": "Measurement substitution",
    "metagradient": "Metagradient and its fixed-seed ground truth",
    "counterfactual": "Counterfactual retraining",
    "bpd_sanity": "Bits/dim sanity check (VE-SDE)",
}
COUNTERFACTUAL_METRICS = {  # column -> (label, which direction means "the removed examples mattered")
    "pixel_l2": ("pixel L2", "higher"),
    "embedding_cosine": ("embedding cosine", "lower"),
    "loss_change": ("loss change", "higher"),
}


# ------------------------------------------------------------------------------------------ cells
def missing(value) -> bool:
    """NaN, None or an empty string: what pandas reads from an empty CSV cell."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value == ""


def text(value) -> str:
    """A text cell: empty for a missing value, pipes escaped so they do not split the row."""
    return "" if missing(value) else str(value).replace("|", "\\|")


def f3(value) -> str:
    return f"{float(value):.3f}"


def g(value) -> str:
    return f"{float(value):g}"


def ci(row) -> str:
    return f"[{f3(row['ci_low'])}, {f3(row['ci_high'])}]"


def row_line(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def header(labels) -> list[str]:
    return [row_line(labels), "|" + "---|" * len(labels)]


def records(frame: pd.DataFrame) -> list[dict]:
    return frame.to_dict("records")


# ----------------------------------------------------------------------------------------- tables
def lds_markdown(frame: pd.DataFrame) -> str:
    """tables/lds.csv (rule evaluate): method x query set on the loss target."""
    lines = header(
        [
            "method",
            "query set",
            "LDS (evaluation subsets)",
            "SE",
            "95% bootstrap CI",
            "lambda (tuned)",
            "LDS tuned on evaluation*",
            "note",
        ]
    )
    for r in records(frame):
        note = text(r.get("note"))
        if missing(r["lds"]):
            lines.append(f"| {text(r['method'])} | {text(r['query_set'])} | {note or 'not run'} | | | | | |")
            continue
        lam = "-" if missing(r["lambda"]) else g(r["lambda"])
        tuned = "-" if missing(r["lds_tuned_on_evaluation"]) else f3(r["lds_tuned_on_evaluation"])
        se = "-" if missing(r["se"]) else f3(r["se"])
        lines.append(row_line([text(r["method"]), text(r["query_set"]), f3(r["lds"]), se, ci(r), lam, tuned, note]))
    lines += [
        "",
        "*best LDS over the lambda grid measured on the evaluation subsets themselves (how published "
        "repositories tune); not an honest estimate, shown for comparison only.",
    ]
    return "\n".join(lines) + "\n"


def yes_no(value) -> str:
    if missing(value):
        return ""
    return {"true": "yes", "false": "no"}.get(str(value).strip().lower(), str(value))


def kfac_ablation_markdown(frame: pd.DataFrame) -> str:
    """tables/kfac_ablation.csv (rule evaluate): the kfac rows with their settings as columns."""
    with_query = "query_measurement" in frame.columns
    labels = [
        "method",
        "Fisher",
        "K-FAC",
        "EK-FAC",
        "query gradients",
        "damping",
        "query set",
        "LDS (evaluation subsets)",
        "95% bootstrap CI",
        "lambda (tuned)",
    ]
    lines = header(labels + (["query measurement"] if with_query else []))
    for r in records(frame):
        ran = not missing(r["lds"])
        cells = [
            text(r["method"]),
            text(r.get("fisher_type")),
            text(r.get("kfac_approx")),
            yes_no(r.get("ekfac")),
            text(r.get("quantization")),
            text(r.get("damping")),
            text(r["query_set"]),
            f3(r["lds"]) if ran else (text(r.get("note")) or "not run"),
            ci(r) if ran else "",
            "-" if missing(r["lambda"]) else g(r["lambda"]),
        ]
        lines.append(row_line(cells + ([text(r.get("query_measurement"))] if with_query else [])))
    lines += [
        "",
        "lambda: relative to the mean eigenvalue of the fitted G, chosen on the tuning subsets; damping "
        "'absolute': the paper's untuned value, in units of G.",
    ]
    return "\n".join(lines) + "\n"


def lds_measurements_markdown(frame: pd.DataFrame) -> str:
    """tables/lds_measurements.csv (rule evaluate), long format, condensed to one row per method and one column per
    (measurement, query set): the overview that opens the workflow's lds_measurements.md."""
    ran = frame[~frame["lds"].isna()]
    if ran.empty:
        return "No method produced scores.\n"
    columns = list(dict.fromkeys(zip(ran["measurement"], ran["query_set"])))
    methods = list(dict.fromkeys([NOISE_CEILING, *ran["method"]]))
    values = {(r["method"], r["measurement"], r["query_set"]): r["lds"] for r in records(ran)}
    lines = header(["method", *(f"{m} {q}" for m, q in columns)])
    for method in methods:
        cells = [values.get((method, m, q)) for m, q in columns]
        lines.append(row_line([text(method), *("" if v is None or missing(v) else f3(v) for v in cells)]))
    lines += [
        "",
        "LDS on the evaluation subsets per measured target and query set. The run's "
        "`tables/lds_measurements.md` and `.csv` also give SE, bootstrap CI, lambda and notes per row.",
    ]
    return "\n".join(lines) + "\n"


def measurement_substitution_markdown(frame: pd.DataFrame) -> str:
    """tables/measurement_substitution.csv (rule evaluate): one row per (target, query set), one column per method."""
    methods = [m for m in dict.fromkeys(frame["method"]) if m != NOISE_CEILING]
    if not methods:
        return "No methods that differ only in their query measurement are configured.\n"
    gradient = {r["method"]: text(r["query_measurement"]) for r in records(frame)}
    lines = header(
        ["measured change (target)", "query set", "noise ceiling", *(f"{m} ({gradient[m]} gradient)" for m in methods)]
    )
    for (target, query_set), rows in frame.groupby(["measurement", "query_set"], sort=False):
        by = {r["method"]: r for r in records(rows)}
        cells = []
        for m in [NOISE_CEILING, *methods]:
            r = by.get(m)
            if r is None:
                cells.append("")
                continue
            cell = f"{f3(r['lds'])} {ci(r)}"
            if m != NOISE_CEILING and text(r["scores_of"]) != gradient[m]:
                cell += " (loss gradient: no trajectory)"
            matched = str(r["matched"]).strip().lower() == "true"
            cells.append(f"**{cell}**" if m != NOISE_CEILING and matched else cell)
        lines.append(row_line([text(target), text(query_set), *cells]))
    lines += [
        "",
        "LDS on the evaluation subsets [95% bootstrap CI over subsets]. Each column is one method whose "
        "QUERY gradients are of the named measurement; bold: the gradient of the measured target itself, the "
        "other cells substitute another measurement's gradient. Each method's lambda is tuned on its own target.",
    ]
    return "\n".join(lines) + "\n"


def metagradient_markdown(frame: pd.DataFrame) -> str:
    """tables/metagradient.csv (rule metagradient_evaluate)."""
    if frame.empty:
        return "No metagradient method is configured.\n"
    lines = header(
        ["method", "query set", "target", "value", "SE", "95% bootstrap CI", "queries", "subsets / sets", "note"]
    )
    for r in records(frame):
        se = "-" if missing(r["se"]) else f3(r["se"])
        lines.append(
            row_line(
                [
                    text(r["method"]),
                    text(r["query_set"]),
                    text(r["target"]),
                    f3(r["value"]),
                    se,
                    ci(r),
                    f"{int(r['n_queries'])} of {int(r['n_queries_total'])}",
                    str(int(r["n_sets"])),
                    text(r.get("note")),
                ]
            )
        )
    lines += [
        "",
        "Mean over the attributed queries, SE over those queries ('-' for one), 95% bootstrap CI over the "
        "evaluation subsets (leave-out: over the sets). Fixed-seed target: retrained with the full model's seed "
        "and data order, the removed examples weighted 0; seed-averaged target: the LDS table's.",
    ]
    return "\n".join(lines) + "\n"


def counterfactual_markdown(frame: pd.DataFrame) -> str:
    """tables/counterfactual.csv (rule counterfactual_evaluate): long, one row per (method, metric)."""
    labels = [f"{label} ({better} = removal mattered more)" for label, better in COUNTERFACTUAL_METRICS.values()]
    lines = header(["method", *labels])
    for method, rows in frame.groupby("method", sort=False):
        by = {r["metric"]: r for r in records(rows)}
        cells = []
        for metric in COUNTERFACTUAL_METRICS:
            r = by.get(metric)
            cells.append(
                "" if r is None else f"{r['median']:.4g} (mean {r['mean']:.4g}) [{r['ci_low']:.4g}, {r['ci_high']:.4g}]"
            )
        lines.append(row_line([text(method), *cells]))
    first = records(frame)[0]
    n = int(first["n_queries"])
    removed = ""
    if not missing(first.get("k")) and not missing(first.get("n_train")):
        removed = f"k = {int(first['k'])} of {int(first['n_train'])} training examples removed per query (random: k random ones). "
    embedding = text(first.get("embedding")) or "see the run's configuration"
    lines += [
        "",
        f"Median over {n} generated queries (mean in parentheses) and a bootstrap CI of the median "
        f"(counterfactual.ci, 95% by default); {removed}pixel L2 on images in [-1, 1]; embedding: {embedding}; "
        "loss change = m_q(retrained) - m_q(full).",
    ]
    return "\n".join(lines) + "\n"


def bpd_sanity_markdown(frame: pd.DataFrame) -> str:
    """tables/bpd_sanity.csv (rule likelihood_sanity, model.family vesde)."""
    lines = header(["category", "n", "mean bits/dim (SE)", "median", "min", "max"])
    for r in records(frame):
        se = "-" if missing(r["se_bpd"]) else f3(r["se_bpd"])
        lines.append(
            row_line(
                [
                    text(r["category"]),
                    str(int(r["n"])),
                    f"{f3(r['mean_bpd'])} ({se})",
                    f3(r["median_bpd"]),
                    f3(r["min_bpd"]),
                    f3(r["max_bpd"]),
                ]
            )
        )
    return "\n".join(lines) + "\n"


def generic_markdown(frame: pd.DataFrame) -> str:
    """A table this script does not know: its columns as they are, numbers to 4 significant digits."""

    def cell(value):
        if missing(value):
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return text(value)

    lines = header([text(c) for c in frame.columns])
    lines += [row_line([cell(v) for v in row]) for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


RENDERERS = {
    "lds": lds_markdown,
    "kfac_ablation": kfac_ablation_markdown,
    "lds_measurements": lds_measurements_markdown,
    "measurement_substitution": measurement_substitution_markdown,
    "metagradient": metagradient_markdown,
    "counterfactual": counterfactual_markdown,
    "bpd_sanity": bpd_sanity_markdown,
}


# ------------------------------------------------------------------------------------------- page
def git_commit(*directories: Path) -> str:
    """`git rev-parse --short HEAD` in the first of `directories` that is inside a git checkout."""
    for directory in directories:
        if not directory.is_dir():
            continue
        try:
            out = subprocess.run(
                ["git", "-C", str(directory), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                check=True,
            )
        except (OSError, subprocess.CalledProcessError):
            continue
        if out.stdout.strip():
            return out.stdout.strip()
    return "unknown"


def file_dates(paths: list[Path]) -> str:
    """The UTC date of the files' modification times: one date, or 'first to last'."""
    days = sorted({datetime.fromtimestamp(p.stat().st_mtime, tz=UTC).date().isoformat() for p in paths})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def table_files(tables: Path) -> list[Path]:
    """The CSVs of a run in page order: the known tables first, then the others by name."""
    found = {p.stem: p for p in sorted(tables.glob("*.csv"))}
    return [found[name] for name in ORDER if name in found] + [p for name, p in found.items() if name not in ORDER]


def shown(path: Path | str) -> str:
    """A path as the reader should see it: relative to this repository when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def page(results: Path, out: Path, commit: str | None = None, note: str = "") -> str:
    tables = results / "tables"
    files = table_files(tables)
    if not files:
        raise SystemExit(f"results_page: no tables in {tables} (*.csv); run the workflow first (make run)")
    commit = commit or git_commit(results, REPO)
    docs = os.path.relpath(REPO / "docs", out.resolve().parent)
    link = lambda name: f"{docs}/{name}" if docs != "." else name  # noqa: E731
    source = shown(results) if results.is_absolute() else str(results)
    lines = [
        "# Results",
        "",
        "<!-- Generated by scripts/results_page.py from the tables of a run; edit the script, not this page. -->",
        "",
        f"This page is generated: `python scripts/results_page.py --results {source}` rewrites it from the "
        "tables of a finished run (after `make run`).",
        "",
        f"- Tables: `{source}/tables/*.csv`, files dated {file_dates(files)} (UTC).",
        f"- Commit: `{commit}`.",
        "",
    ]
    if note:
        lines += [note, ""]
    lines += [
        f"What the columns mean: [methods.md]({link('methods.md')}); what the numbers say: the findings pages "
        f"linked from [the README]({os.path.relpath(REPO / 'README.md', out.resolve().parent)}#documentation).",
        "",
    ]
    for path in files:
        name = path.stem
        if name in LEFT_OUT:
            lines += [f"Not shown: `tables/{path.name}` ({LEFT_OUT[name]}).", ""]
            continue
        if not path.read_text().strip():  # e.g. metagradient.csv of a run without a metagradient method
            lines += [f"## {TITLES.get(name, name)}", "", f"`tables/{path.name}`: no rows in this run.", ""]
            continue
        frame = pd.read_csv(path)
        render = RENDERERS.get(name, generic_markdown)
        lines += [f"## {TITLES.get(name, name)}", "", f"`tables/{path.name}`", "", render(frame).rstrip("\n"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results/digits", help="a run's results directory (holds tables/)")
    parser.add_argument("--out", default="docs/results.md", help="the page to write")
    parser.add_argument("--commit", help="the commit to state (default: git rev-parse --short HEAD)")
    parser.add_argument("--note", default="", help="a paragraph to put below the header")
    args = parser.parse_args(argv)
    out = Path(args.out)
    text_ = page(Path(args.results), out, args.commit, args.note)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text_)
    print(f"results_page: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
