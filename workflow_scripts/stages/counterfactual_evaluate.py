"""Stage `counterfactual_evaluate`: did removing what a method names change the generated image?

For each (method, query) of the counterfactual retraining (rules counterfactual, train_subset, regenerate):
- pixel_l2: Euclidean norm of (counterfactual image - full-model image) over all pixels, images in [-1, 1];
- embedding_cosine: cosine similarity of the two images' embeddings: open_clip with the local weights
  counterfactual.clip_weights when that file exists, else the penultimate features of the benchmark's
  own classifier (rule classifier; the table's `embedding` column says which);
- loss_change: m_q(counterfactual model) - m_q(full model), the loss measurement of the original query
  (the quantity the scores predict: positive = the removed examples helped the query).
Higher pixel_l2, lower cosine and a larger loss increase = the removed examples mattered more; the random
baseline (k random examples removed) is the reference. Per method and metric: median and mean over
queries and a percentile bootstrap CI of the median (resampling queries; counterfactual.bootstrap_samples,
counterfactual.ci, seeds.bootstrap).
Writes <table>.csv (long: method, metric, ...), .md, .json (DVC metrics), .html (for the report),
<table>_per_query.csv, and the figures <boxplots>.{png,pdf} and <pairs>.{png,pdf}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from workflow_scripts.core import data as core_data
from workflow_scripts.core.classifier import embed, load_classifier
from workflow_scripts.core.common import ArtefactError, load_npz, log, save_json, save_text, select_device
from workflow_scripts.dag.paths import RANDOM_BASELINE
from workflow_scripts.report.plotting import html_page, markdown_to_html, plt, save_figure, show_image
from workflow_scripts.scorers import clip

METRICS = {  # column -> (label, which direction means "the removed examples mattered")
    "pixel_l2": ("pixel L2", "higher"),
    "embedding_cosine": ("embedding cosine", "lower"),
    "loss_change": ("loss change", "higher"),
}
REGENERATED = ("query", "image_full", "image_counterfactual", "loss_full", "loss_counterfactual")


def pixel_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image Euclidean distance over all pixels: a, b of shape (n, ...) -> (n,)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    return np.sqrt(((a - b) ** 2).reshape(len(a), -1).sum(1))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) embedding matrices; a zero vector has cosine 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {a.shape} vs {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1.0), 0.0)


def bootstrap_median(values, n_bootstrap: int, ci: float, seed: int) -> dict:
    """Median, mean and a percentile bootstrap CI of the median of `values` (resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError("need a non-empty 1-D array of per-query values")
    if not np.isfinite(values).all():
        raise ValueError("per-query values contain NaN or infinite entries")
    generator = np.random.default_rng(seed)
    resamples = values[generator.integers(0, len(values), (n_bootstrap, len(values)))]
    low, high = np.quantile(np.median(resamples, axis=1), [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return {
        "median": float(np.median(values)),
        "mean": float(values.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "n_queries": int(len(values)),
    }


# ------------------------------------------------------------------------------------------- embeddings
class Embedder:
    """CLIP with local weights when configured and present, else the benchmark's classifier."""

    def __init__(self, cf_cfg: dict, classifier_path: str | None, train_images: np.ndarray, device="cpu"):
        weights = cf_cfg.get("clip_weights")
        if weights and Path(weights).expanduser().is_file():
            self.net = clip.load_clip(cf_cfg["clip_model"], Path(weights).expanduser(), device)
            self._embed = lambda x: clip.embed(self.net, x)
            self.name = f"CLIP {cf_cfg['clip_model']}"
            return
        if weights:
            log.warning("counterfactual.clip_weights %s does not exist: embedding cosine uses the classifier", weights)
        if not classifier_path:
            raise ArtefactError(
                "the embedding cosine needs CLIP weights (counterfactual.clip_weights) or the "
                "classifier checkpoint (--classifier)"
            )
        model, _ = load_classifier(classifier_path, train_images=train_images, device=device)
        # regenerated images at another resolution (the latent family's decodings) at the classifier's
        self._embed = lambda x: embed(model, core_data.to_size(x, train_images.shape[-1]))
        self.name = "classifier features" + (f" (CLIP weights {weights} not found)" if weights else "")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._embed(np.asarray(images, dtype=np.float32))


# ------------------------------------------------------------------------------------------- tables
def load_regenerated(paths: list[str]) -> pd.DataFrame:
    """One row per (method, query) from .../counterfactual/<method>/q<NNN>/regenerated.npz files."""
    rows = []
    for path in paths:
        path = Path(path)
        arrays = load_npz(path, REGENERATED)
        method, query = path.parent.parent.name, path.parent.name
        if int(arrays["query"]) != int(query.lstrip("q")):
            raise ArtefactError(f"{path}: holds query {int(arrays['query'])}, its directory says {query}")
        rows.append(
            {
                "method": method,
                "query": int(arrays["query"]),
                "image_full": arrays["image_full"],
                "image_counterfactual": arrays["image_counterfactual"],
                "loss_full": float(arrays["loss_full"]),
                "loss_counterfactual": float(arrays["loss_counterfactual"]),
            }
        )
    if not rows:
        raise ArtefactError("no regenerated counterfactual queries given (--regenerated)")
    return pd.DataFrame(rows)


def per_query_metrics(regenerated: pd.DataFrame, embed) -> pd.DataFrame:
    full = np.stack(regenerated["image_full"].to_list())
    counterfactual = np.stack(regenerated["image_counterfactual"].to_list())
    table = regenerated[["method", "query", "loss_full", "loss_counterfactual"]].copy()
    table["pixel_l2"] = pixel_l2(counterfactual, full)
    table["embedding_cosine"] = cosine(embed(counterfactual), embed(full))
    table["loss_change"] = table["loss_counterfactual"] - table["loss_full"]
    return table


def summary_table(per_query: pd.DataFrame, methods: list[str], n_bootstrap: int, ci: float, seed: int) -> pd.DataFrame:
    rows = []
    for method in methods:
        sub = per_query[per_query["method"] == method]
        if sub.empty:
            raise ArtefactError(f"no counterfactual results for method {method!r}")
        for metric in METRICS:
            rows.append({"method": method, "metric": metric, **bootstrap_median(sub[metric], n_bootstrap, ci, seed)})
    return pd.DataFrame(rows)


def to_markdown(summary: pd.DataFrame, k: int, n_train: int, embedding: str, ci: float) -> str:
    labels = [f"{METRICS[m][0]} ({METRICS[m][1]} = removal mattered more)" for m in METRICS]
    lines = [f"| method | {' | '.join(labels)} |", "|---|" + "---|" * len(METRICS)]
    for method, sub in summary.groupby("method", sort=False):
        cells = []
        for metric in METRICS:
            r = sub[sub["metric"] == metric].iloc[0]
            cells.append(f"{r['median']:.4g} (mean {r['mean']:.4g}) [{r['ci_low']:.4g}, {r['ci_high']:.4g}]")
        lines.append(f"| {method} | {' | '.join(cells)} |")
    n = int(summary["n_queries"].iloc[0])
    lines += [
        "",
        f"Median over {n} generated queries (mean in parentheses) and a {ci:.0%} bootstrap CI of the median; "
        f"k = {k} of {n_train} training examples removed per query ({RANDOM_BASELINE}: k random ones). "
        f"pixel L2 on images in [-1, 1]; embedding: {embedding}; loss change = m_q(retrained) - m_q(full).",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- figures
def plot_boxplots(per_query: pd.DataFrame, methods: list[str], stem, embedding: str) -> None:
    import seaborn as sns

    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.6 * len(METRICS), 3.8))
    palette = {
        m: ("0.6" if m == RANDOM_BASELINE else c) for m, c in zip(methods, sns.color_palette("deep", len(methods)))
    }
    for ax, (metric, (label, better)) in zip(axes, METRICS.items()):
        sns.boxplot(
            data=per_query,
            x="method",
            y=metric,
            order=methods,
            hue="method",
            palette=palette,
            ax=ax,
            showfliers=False,
            legend=False,
        )
        sns.stripplot(data=per_query, x="method", y=metric, order=methods, color="k", size=3, ax=ax)
        ax.set_title(f"{label}\n({better} = removal mattered more)", fontsize=9)
        ax.set_xlabel("")
        ax.set_ylabel(label + (f" ({embedding})" if metric == "embedding_cosine" else ""), fontsize=8)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        if metric == "loss_change":
            ax.axhline(0, c="grey", lw=0.8)
    fig.suptitle(
        f"Counterfactual retraining: top-k removed per query ({per_query['query'].nunique()} queries)", fontsize=10
    )
    fig.tight_layout()
    save_figure(fig, stem)


def plot_pairs(regenerated: pd.DataFrame, per_query: pd.DataFrame, methods: list[str], stem) -> None:
    """Rows = queries; first column the full model's image, then each method's counterfactual image."""

    queries = sorted(regenerated["query"].unique())
    fig, axes = plt.subplots(
        len(queries), 1 + len(methods), figsize=(1.3 * (1 + len(methods)), 1.45 * len(queries)), squeeze=False
    )
    for r, q in enumerate(queries):
        rows = regenerated[regenerated["query"] == q].set_index("method")
        show_image(axes[r, 0], rows.iloc[0]["image_full"], f"q{q}: full model" if r == 0 else f"q{q}")
        for c, method in enumerate(methods, start=1):
            l2 = per_query[(per_query["method"] == method) & (per_query["query"] == q)]["pixel_l2"].iloc[0]
            show_image(
                axes[r, c], rows.loc[method, "image_counterfactual"], (f"{method}\n" if r == 0 else "") + f"L2 {l2:.2f}"
            )
    fig.suptitle("Same sampling seed: full model vs. retrained without each method's top-k", fontsize=9)
    fig.tight_layout()
    save_figure(fig, stem)


# ------------------------------------------------------------------------------------------- stage
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--regenerated", nargs="+", required=True, help=".../counterfactual/<method>/q<NNN>/regenerated.npz"
    )
    parser.add_argument(
        "--selections", nargs="+", required=True, help=".../counterfactual/<method>/q<NNN>/selection.json"
    )
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--classifier", help="classifier checkpoint (the embedding when there are no CLIP weights)")
    parser.add_argument("--table", required=True, help="output stem: .csv, .md, .json, .html and _per_query.csv")
    parser.add_argument("--boxplots", required=True, help="figure stem (.png and .pdf)")
    parser.add_argument("--pairs", required=True, help="figure stem (.png and .pdf)")


def run(args, config: dict) -> None:
    cf = config["counterfactual"]
    methods = [*cf["methods"], RANDOM_BASELINE]
    selections = [json.loads(Path(p).read_text()) for p in args.selections]
    missing = sorted(set(methods) - {s["method"] for s in selections})
    if missing:
        raise ArtefactError(f"no selection.json for {missing}")
    k, n_train = selections[0]["k"], selections[0]["n_train"]
    if any(s["k"] != k for s in selections):
        raise ArtefactError(f"the selections removed different k: {sorted({s['k'] for s in selections})}; rerun them")
    train_images = core_data.load_dataset(args.dataset)["train_images"]
    embed = Embedder(cf, args.classifier, train_images, select_device(config["compute"]))
    regenerated = load_regenerated(args.regenerated)
    per_query = per_query_metrics(regenerated, embed)
    summary = summary_table(per_query, methods, cf["bootstrap_samples"], cf["ci"], config["seeds"]["bootstrap"])
    summary["k"], summary["n_train"], summary["embedding"] = k, n_train, embed.name

    stem = Path(args.table)
    save_text(summary.to_csv(index=False), stem.with_suffix(".csv"))
    save_text(per_query.to_csv(index=False), stem.with_name(stem.name + "_per_query.csv"))
    markdown = to_markdown(summary, k, n_train, embed.name, cf["ci"])
    save_text(markdown, stem.with_suffix(".md"))
    save_json(
        {
            m: {
                f"{r.metric}_{stat}": float(getattr(r, stat))
                for r in sub.itertuples()
                for stat in ("median", "mean", "ci_low", "ci_high")
            }
            for m, sub in summary.groupby("method", sort=False)
        },
        stem.with_suffix(".json"),
    )
    save_text(html_page("Counterfactual retraining", markdown_to_html(markdown)), stem.with_suffix(".html"))
    plot_boxplots(per_query, methods, args.boxplots, embed.name)
    plot_pairs(regenerated, per_query, methods, args.pairs)
    log.info("counterfactual:\n%s", markdown)
