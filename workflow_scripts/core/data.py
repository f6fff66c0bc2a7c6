"""The benchmark's data: the train / held-out split, the LDS subsets, the generated queries, and their readers."""

from __future__ import annotations

import numpy as np

from workflow_scripts.core import artbench, celeba, datasets, folder
from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import load_npz, rng

# Number of intensity levels of each data set's pixels (scaled to [-1, 1]): the discretisation of the
# likelihood measurements (decoder bins, dequantisation offset; workflow_scripts/families/likelihood.py, vesde.py).
N_LEVELS = {  # digits: pixel values 0..16; the others are uint8 images
    "digits": 17,
    "mnist": 256,
    "cifar10": 256,
    "cifar2": 256,
    "artbench2": 256,
    "artbench5": 256,
    "artbench10": 256,
    "celeba": 256,
    "folder": 256,
}


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as (n, 1, 8, 8) float32 in [-1, 1] and int labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
    return (images * 2.0 - 1.0)[:, None], digits.target.astype(np.int64)


def make_dataset(data_cfg: dict, split_seed: int) -> dict[str, np.ndarray]:
    """{train,heldout}_{images,labels,index}; caption-bearing data sets (ArtBench) add `captions`, one str per class
    (index = label)."""
    if data_cfg["dataset"] in artbench.DATASETS:
        return make_file_dataset(data_cfg, split_seed, artbench.open_source(data_cfg))
    if data_cfg["dataset"] == "celeba":
        return make_file_dataset(data_cfg, split_seed, celeba.open_source(data_cfg))
    if data_cfg["dataset"] == "folder":
        return make_file_dataset(data_cfg, split_seed, folder.open_source(data_cfg))
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


def make_file_dataset(data_cfg: dict, split_seed: int, source: datasets.ImageSource) -> dict[str, np.ndarray]:
    """ArtBench / CelebA / folder: n_train images of the source's training split and n_heldout of its held-out split,
    each drawn class-balanced by the split seed as in make_torchvision_dataset (CelebA: one class, a plain seeded
    draw; folder: a uniform seeded draw, held-out from what the training draw left when both come from one folder);
    only the drawn images are decoded. *_index identify the images in the data set's files (core/artbench.py,
    core/celeba.py, core/folder.py); a folder adds *_files, the drawn images' paths."""
    name, generator, out, drawn = data_cfg["dataset"], rng(split_seed), {}, {}
    for part, n in (("train", data_cfg["n_train"]), ("heldout", data_cfg["n_heldout"])):
        labels = source.labels[part]
        # the classes the draw balances: the labels, or one class (uniform); -1 = not drawable
        strata = labels.copy() if source.balanced else np.zeros_like(labels)
        if source.shared and part == "heldout":
            strata[drawn["train"]] = -1  # the training draw's positions in the shared pool
        try:
            chosen = datasets.stratified_choice(strata, n, generator, source.n_classes if source.balanced else 1)
        except ValueError as exc:
            why = exc if source.balanced else f"it has {np.count_nonzero(strata == 0)} images"
            raise ValueError(
                f"data.n_{part} = {n} is too large for {name}'s {source.split_names[part]}: {why}"
            ) from None
        drawn[part] = chosen
        out.update(
            {
                f"{part}_images": source.read(part, chosen),
                f"{part}_labels": labels[chosen],
                f"{part}_index": source.index[part][chosen],
            }
        )
        if source.files is not None:
            out[f"{part}_files"] = source.files[part][chosen]
    if source.captions is not None:
        out["captions"] = source.captions
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


def load_queries(dataset_path, samples_path, extra_path=None) -> dict[str, np.ndarray]:
    """The query images of every query set, keyed by set name, as the model takes them (the latent family: latents):
    generated, heldout, and `extra` when extra_path (the model's extra-queries file, paths.extra_inputs_file) is
    given."""
    queries = {
        "generated": load_npz(samples_path, ("images",))["images"],
        "heldout": core_data.load_dataset(dataset_path)["heldout_images"],
    }
    if extra_path is not None:
        queries["extra"] = load_extra_queries(extra_path)["images"]
    return queries


def load_extra_queries(path) -> dict[str, np.ndarray]:
    """The extra-queries file (stage queries, or encode --queries for the latent family): images, files (path of each
    image relative to queries.extra) and, for a conditional model, labels (index of each caption in the model's
    caption table)."""
    return load_npz(path, ("images", "files"))


# The per-example conditions of a conditional model (model.family latent: caption indices), by split: file, array.
CONDITION_ARRAYS = {
    "train": ("dataset", "train_labels"),
    "generated": ("samples", "labels"),
    "heldout": ("dataset", "heldout_labels"),
    "extra": ("extra", "labels"),
}


def load_conditions(dataset_path, samples_path, extra_path=None) -> dict[str, np.ndarray | None]:
    """{split: (n,) int64 conditions} for train / generated / heldout / extra, aligned with the split's images: the
    dataset file's train_labels / heldout_labels, the samples file's labels (the caption index of each generated
    query) and the extra-queries file's labels. A split whose file is None is None. Read only for a conditional
    model (unconditional models take none)."""
    paths = {"dataset": dataset_path, "samples": samples_path, "extra": extra_path}
    needed = {source: tuple(k for s, k in CONDITION_ARRAYS.values() if s == source) for source in paths}
    files = {source: load_npz(path, needed[source]) for source, path in paths.items() if path is not None}
    return {
        split: np.asarray(files[source][key]).astype(np.int64) if source in files else None
        for split, (source, key) in CONDITION_ARRAYS.items()
    }


def to_size(images: np.ndarray, size: int) -> np.ndarray:
    """Images (n, C, H, W) at spatial size `size` x `size`: block means when H is a multiple of size (a decoded
    16x16 latent-family sample next to the 8x8 training digits), pixel repeats when size is a multiple of H."""
    height = images.shape[-1]
    if height == size:
        return images
    if height % size == 0:
        f = height // size
        return images.reshape(*images.shape[:-2], size, f, size, f).mean(axis=(-3, -1)).astype(images.dtype)
    if size % height == 0:
        f = size // height
        return images.repeat(f, axis=-2).repeat(f, axis=-1)
    raise ValueError(f"images of size {height} cannot be brought to size {size} (neither divides the other)")


def load_query_images(dataset_path, samples_path, extra_path=None) -> dict[str, np.ndarray]:
    """The query sets as IMAGES at the data set's resolution: the generated queries' decodings where the model
    works in a latent space (samples 'decoded'), else the samples themselves; the held-out images; and the extra
    queries (extra_path: the queries stage's image file, never the latent family's encoded one)."""
    dataset = load_dataset(dataset_path)
    samples = load_npz(samples_path, ("images",))
    generated = samples["decoded"] if "decoded" in samples else samples["images"]
    images = {
        "generated": to_size(generated, dataset["heldout_images"].shape[-1]),
        "heldout": dataset["heldout_images"],
    }
    if extra_path is not None:
        images["extra"] = load_extra_queries(extra_path)["images"]
    return images


def quantise(images: np.ndarray, levels: int) -> np.ndarray:
    """Images in [-1, 1] rounded to the data set's `levels` evenly spaced intensities (N_LEVELS): a user's query
    image read at 256 levels, brought to the 17 of the digits, lies where the likelihood measurements' bins are."""
    steps = levels - 1
    return (np.round((images + 1.0) / 2.0 * steps) / steps * 2.0 - 1.0).astype(np.float32)
