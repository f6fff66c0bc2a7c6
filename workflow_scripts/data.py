"""Stage `data`: load the data set, split train / held-out queries, draw the LDS subsets."""
from __future__ import annotations

import argparse

import numpy as np

from .common import load_npz, log, rng, save_npz

# Number of intensity levels of each data set's pixels (scaled to [-1, 1]): the discretisation of the
# likelihood measurements (decoder bins, dequantisation offset; workflow_scripts/likelihood.py, vesde.py).
N_LEVELS = {"digits": 17}  # digits: pixel values 0..16


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as (n, 1, 8, 8) float32 in [-1, 1] and int labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
    return (images * 2.0 - 1.0)[:, None], digits.target.astype(np.int64)


def make_dataset(data_cfg: dict, split_seed: int) -> dict[str, np.ndarray]:
    images, labels = load_digits_images()
    order = rng(split_seed).permutation(len(images))
    train_idx = np.sort(order[: data_cfg["n_train"]])
    heldout_idx = np.sort(order[data_cfg["n_train"] : data_cfg["n_train"] + data_cfg["n_heldout"]])
    return {
        "train_images": images[train_idx], "train_labels": labels[train_idx], "train_index": train_idx,
        "heldout_images": images[heldout_idx], "heldout_labels": labels[heldout_idx], "heldout_index": heldout_idx,
    }


def make_subsets(n_train: int, lds_cfg: dict, subsets_seed: int) -> dict[str, np.ndarray]:
    """M membership masks, each exactly round(fraction * N) examples; first n_tuning are TUNING subsets."""
    size = int(round(lds_cfg["fraction"] * n_train))
    generator = rng(subsets_seed)
    masks = np.zeros((lds_cfg["n_subsets"], n_train), dtype=bool)
    for j in range(lds_cfg["n_subsets"]):
        masks[j, generator.choice(n_train, size=size, replace=False)] = True
    n_tuning = lds_cfg["n_tuning"]
    return {"masks": masks, "tuning": np.arange(n_tuning), "evaluation": np.arange(n_tuning, lds_cfg["n_subsets"])}


def load_dataset(path) -> dict[str, np.ndarray]:
    return load_npz(path, ("train_images", "heldout_images"))


def load_subsets(path) -> dict[str, np.ndarray]:
    return load_npz(path, ("masks", "tuning", "evaluation"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset-out", required=True)
    parser.add_argument("--subsets-out", required=True)


def run(args, config: dict) -> None:
    dataset = make_dataset(config["data"], config["seeds"]["split"])
    subsets = make_subsets(len(dataset["train_images"]), config["lds"], config["seeds"]["subsets"])
    save_npz(args.dataset_out, **dataset)
    save_npz(args.subsets_out, **subsets)
    log.info("data: %d train, %d held-out queries, %d subsets (%d tuning)", len(dataset["train_images"]),
             len(dataset["heldout_images"]), len(subsets["masks"]), len(subsets["tuning"]))
