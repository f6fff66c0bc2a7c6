"""The benchmark's data: the train / held-out split, the LDS subsets, the generated queries, and their readers."""

from __future__ import annotations

import numpy as np

from workflow_scripts.core import data as core_data
from workflow_scripts.core import datasets
from workflow_scripts.core.common import load_npz, rng

# Number of intensity levels of each data set's pixels (scaled to [-1, 1]): the discretisation of the
# likelihood measurements (decoder bins, dequantisation offset; workflow_scripts/families/likelihood.py, vesde.py).
N_LEVELS = {"digits": 17, "mnist": 256, "cifar10": 256, "cifar2": 256}  # digits: pixel values 0..16; others uint8


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as (n, 1, 8, 8) float32 in [-1, 1] and int labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
    return (images * 2.0 - 1.0)[:, None], digits.target.astype(np.int64)


def make_dataset(data_cfg: dict, split_seed: int) -> dict[str, np.ndarray]:
    if data_cfg["dataset"] != "digits":
        return make_torchvision_dataset(data_cfg, split_seed)
    images, labels = load_digits_images()
    order = rng(split_seed).permutation(len(images))
    train_idx = np.sort(order[: data_cfg["n_train"]])
    heldout_idx = np.sort(order[data_cfg["n_train"] : data_cfg["n_train"] + data_cfg["n_heldout"]])
    return {
        "train_images": images[train_idx],
        "train_labels": labels[train_idx],
        "train_index": train_idx,
        "heldout_images": images[heldout_idx],
        "heldout_labels": labels[heldout_idx],
        "heldout_index": heldout_idx,
    }


def make_torchvision_dataset(data_cfg: dict, split_seed: int) -> dict[str, np.ndarray]:
    """MNIST / CIFAR-10 / CIFAR-2 from data.root: n_train images of the training split and n_heldout of the test
    split, each drawn class-balanced by the split seed (CIFAR-2: 2500 + 2500 train, 500 + 500 held-out).
    *_index are positions in torchvision's train / test split."""
    name = data_cfg["dataset"]
    split = datasets.load(name, data_cfg.get("root"))
    generator, n_classes = rng(split_seed), datasets.N_CLASSES[name]
    out = {}
    for part, source, n in (("train", "train", data_cfg["n_train"]), ("heldout", "test", data_cfg["n_heldout"])):
        try:
            chosen = datasets.stratified_choice(split[f"{source}_labels"], n, generator, n_classes)
        except ValueError as exc:
            raise ValueError(f"data.n_{part} = {n} is too large for {name}'s {source} split: {exc}") from None
        out.update(
            {
                f"{part}_images": split[f"{source}_images"][chosen],
                f"{part}_labels": split[f"{source}_labels"][chosen],
                f"{part}_index": split[f"{source}_index"][chosen],
            }
        )
    return out


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


def load_queries(dataset_path, samples_path) -> dict[str, np.ndarray]:
    """The query images of every query set, keyed by set name."""
    return {
        "generated": load_npz(samples_path, ("images",))["images"],
        "heldout": core_data.load_dataset(dataset_path)["heldout_images"],
    }
