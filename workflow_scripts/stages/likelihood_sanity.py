"""Stage `likelihood_sanity` (model.family vesde): is the exact bits/dim a sensible measurement?

The sanity check of the metagradient paper (`metagradient-likelihood-attribution`, Figure 2, MNIST: training
~3.5 < rotated ~3.8 < averaged ~5.3 < noise ~9.1 bits/dim): the exact bits/dim of the full VE-SDE model
(vesde.measure_likelihood, the measure stage's measure.likelihood settings) of n images per category, with
n = the number of held-out queries (data.n_heldout):

  train     training images
  heldout   the held-out queries (not trained on; not in the paper)
  rotated   the same training images rotated by 90 degrees
  averaged  the pixel mean of two random (different) training images
  noise     uniform noise on the data's levels

Images are drawn with seeds.measure (stream SANITY_STREAM); every image gets the dequantisation draw of its
position in its category (the same draws in every category). Writes <table>.csv (per category: n, mean,
standard error, median, min, max bits/dim), <table>.md (with whether the paper's ordering of the means holds,
and which pairs break it) and <figure>.png/.pdf (examples and bits/dim per category, seaborn).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import log, rng, save_text, select_device
from workflow_scripts.families.likelihood import measure_settings
from workflow_scripts.families.registry import load_family_model
from workflow_scripts.families.vesde import measure_likelihood, vesde_settings
from workflow_scripts.report.plotting import save_figure

CATEGORIES = ("train", "heldout", "rotated", "averaged", "noise")
PAPER_ORDER = ("train", "rotated", "averaged", "noise")  # the paper's claim, in increasing bits/dim
SANITY_STREAM = 10  # dequantisation stream (the measure stage uses 0, 1 for its query sets)


def sanity_images(dataset: dict, n: int, levels: int, seed: int) -> dict[str, np.ndarray]:
    """n images per category (held-out: at most all of them), float32 (n, c, h, w) in [-1, 1]."""
    if n > len(dataset["train_images"]):
        raise ValueError(f"{n} images per category, but the training set has only {len(dataset['train_images'])}")
    return sanity_categories(dataset, n, levels, rng(seed, SANITY_STREAM))


def sanity_categories(dataset: dict, n: int, levels: int, g: np.random.Generator) -> dict[str, np.ndarray]:
    """The categories drawn from g (also benchmarks/vesde_sanity.py, with its own generator)."""
    train, heldout = dataset["train_images"], dataset["heldout_images"]
    pick = g.choice(len(train), size=n, replace=False)
    pairs = g.choice(len(train), size=(n, 2), replace=True)
    pairs[:, 1] = np.where(pairs[:, 1] == pairs[:, 0], (pairs[:, 1] + 1) % len(train), pairs[:, 1])
    noise = g.integers(0, levels, size=(n, *train.shape[1:])) / (levels - 1) * 2 - 1
    return {
        "train": train[pick],
        "heldout": heldout[np.sort(g.choice(len(heldout), size=min(n, len(heldout)), replace=False))],
        "rotated": np.rot90(train[pick], k=1, axes=(2, 3)).copy(),
        "averaged": 0.5 * (train[pairs[:, 0]] + train[pairs[:, 1]]),
        "noise": noise.astype(np.float32),  # k / 16 * 2 - 1: exact in float32
    }


def measure_categories(
    model, images: dict[str, np.ndarray], model_cfg: dict, likelihood_cfg: dict, levels: int, seed: int, device="cpu"
) -> dict[str, np.ndarray]:
    """{category: bits/dim (n,)} under the model's exact likelihood."""
    out = {}
    for name, x in images.items():
        start = time.time()
        out[name] = measure_likelihood(
            model, np.asarray(x, np.float32), model_cfg, likelihood_cfg, levels, seed, SANITY_STREAM, device
        )["bpd"]
        log.info(
            "likelihood_sanity %-8s %d images: mean %.3f bits/dim (%.0f s)",
            name,
            len(x),
            out[name].mean(),
            time.time() - start,
        )
    return out


def summary_table(bpd: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for name in CATEGORIES:
        v = np.asarray(bpd[name], dtype=np.float64)
        rows.append(
            {
                "category": name,
                "n": len(v),
                "mean_bpd": v.mean(),
                "se_bpd": v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan"),
                "median_bpd": float(np.median(v)),
                "min_bpd": v.min(),
                "max_bpd": v.max(),
            }
        )
    return pd.DataFrame(rows)


def broken_pairs(table: pd.DataFrame) -> list[tuple[str, str]]:
    """Consecutive pairs (a, b) of the paper's order train < rotated < averaged < noise with mean(a) >= mean(b)."""
    mean = table.set_index("category")["mean_bpd"]
    return [(a, b) for a, b in zip(PAPER_ORDER[:-1], PAPER_ORDER[1:]) if not mean[a] < mean[b]]


def markdown(table: pd.DataFrame, levels: int, setting: str) -> str:
    lines = ["| category | n | mean bits/dim (SE) | median | min | max |", "|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(
            f"| {r.category} | {r.n} | {r.mean_bpd:.3f} ({r.se_bpd:.3f}) | {r.median_bpd:.3f} | "
            f"{r.min_bpd:.3f} | {r.max_bpd:.3f} |"
        )
    broken = broken_pairs(table)
    verdict = "holds" if not broken else "does NOT hold: " + ", ".join(f"{a} >= {b}" for a, b in broken)
    lines += [
        "",
        f"Paper's ordering of the means, train < rotated < averaged < noise: {verdict}.",
        f"Uniform over the {levels} levels: {math.log2(levels):.3f} bits/dim. {setting}",
    ]
    return "\n".join(lines) + "\n"


def plot(bpd: dict[str, np.ndarray], images: dict[str, np.ndarray], levels: int, title: str, stem) -> None:
    import matplotlib
    import matplotlib.pyplot as plt
    import seaborn as sns

    frame = pd.DataFrame([{"category": k, "bits/dim": b} for k in CATEGORIES for b in bpd[k]])
    fig, (ax_img, ax) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 2.2]})
    shown = min(4, *(len(v) for v in images.values()))
    pad = lambda a: np.pad(a, 1, constant_values=np.nan)  # noqa: E731  (white frame between examples)
    strip = np.concatenate([np.concatenate([pad(images[k][i, 0]) for i in range(shown)], axis=1) for k in CATEGORIES])
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="white")
    ax_img.imshow(strip, cmap=cmap, vmin=-1, vmax=1)
    h = images["train"].shape[-2] + 2
    ax_img.set_yticks([h / 2 - 0.5 + h * i for i in range(len(CATEGORIES))], CATEGORIES)
    ax_img.set_xticks([])
    ax_img.set_title("examples (first channel)")
    sns.boxplot(data=frame, x="category", y="bits/dim", order=list(CATEGORIES), ax=ax, color="0.9", showfliers=False)
    sns.stripplot(data=frame, x="category", y="bits/dim", order=list(CATEGORIES), ax=ax, size=4, color="C0")
    ax.axhline(math.log2(levels), ls="--", color="C3", lw=1)
    ax.text(
        len(CATEGORIES) - 0.5,
        math.log2(levels),
        f" uniform over {levels} levels",
        color="C3",
        va="bottom",
        ha="right",
        fontsize=8,
    )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, stem)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the full VE-SDE model")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--table", required=True, help="output stem: writes .csv and .md")
    parser.add_argument("--figure", required=True, help="output stem: writes .png and .pdf")


def run(args, config: dict) -> None:
    if config["model"].get("family", "ddpm") != "vesde":
        raise ValueError("the likelihood sanity check measures exact bits/dim: it needs model.family vesde")
    device = select_device(config["compute"])
    model, payload = load_family_model(args.model, config["model"], device)
    levels = core_data.N_LEVELS[config["data"]["dataset"]]
    dataset = core_data.load_dataset(args.dataset)
    n = len(dataset["heldout_images"])
    images = sanity_images(dataset, n, levels, config["seeds"]["measure"])
    lik = measure_settings(config["measure"], "vesde")["likelihood"]
    bpd = measure_categories(model, images, config["model"], lik, levels, config["seeds"]["measure"], device)
    table = summary_table(bpd)
    setting = (
        f"VE-SDE (sigma {vesde_settings(config['model'])['sigma']:g}) trained "
        f"{payload['step']} steps; {lik['solver']} with {lik['n_steps']} steps in ln sigma, exact divergence, "
        f"dequantised: {lik['dequantize']}."
    )
    save_text(table.to_csv(index=False), Path(args.table).with_suffix(".csv"))
    save_text(markdown(table, levels, setting), Path(args.table).with_suffix(".md"))
    plot(
        bpd,
        images,
        levels,
        f"exact bits/dim, VE-SDE ({payload['step']} DSM steps, {lik['solver']} "
        f"{lik['n_steps']} steps), {n} images per category",
        args.figure,
    )
    log.info(
        "likelihood_sanity: %s; ordering broken at %s",
        table.set_index("category")["mean_bpd"].round(3).to_dict(),
        broken_pairs(table) or "nothing",
    )
