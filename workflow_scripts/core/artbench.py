"""ArtBench-10 from a local root (no download): *The ArtBench Dataset: Benchmarking Generative Models with Artworks*
(arXiv:2206.11404), the data of the D-TRAK / DAS ArtBench benchmarks.

Ten styles, 5,000 training and 1,000 test images each. Two on-disk formats (`data.format`):

- `imagefolder` (default): the authors' 256x256 release, `<root>/artbench-10-imagefolder-split/{train,test}/<style>/
  <name>` (extracted from artbench-10-imagefolder-split.tar), and its metadata `<root>/ArtBench-10.csv`: one row per
  image with columns name, artist, url, is_public_domain, length, width, label (the style), split (train / test) and
  cifar_index. The CSV's md5 is checked on every run, and the tarball's when it is present under root; every CSV
  row's file must exist. Images are centre-cropped to a square and resized to `data.resolution` (default 256: the
  files' own size). `*_index` = the image's row in ArtBench-10.csv (0-based, header excluded).
- `batches`: the 32x32 CIFAR-style pickles `<root>/artbench-10-batches-py/{data_batch_1..5,test_batch,meta}` (same
  layout as cifar-10-batches-py, meta key "styles"), read by torchvision's CIFAR10 reader with ArtBench's official
  md5s. `*_index` = position in the training / test batches.

Data sets (`data.dataset`): artbench2 = post_impressionism + ukiyo_e, artbench5 = + baroque, renaissance, romanticism,
artbench10 = all ten. Labels are 0..C-1 in the canonical (alphabetical) order of the data set's styles; the caption of
label c is `captions[c]` = "a {style} painting" with underscores as spaces (the D-TRAK / DAS prompt). No random flip
here: that is a training augmentation.

Tests write small files whose md5s cannot be the official ones; they replace the expected md5s by monkeypatching the
module constants CSV_MD5, TAR_MD5 and BATCHES_MD5 (tests/image_files.py). Nothing else skips the check.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shlex
from pathlib import Path

import numpy as np

from workflow_scripts.core.datasets import DataNotFound, ImageSource, list_problems, read_image_files, square_resize

STYLES = (
    "art_nouveau",
    "baroque",
    "expressionism",
    "impressionism",
    "post_impressionism",
    "realism",
    "renaissance",
    "romanticism",
    "surrealism",
    "ukiyo_e",
)
DATASETS = {
    "artbench2": ("post_impressionism", "ukiyo_e"),
    "artbench5": ("baroque", "post_impressionism", "renaissance", "romanticism", "ukiyo_e"),
    "artbench10": STYLES,
}
PER_STYLE = {"train": 5000, "test": 1000}
FORMATS = ("imagefolder", "batches")
RESOLUTION = {"imagefolder": 256, "batches": 32}  # default data.resolution; the batches are always 32x32

IMAGEFOLDER = "artbench-10-imagefolder-split"
CSV_NAME = "ArtBench-10.csv"
CSV_COLUMNS = ("name", "artist", "url", "is_public_domain", "length", "width", "label", "split", "cifar_index")
CSV_MD5 = "cc8e5df471b294f19f3fab19ad9f5100"
TAR_NAME = "artbench-10-imagefolder-split.tar"
TAR_MD5 = "64f4d66dcf34b3c77e8c7d68fed2ec8c"
BATCHES = "artbench-10-batches-py"
BATCHES_MD5 = {  # the authors' artbench.py (their CIFAR10 subclass)
    "data_batch_1": "c2e02a78dcea81fe6fead5f1540e542f",
    "data_batch_2": "1102a4dcf41d4dd63e20c10691193448",
    "data_batch_3": "177fc43579af15ecc80eb506953ec26f",
    "data_batch_4": "566b2a02ccfbafa026fbb2bcec856ff6",
    "data_batch_5": "faa6a572469542010a1c8a2a9a7bf436",
    "test_batch": "fa44530c8b8158467e00899609c19e52",
    "meta": "5bdcafa7398aa6b75d569baaec5cd4aa",
}
RELEASE = "https://artbench.eecs.berkeley.edu/files"


def caption(style: str) -> str:
    return f"a {style.replace('_', ' ')} painting"


def captions(dataset: str) -> np.ndarray:
    """One caption per class of the data set, index = label."""
    return np.array([caption(style) for style in DATASETS[dataset]])


def data_format(data_cfg: dict) -> str:
    return data_cfg.get("format", "imagefolder")


def resolution(data_cfg: dict) -> int:
    return int(data_cfg.get("resolution", RESOLUTION[data_format(data_cfg)]))


def how_to_get(root: Path, fmt: str) -> str:
    q = shlex.quote(str(root))  # the commands are copied as they are, whatever the path holds
    if fmt == "batches":
        files = f"{root}/{BATCHES}/{{data_batch_1..5,test_batch,meta}}"
        get = (
            f"  wget {RELEASE}/artbench-10-python.tar.gz && tar -xzf artbench-10-python.tar.gz -C {q}\n"
            "  (md5 of the archive: b116ffdc5e07e162f119149c2ad7403f; the ArtBench repository's README links it too)"
        )
    else:
        files = f"{root}/{CSV_NAME} (md5 {CSV_MD5}) and {root}/{IMAGEFOLDER}/{{train,test}}/<style>/<name>"
        get = (
            f"  wget -P {q} {RELEASE}/{CSV_NAME} {RELEASE}/{TAR_NAME}\n"
            f"  tar -xf {shlex.quote(str(root / TAR_NAME))} -C {q}   (md5 of the tarball: {TAR_MD5})"
        )
    return (
        f"ArtBench-10's files are needed: {files}. Get them once, on a machine with internet, with\n{get}\n"
        f"(then copy {root} to the machine that runs the workflow, or point data.root at it)."
    )


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_csv(root: Path) -> list[dict[str, str]]:
    """The rows of ArtBench-10.csv after checking its md5 (and the tarball's, when present) and columns."""
    path = root / CSV_NAME
    if not path.is_file():
        raise DataNotFound(f"ArtBench-10 under data.root {root}: missing {path}\n" + how_to_get(root, "imagefolder"))
    if md5(path) != CSV_MD5:
        raise DataNotFound(
            f"corrupt {path} (md5 {md5(path)} differs from the official file's {CSV_MD5})\n"
            + how_to_get(root, "imagefolder")
        )
    tar = root / TAR_NAME
    if tar.is_file() and md5(tar) != TAR_MD5:
        raise DataNotFound(
            f"corrupt {tar} (md5 differs from the official file's {TAR_MD5}): its extracted images are suspect; "
            "download it again\n" + how_to_get(root, "imagefolder")
        )
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataNotFound(f"{path}: lacks the columns {missing} (has {reader.fieldnames})")
        rows = list(reader)
    for number, row in enumerate(rows):
        if row["label"] not in STYLES or row["split"] not in PER_STYLE:
            raise DataNotFound(
                f"{path} row {number + 2}: label {row['label']!r} / split {row['split']!r} is not one of the ten "
                f"styles / train, test"
            )
    return rows


def image_path(root: Path, row: dict[str, str]) -> Path:
    return root / IMAGEFOLDER / row["split"] / row["label"] / row["name"]


def open_imagefolder(dataset: str, root: Path, size: int) -> ImageSource:
    rows = read_csv(root)
    absent = [path for path in (image_path(root, row) for row in rows) if not path.is_file()]
    if absent:
        raise DataNotFound(
            f"ArtBench-10 under data.root {root}: {CSV_NAME} lists "
            + list_problems("missing image", absent)
            + "\n"
            + how_to_get(root, "imagefolder")
        )
    styles = DATASETS[dataset]
    labels, index = {}, {}
    for part, split in (("train", "train"), ("heldout", "test")):
        keep = [i for i, row in enumerate(rows) if row["split"] == split and row["label"] in styles]
        index[part] = np.array(keep, dtype=np.int64)
        labels[part] = np.array([styles.index(rows[i]["label"]) for i in keep], dtype=np.int64)

    def read(part: str, positions: np.ndarray) -> np.ndarray:
        paths = [image_path(root, rows[i]) for i in index[part][positions]]
        return read_image_files(paths, square_resize(size), size, how_to_get(root, "imagefolder"))

    return ImageSource(
        labels,
        index,
        read,
        len(styles),
        {"train": "training split", "heldout": "test split"},
        captions(dataset),
    )


def batches_class():
    """torchvision's CIFAR10 reader pointed at artbench-10-batches-py, expecting the md5s of BATCHES_MD5."""
    from torchvision.datasets import CIFAR10

    class ArtBench10(CIFAR10):
        base_folder = BATCHES
        train_list = [[f"data_batch_{b}", BATCHES_MD5[f"data_batch_{b}"]] for b in range(1, 6)]
        test_list = [["test_batch", BATCHES_MD5["test_batch"]]]
        meta = {"filename": "meta", "key": "styles", "md5": BATCHES_MD5["meta"]}

    return ArtBench10


def open_batches(dataset: str, root: Path) -> ImageSource:
    from torchvision.datasets.utils import check_integrity

    problems = []
    for name, expected in BATCHES_MD5.items():
        path = root / BATCHES / name
        if not path.is_file():
            problems.append(f"missing {path}")
        elif not check_integrity(str(path), expected):
            problems.append(f"corrupt {path} (md5 differs from the official file's {expected})")
    if problems:
        raise DataNotFound(
            f"ArtBench-10 under data.root {root}: " + "; ".join(problems) + "\n" + how_to_get(root, "batches")
        )
    cls, styles = batches_class(), DATASETS[dataset]
    labels, index, images = {}, {}, {}
    for part, train in (("train", True), ("heldout", False)):
        ds = cls(str(root), train=train, download=False)
        unknown = sorted(set(ds.classes) - set(STYLES))
        if unknown:
            raise DataNotFound(f"{root / BATCHES / 'meta'}: unknown styles {unknown}\n" + how_to_get(root, "batches"))
        names = np.array(ds.classes)[np.asarray(ds.targets, dtype=np.int64)]
        keep = np.flatnonzero(np.isin(names, styles))
        index[part] = keep
        labels[part] = np.array([styles.index(name) for name in names[keep]], dtype=np.int64)
        images[part] = np.asarray(ds.data)[keep]  # (n, 32, 32, 3) uint8

    def read(part: str, positions: np.ndarray) -> np.ndarray:
        return (images[part][positions].transpose(0, 3, 1, 2).astype(np.float32) / 255.0) * 2.0 - 1.0

    return ImageSource(
        labels, index, read, len(styles), {"train": "training batches", "heldout": "test batch"}, captions(dataset)
    )


def open_source(data_cfg: dict) -> ImageSource:
    """The ArtBench data set of data_cfg (dataset, root, format, resolution), its files checked."""
    dataset, fmt = data_cfg["dataset"], data_format(data_cfg)
    if dataset not in DATASETS:
        raise ValueError(f"unknown ArtBench data set {dataset!r}; known: {sorted(DATASETS)}")
    if fmt not in FORMATS:
        raise ValueError(f"data.format {fmt!r}: ArtBench's formats are {list(FORMATS)}")
    if not data_cfg.get("root"):
        raise DataNotFound(f"data.dataset {dataset!r} needs data.root: the directory holding {CSV_NAME} / {BATCHES}")
    root = Path(os.path.expanduser(str(data_cfg["root"]))).absolute()
    if fmt == "batches":
        if resolution(data_cfg) != RESOLUTION["batches"]:
            raise ValueError(f"data.resolution {resolution(data_cfg)}: data.format batches is 32x32 (omit the key)")
        return open_batches(dataset, root)
    return open_imagefolder(dataset, root, resolution(data_cfg))
