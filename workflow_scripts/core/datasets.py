"""Real image data sets (MNIST, CIFAR-10, CIFAR-2) through torchvision, read from a local root (no download), and the
helpers the image-file data sets share (ArtBench: core/artbench.py, CelebA: core/celeba.py, a folder of the user's own
images: core/folder.py).

Every loader returns (train_images, train_labels, test_images, test_labels) with images float32 in [-1, 1]
of shape (n, C, H, W) and int64 labels. torchvision reads the files and checks them (CIFAR-10: the md5 of
every batch file; MNIST: that the four raw idx files exist); before calling it we check which files are
missing or corrupt ourselves, so the error names them and says how to get them.

CIFAR-2 (docs/methods.md, D-TRAK / DAS papers): CIFAR-10 classes automobile (1) and horse (7); the data stage
draws 5000 training images (2500 per class) from the training batches and the held-out queries from the
test batch (`data.make_dataset`).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# dataset -> torchvision class, image shape (C, H, W), CIFAR-10 classes kept (None = all)
SPECS = {
    "mnist": {"torchvision": "MNIST", "shape": (1, 28, 28), "classes": None},
    "cifar10": {"torchvision": "CIFAR10", "shape": (3, 32, 32), "classes": None},
    "cifar2": {"torchvision": "CIFAR10", "shape": (3, 32, 32), "classes": (1, 7)},  # automobile, horse
}
N_CLASSES = {"mnist": 10, "cifar10": 10, "cifar2": 2}
MNIST_RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataNotFound(FileNotFoundError):
    """The data set's files are absent or corrupt under data.root; the message says how to get them."""


def image_shape(dataset: str) -> tuple[int, int, int]:
    return SPECS[dataset]["shape"]


def resolve_root(root: str | os.PathLike | None, dataset: str) -> Path:
    if not root:
        raise DataNotFound(
            f"data.dataset {dataset!r} needs data.root: the directory torchvision downloads into "
            f"(it holds {'MNIST/raw/' if dataset == 'mnist' else 'cifar-10-batches-py/'})"
        )
    return Path(os.path.expanduser(str(root))).absolute()  # absolute: the error names the files wherever the job ran


def _how_to_get(dataset: str, root: Path) -> str:
    name = SPECS[dataset]["torchvision"]
    if name == "MNIST":
        files = f"{root}/MNIST/raw/{{{','.join(MNIST_RAW)}}}"
        manual = (
            f"or download the four .gz files of https://ossci-datasets.s3.amazonaws.com/mnist/ and gunzip them "
            f"into {root}/MNIST/raw/"
        )
    else:
        files = f"{root}/cifar-10-batches-py/{{data_batch_1..5,test_batch,batches.meta}}"
        manual = (
            f"or: wget https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz && "
            f"tar -xzf cifar-10-python.tar.gz -C {shlex.quote(str(root))}"
        )
    # quoted for the shell (and the path for Python): the command is copied as it is, whatever the path holds
    code = f"import torchvision; torchvision.datasets.{name}({str(root)!r}, train=True, download=True)"
    return (
        f"torchvision's {name} files are needed: {files}. Get them once, on a machine with internet, with\n"
        f"  python -c {shlex.quote(code)}\n"
        f"{manual} (then copy {root} to the machine that runs the workflow, or point data.root at it)."
    )


def check_files(dataset: str, root: Path) -> None:
    """Raise DataNotFound naming every missing (or, for CIFAR, corrupt) file, with how to get them."""
    from torchvision import datasets
    from torchvision.datasets.utils import check_integrity

    cls = getattr(datasets, SPECS[dataset]["torchvision"])
    if cls.__name__ == "MNIST":
        problems = [
            f"missing {root / 'MNIST' / 'raw' / f}" for f in MNIST_RAW if not (root / "MNIST" / "raw" / f).is_file()
        ]
    else:
        problems = []
        for filename, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
            path = root / cls.base_folder / filename
            if not path.is_file():
                problems.append(f"missing {path}")
            elif not check_integrity(str(path), md5):  # the check torchvision makes: md5 of the official file
                problems.append(f"corrupt {path} (md5 differs from the official file's {md5})")
    if problems:
        raise DataNotFound(
            f"data.dataset {dataset!r} under data.root {root}: "
            + "; ".join(problems)
            + "\n"
            + _how_to_get(dataset, root)
        )


def _to_unit_range(uint8_images: np.ndarray) -> np.ndarray:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (256 levels, data.N_LEVELS)."""
    return (uint8_images.astype(np.float32) / 255.0) * 2.0 - 1.0


def load(dataset: str, root) -> dict[str, np.ndarray]:
    """{train,test}_{images,labels,index} of a torchvision data set: images in [-1, 1], NCHW; index = position
    in torchvision's split. CIFAR-2 keeps only its two classes, relabelled 0 (automobile) and 1 (horse)."""
    from torchvision import datasets

    if dataset not in SPECS:
        raise ValueError(f"unknown torchvision data set {dataset!r}; known: {sorted(SPECS)}")
    root = resolve_root(root, dataset)
    check_files(dataset, root)
    cls = getattr(datasets, SPECS[dataset]["torchvision"])
    splits = {}
    for split, train in (("train", True), ("test", False)):
        ds = cls(str(root), train=train, download=False)
        images = np.asarray(ds.data)  # MNIST: (n, 28, 28) uint8 tensor; CIFAR: (n, 32, 32, 3) uint8 HWC
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        labels = np.asarray(ds.targets, dtype=np.int64)
        index = np.arange(len(labels))
        classes = SPECS[dataset]["classes"]
        if classes is not None:
            index = np.flatnonzero(np.isin(labels, classes))
            images, labels = images[index], np.searchsorted(classes, labels[index]).astype(np.int64)
        if images.shape[1:] != SPECS[dataset]["shape"]:
            raise DataNotFound(
                f"{root}: {cls.__name__} images have shape {images.shape[1:]}, expected "
                f"{SPECS[dataset]['shape']}\n" + _how_to_get(dataset, root)
            )
        splits.update(
            {
                f"{split}_images": _to_unit_range(np.ascontiguousarray(images)),
                f"{split}_labels": labels,
                f"{split}_index": index,
            }
        )
    return splits


@dataclass(frozen=True)
class ImageSource:
    """An image-file data set's two source splits, keyed "train" and "heldout": the labels and index (an identifier
    of each image in the data set's own files) of every candidate image, and `read(part, positions)`, which decodes
    only the images drawn (float32 in [-1, 1], NCHW). `captions`: one str per class (index = label) or None;
    `split_names`: how the error messages name each source split. `balanced`: draw class-balanced
    (stratified_choice), else a uniform seeded draw. `shared`: "train" and "heldout" are one pool, so the held-out
    draw leaves out the drawn training images. `files`: each split's image paths (index = `index`), stored with the
    data set so that results can name the images, or None."""

    labels: dict[str, np.ndarray]
    index: dict[str, np.ndarray]
    read: Callable[[str, np.ndarray], np.ndarray]
    n_classes: int
    split_names: dict[str, str]
    captions: np.ndarray | None = None
    balanced: bool = True
    shared: bool = False
    files: dict[str, np.ndarray] | None = None


def list_problems(kind: str, paths: list, shown: int = 5) -> str:
    """'N <kind> files: a, b, c, d, e and N - 5 more' (the first few by name, and the count)."""
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return f"{len(paths)} {kind} file{'s' if len(paths) != 1 else ''}: " + ", ".join(map(str, paths[:shown])) + more


def square_resize(size: int) -> Callable:
    """PIL image -> its largest centred square, resized (bilinear) to size x size."""

    def transform(image):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        image = TF.center_crop(image, min(image.size))
        if image.size != (size, size):
            image = TF.resize(image, [size, size], interpolation=InterpolationMode.BILINEAR)
        return image

    return transform


def read_image_files(paths: list, transform: Callable, size: int, how_to_get: str, mode: str = "RGB") -> np.ndarray:
    """Decode image files (PIL, converted to `mode`: RGB or L), `transform` them to size x size PIL images, return
    float32 in [-1, 1] of shape (n, C, size, size). Unreadable or corrupt files raise DataNotFound naming them (never
    skipped)."""
    from PIL import Image

    channels = Image.getmodebands(mode)
    images = np.empty((len(paths), channels, size, size), dtype=np.float32)
    bad = []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                pixels = np.asarray(transform(image.convert(mode)), dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
            bad.append(f"{path} ({exc})")
            continue
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels  # mode L decodes to (H, W)
        if pixels.shape != (size, size, channels):
            bad.append(f"{path} (decodes to shape {pixels.shape}, expected ({size}, {size}, {channels}))")
            continue
        images[i] = _to_unit_range(pixels.transpose(2, 0, 1))
    if bad:
        raise DataNotFound(list_problems("unreadable or corrupt image", bad) + "\n" + how_to_get)
    return images


def stratified_choice(labels: np.ndarray, n: int, generator: np.random.Generator, n_classes: int) -> np.ndarray:
    """n indices drawn without replacement, as balanced over the classes as n allows (n // C per class, the
    remainder to the first classes), sorted. Refuses when a class has too few examples."""
    per_class = [n // n_classes + (c < n % n_classes) for c in range(n_classes)]
    chosen = []
    for c, k in enumerate(per_class):
        pool = np.flatnonzero(labels == c)
        if k > len(pool):
            raise ValueError(f"need {k} examples of class {c}, the split has {len(pool)}")
        chosen.append(generator.choice(pool, size=k, replace=False))
    return np.sort(np.concatenate(chosen))
