"""CelebA from a local root (no download), in torchvision's on-disk layout: the aligned 178x218 faces
`<root>/celeba/img_align_celeba/<000001..202599>.jpg` and `<root>/celeba/list_eval_partition.txt`, one line
`<file> <partition>` per image (0 = train, 1 = validation, 2 = test).

The D-TRAK / DAS CelebA benchmark: training images drawn from partition 0 and held-out queries from partition 1 (the
validation partition: the published code takes them from there, though the DAS paper's text says "test";
docs/paper-scale.md), each drawn by the split seed. Every image is centre-cropped to 140x140 and resized to
`data.resolution` (default 64; the published code's CenterCrop(140) + Resize(64), bilinear). No labels (all zeros) and
no captions. `*_index` = the image's line in list_eval_partition.txt (0-based: 000001.jpg is 0).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import numpy as np

from workflow_scripts.core.datasets import DataNotFound, ImageSource, list_problems, read_image_files

FOLDER = "celeba"
IMAGES = "img_align_celeba"
PARTITION = "list_eval_partition.txt"
PARTITION_MD5 = "d32c9cbf5e040fd4025c592c306e6668"  # torchvision's CelebA.file_list
CROP, RESOLUTION = 140, 64
SPLITS = {"train": 0, "heldout": 1}  # source partition of each part


def resolution(data_cfg: dict) -> int:
    return int(data_cfg.get("resolution", RESOLUTION))


def how_to_get(root: Path) -> str:
    # quoted for the shell (and the path for Python): the command is copied as it is, whatever the path holds
    code = f"import torchvision; torchvision.datasets.CelebA({str(root)!r}, download=True)"
    return (
        f"torchvision's CelebA files are needed: {root}/{FOLDER}/{IMAGES}/*.jpg and {root}/{FOLDER}/{PARTITION}. "
        f"Get them once, on a machine with internet, with\n"
        f"  python -c {shlex.quote(code)}\n"
        f"or download img_align_celeba.zip and {PARTITION} (md5 {PARTITION_MD5}) from the CelebA authors' Google "
        f"Drive folder ('Align&Cropped Images' and 'Eval') and unzip the images into {root}/{FOLDER}/ "
        f"(then copy {root} to the machine that runs the workflow, or point data.root at it)."
    )


def read_partition(root: Path) -> tuple[list[str], np.ndarray]:
    """File names and partitions of list_eval_partition.txt, in its order."""
    path = root / FOLDER / PARTITION
    if not path.is_file():
        raise DataNotFound(f"CelebA under data.root {root}: missing {path}\n" + how_to_get(root))
    names, partitions = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataNotFound(
                f"{path} line {number}: {line!r} is not '<file> <partition 0/1/2>'; the file is corrupt\n"
                + how_to_get(root)
            )
        names.append(fields[0])
        partitions.append(int(fields[1]))
    return names, np.array(partitions, dtype=np.int64)


def open_source(data_cfg: dict) -> ImageSource:
    if not data_cfg.get("root"):
        raise DataNotFound(f"data.dataset 'celeba' needs data.root: the directory holding {FOLDER}/")
    root = Path(os.path.expanduser(str(data_cfg["root"]))).absolute()
    size = resolution(data_cfg)
    names, partitions = read_partition(root)
    folder = root / FOLDER / IMAGES
    used = np.flatnonzero(np.isin(partitions, list(SPLITS.values())))
    absent = [folder / names[i] for i in used if not (folder / names[i]).is_file()]
    if absent:
        raise DataNotFound(
            f"CelebA under data.root {root}: {PARTITION} lists "
            + list_problems("missing image", absent)
            + " (of partitions 0 and 1)\n"
            + how_to_get(root)
        )
    index = {part: np.flatnonzero(partitions == p) for part, p in SPLITS.items()}
    labels = {part: np.zeros(len(rows), dtype=np.int64) for part, rows in index.items()}

    def transform(image):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        image = TF.center_crop(image, [CROP, CROP])
        return TF.resize(image, [size, size], interpolation=InterpolationMode.BILINEAR)

    def read(part: str, positions: np.ndarray) -> np.ndarray:
        paths = [folder / names[i] for i in index[part][positions]]
        return read_image_files(paths, transform, size, how_to_get(root))

    return ImageSource(
        labels, index, read, 1, {"train": "partition 0 (train)", "heldout": "partition 1 (validation)"}, None
    )
