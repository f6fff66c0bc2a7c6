"""Small data sets written in torchvision's exact on-disk formats (tests of workflow_scripts/core/datasets.py).

MNIST: the four raw idx files under <root>/MNIST/raw/ (big-endian magic 0x0803 images / 0x0801 labels).
CIFAR-10: the python pickles of cifar-10-batches-py/ (data_batch_1..5, test_batch: {'data': (n, 3072)
uint8 rows in CHW order, 'labels': list}; batches.meta: {'label_names': [...]}).

torchvision checks the md5 of every CIFAR file against the official archive's; small files cannot match,
so `official_cifar_md5s(monkeypatch, root)` replaces the expected checksums by those of the files written
here (the check itself still runs, in torchvision's code and in ours).
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _idx(path: Path, array: np.ndarray) -> None:
    """The SN3 'Pascal Vincent' idx format: magic (0, 0, type 0x08 = uint8, ndim), big-endian dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Random uint8 digits with labels cycling 0..9; returns the arrays written."""
    g = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = g.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"] = images, labels
    return arrays


def write_cifar_batches(folder: Path, per_batch: int, n_test: int, seed: int, meta_name: str, meta: dict, **extra):
    """Five training batches of per_batch images and a test batch in CIFAR's pickled CHW-row format (labels cycling
    over 10 classes; `extra` keys, e.g. filenames=True, add those entries), and the meta pickle. Returns the arrays
    written, images as (n, 3, 32, 32)."""
    g = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = [], []
    batches = [(f"data_batch_{b}", per_batch) for b in range(1, 6)] + [("test_batch", n_test)]
    arrays = {}
    for name, n in batches:
        images = g.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = [int(x) for x in (np.arange(n) + g.integers(10)) % 10]
        entry = {"batch_label": name, "labels": labels, "data": images.reshape(n, 3072)}
        if extra.get("filenames"):
            entry["filenames"] = [f"{i}.png" for i in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        if name == "test_batch":
            arrays["test_images"], arrays["test_labels"] = images, np.array(labels)
        else:
            train_images.append(images)
            train_labels += labels
    arrays["train_images"], arrays["train_labels"] = np.concatenate(train_images), np.array(train_labels)
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return arrays


def write_cifar10(root: Path, per_batch: int = 30, n_test: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """torchvision's cifar-10-batches-py: five training batches of per_batch images and a test batch."""
    meta = {"num_cases_per_batch": per_batch, "label_names": CIFAR_NAMES, "num_vis": 3072}
    return write_cifar_batches(
        Path(root) / "cifar-10-batches-py", per_batch, n_test, seed, "batches.meta", meta, filenames=True
    )


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def official_cifar_md5s(monkeypatch, root: Path) -> None:
    """Make torchvision's CIFAR10 expect the md5s of the files under root instead of the official ones."""
    from torchvision.datasets import CIFAR10

    folder = Path(root) / CIFAR10.base_folder
    monkeypatch.setattr(CIFAR10, "train_list", [[name, md5(folder / name)] for name, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[name, md5(folder / name)] for name, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(folder / CIFAR10.meta["filename"])})
