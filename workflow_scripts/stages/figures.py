"""Stage `figures`: the benchmark's figures (PNG + PDF) for the README and the report.

- lds_bars: LDS of every method on the EVALUATION subsets with its bootstrap CI over subsets, one
  panel per (measurement, query set); the noise ceiling is a dashed line. Methods that could not run
  (e.g. CLIP without weights) are listed under the panels instead of a bar.
- damping_sweeps: for every method with a lambda grid, LDS vs lambda on the TUNING and EVALUATION
  subsets per query set, the lambda chosen on the tuning subsets marked.
- predicted_vs_actual: for the chosen queries (figures.queries, generated) and methods (figures.methods):
  each EVALUATION subset's prediction sum_{i not in S_j} S[q, i] against its measured loss
  (seed-averaged); the panel title gives the query's LDS (Spearman).
- influencers: for each chosen query, per method, the query and its highest scoring training images
  (the top positive influencers: removal predicted to raise the query's loss most) and its lowest
  scoring ones (the top negative influencers; for methods whose scores are never negative, such as
  DAS's squared norms, the least influential), with their scores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import ArtefactError, load_json, load_npy, log
from workflow_scripts.core.lds import rowwise_spearman, subset_predictions
from workflow_scripts.families.likelihood import load_targets
from workflow_scripts.report.plotting import message_figure, plt, save_figure, show_image

NOISE_CEILING = "noise ceiling (seed-to-seed)"
MEASUREMENT = "loss"  # the LDS table's measurement when it has no `measurement` column


def plot_lds_bars(table: pd.DataFrame, stem) -> None:
    import seaborn as sns

    table = table.copy()
    if "measurement" not in table:
        table["measurement"] = MEASUREMENT
    ran = table.dropna(subset=["lds"])
    not_run = sorted(set(table.loc[table["lds"].isna(), "method"]) - {NOISE_CEILING})
    methods = [m for m in dict.fromkeys(ran["method"]) if m != NOISE_CEILING]
    panels = [(m, q) for m in dict.fromkeys(ran["measurement"]) for q in dict.fromkeys(ran["query_set"])]
    if not methods or not panels:
        save_figure(message_figure("LDS: no method produced scores"), stem)
        return
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 1.2 + 0.24 * len(methods)), sharey=True, squeeze=False
    )
    colors = dict(zip(methods, sns.color_palette("husl", len(methods))))
    for ax, (measurement, query_set) in zip(axes[0], panels):
        sub = ran[(ran["measurement"] == measurement) & (ran["query_set"] == query_set)].set_index("method")
        y = np.arange(len(methods))
        values = sub.reindex(methods)
        ax.barh(y, values["lds"], color=[colors[m] for m in methods], height=0.7)
        err = [(values["lds"] - values["ci_low"]).clip(lower=0), (values["ci_high"] - values["lds"]).clip(lower=0)]
        ax.errorbar(values["lds"], y, xerr=err, fmt="none", ecolor="k", capsize=2, lw=0.8)
        if NOISE_CEILING in sub.index:
            ax.axvline(sub.loc[NOISE_CEILING, "lds"], color="k", ls="--", lw=1, label="noise ceiling")
            ax.legend(loc="lower right", fontsize=7)
        ax.axvline(0, color="grey", lw=0.6)
        ax.set_yticks(y, methods, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("LDS (Spearman), evaluation subsets", fontsize=8)
        ax.set_title(f"measurement: {measurement}, {query_set} queries", fontsize=9)
    if not_run:
        fig.text(0.01, 0.0, "not run: " + ", ".join(not_run) + " (see the LDS table)", fontsize=7, va="top")
    fig.suptitle("LDS per method, 95% bootstrap CI over subsets", fontsize=10)
    fig.tight_layout()
    save_figure(fig, stem)


def load_sweeps(score_dirs: dict[str, Path]) -> dict[str, tuple[pd.DataFrame, float | None]]:
    """{method: (sweep table, chosen lambda)} for the methods that swept a lambda grid."""
    sweeps = {}
    for method, directory in score_dirs.items():
        chosen = load_json(directory / "chosen.json", "scores")
        if "not_run" in chosen or chosen.get("lambda") is None:
            continue
        sweep = pd.read_csv(directory / "sweep.csv")
        for value in (chosen.get("setting") or {}).values():  # a swept setting: the curve at the chosen one
            sweep = sweep[sweep["setting"] == value]
        if sweep["lambda"].dropna().nunique() > 1:
            sweeps[method] = (sweep, chosen["lambda"])
    return sweeps


def plot_damping_sweeps(sweeps: dict, stem) -> None:
    if not sweeps:
        save_figure(message_figure("No method has a lambda grid of more than one value."), stem)
        return
    n = len(sweeps)
    cols = min(5, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 2.3 * rows), squeeze=False, sharey=True)
    styles = {"lds_tuning": "-", "lds_evaluation": ":"}
    colors = {}
    for ax, (method, (sweep, chosen)) in zip(axes.flat, sweeps.items()):
        for query_set, sub in sweep.groupby("query_set", sort=False):
            sub = sub.sort_values("lambda")
            color = colors.setdefault(query_set, f"C{len(colors)}")
            for column, style in styles.items():
                ax.plot(
                    sub["lambda"],
                    sub[column],
                    style,
                    color=color,
                    marker=".",
                    ms=3,
                    lw=1,
                    label=f"{query_set}, {column.split('_')[1]}",
                )
        ax.axvline(chosen, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        # a grid spanning about a decade (NDA's timesteps 25-400) gets labelled minor ticks that overlap
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{method} (lambda {chosen:g})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.supxlabel("lambda (relative to the mean eigenvalue)", fontsize=8)
    fig.supylabel("LDS (mean over queries)", fontsize=8)
    fig.suptitle(
        "Damping sweeps: LDS vs lambda on tuning (solid) and evaluation (dotted) subsets; "
        "dashed: lambda chosen on tuning",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.legend(
        handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False, bbox_to_anchor=(0.5, -0.02)
    )
    save_figure(fig, stem)


def load_scores(score_dirs: dict[str, Path], methods: list[str], query_set: str = "generated") -> dict[str, np.ndarray]:
    scores = {}
    for method in methods:
        directory = score_dirs.get(method)
        if directory is None:
            raise ArtefactError(f"figures.methods names {method!r}, but no score directory was given for it")
        chosen = load_json(directory / "chosen.json", "scores")
        if "not_run" in chosen:
            log.warning("figures: %s did not run (%s); left out", method, chosen["not_run"])
            continue
        scores[method] = load_npy(directory / f"{query_set}.npy", "scores")
    return scores


def plot_predicted_vs_actual(
    scores: dict[str, np.ndarray], queries: list[int], masks: np.ndarray, targets: np.ndarray, stem
) -> None:
    """targets: (n_subsets, n_query) seed-averaged measured loss on the subsets of `masks`."""
    if not scores or not queries:
        save_figure(message_figure("No method or query chosen for the predicted-vs-actual figure."), stem)
        return
    fig, axes = plt.subplots(len(scores), len(queries), figsize=(2.8 * len(queries), 2.5 * len(scores)), squeeze=False)
    for r, (method, s) in enumerate(scores.items()):
        predictions = subset_predictions(s[queries], masks)  # (n_chosen, n_subsets)
        actual = targets[:, queries].T
        rho = rowwise_spearman(predictions, actual)
        for c, q in enumerate(queries):
            ax = axes[r, c]
            ax.scatter(predictions[c], actual[c], s=10, alpha=0.8)
            ax.set_title(f"{method}, query {q}: Spearman {rho[c]:.2f}", fontsize=8)
            ax.tick_params(labelsize=6)
            if r == len(scores) - 1:
                ax.set_xlabel("predicted: sum of removed scores", fontsize=7)
            if c == 0:
                ax.set_ylabel("measured loss (retrained)", fontsize=7)
    fig.suptitle("Predicted vs. actual on the evaluation subsets (generated queries)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, stem)


def plot_influencers(
    scores: dict[str, np.ndarray],
    queries: list[int],
    query_images: np.ndarray,
    train_images: np.ndarray,
    n: int,
    stem,
    labels: list[str] | None = None,
) -> None:
    """Per (query, method) row: the query, its n highest and n lowest scoring training images with their scores.
    labels: each query's caption in the figure (default 'query <index>'; the extra queries: their file names)."""
    if not scores or not queries:
        save_figure(message_figure("No method or query chosen for the influencer figure."), stem)
        return
    labels = labels or [f"query {q}" for q in queries]
    n = min(n, train_images.shape[0])
    rows = [(q, m) for q in queries for m in scores]
    fig, axes = plt.subplots(len(rows), 1 + 2 * n, figsize=(0.95 * (1 + 2 * n), 1.5 * len(rows)), squeeze=False)
    label = dict(zip(queries, labels))
    for r, (q, method) in enumerate(rows):
        s = scores[method][q]
        order = np.argsort(-s, kind="stable")
        show_image(axes[r, 0], query_images[q], f"{label[q]}\n{method}", fontsize=6)
        for c, i in enumerate(order[:n], start=1):
            show_image(axes[r, c], train_images[i], f"+ #{i}\n{s[i]:.2g}", fontsize=6)
            for spine in axes[r, c].spines.values():
                spine.set_edgecolor("tab:green")
        for c, i in enumerate(order[::-1][:n], start=1 + n):
            show_image(axes[r, c], train_images[i], f"- #{i}\n{s[i]:.2g}", fontsize=6)
            for spine in axes[r, c].spines.values():
                spine.set_edgecolor("tab:red")
    fig.suptitle(
        f"The {n} highest (+: removal predicted to raise the query's loss most) and the {n} lowest (-) "
        "scoring training images per method",
        fontsize=8,
    )
    fig.tight_layout()
    save_figure(fig, stem)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lds-table", required=True, help="tables/lds.csv of the evaluate stage")
    parser.add_argument("--scores", nargs="+", required=True, help="score directories, one per method")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--subsets", required=True)
    parser.add_argument("--measurements", nargs="+", required=True)
    parser.add_argument(
        "--extra-images", help="the user's own queries (queries.extra): their gallery, extra_influencers"
    )
    parser.add_argument("--out-dir", required=True, help="writes <figure>.png and <figure>.pdf")


def run(args, config: dict) -> None:
    fig_cfg = config["figures"]
    out = Path(args.out_dir)
    score_dirs = {Path(d).name: Path(d) for d in args.scores}
    plot_lds_bars(pd.read_csv(args.lds_table), out / "lds_bars")
    plot_damping_sweeps(load_sweeps(score_dirs), out / "damping_sweeps")

    subsets = core_data.load_subsets(args.subsets)
    targets = load_targets(args.measurements, config["lds"]["n_subsets"], config["lds"]["n_seeds"])["generated"]
    evaluation = subsets["evaluation"]
    scores = load_scores(score_dirs, fig_cfg["methods"])
    queries = [int(q) for q in fig_cfg["queries"]]
    n_queries = targets.shape[-1]
    bad = [q for q in queries if q >= n_queries]
    if bad:
        raise ArtefactError(f"figures.queries {bad}: there are only {n_queries} generated queries")
    plot_predicted_vs_actual(
        scores, queries, subsets["masks"][evaluation], targets[evaluation].mean(1), out / "predicted_vs_actual"
    )
    query_images = core_data.load_query_images(args.dataset, args.samples)["generated"]
    train_images = core_data.load_dataset(args.dataset)["train_images"]
    plot_influencers(scores, queries, query_images, train_images, fig_cfg["n_influencers"], out / "influencers")
    log.info("figures: wrote lds_bars, damping_sweeps, predicted_vs_actual, influencers (.png, .pdf) to %s", out)
    if args.extra_images:
        plot_extra_gallery(args.extra_images, score_dirs, fig_cfg, train_images, out / "extra_influencers")


def plot_extra_gallery(extra_path, score_dirs: dict[str, Path], fig_cfg: dict, train_images, stem) -> None:
    """The influencer gallery of the user's own queries: the first figures.extra_queries of them (file order), each
    with its top positive and negative training images per method of figures.methods."""
    extra = core_data.load_extra_queries(extra_path)
    shown = list(range(min(len(extra["files"]), int(fig_cfg["extra_queries"]))))
    if len(shown) < len(extra["files"]):
        log.warning(
            "figures: the gallery shows the first %d of %d extra queries (figures.extra_queries); every one is scored "
            "(scores/<method>/extra.npy)",
            len(shown),
            len(extra["files"]),
        )
    scores = load_scores(score_dirs, fig_cfg["methods"], "extra")
    labels = [str(extra["files"][q]) for q in shown]
    plot_influencers(scores, shown, extra["images"], train_images, fig_cfg["n_influencers"], stem, labels)
    log.info("figures: wrote the gallery of %d extra queries to %s", len(shown), stem)
