"""Small ArtBench-10 and CelebA data sets written in their exact on-disk formats (tests of workflow_scripts/core/
artbench.py, celeba.py).

ArtBench-10 imagefolder: <root>/ArtBench-10.csv (columns name, artist, url, is_public_domain, length, width, label,
split, cifar_index; one row per image) and <root>/artbench-10-imagefolder-split/{train,test}/<style>/<name> JPEGs.
ArtBench-10 batches: <root>/artbench-10-batches-py/{data_batch_1..5,test_batch} ({'data': (n, 3072) uint8 CHW rows,
'labels': list}) and meta ({'styles': [...]}), the cifar-10-batches-py layout.
CelebA: <root>/celeba/img_align_celeba/<000001>.jpg (178x218) and <root>/celeba/list_eval_partition.txt
('000001.jpg 0' lines).

The loaders check the md5 of ArtBench's official files; small files cannot match, so `artbench_md5s(monkeypatch,
root)` sets the module constants artbench.CSV_MD5 / TAR_MD5 / BATCHES_MD5 to the md5s of the files written here (the
check itself still runs).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision_files import md5, write_cifar_batches

from workflow_scripts.core import artbench

CSV_COLUMNS = ["name", "artist", "url", "is_public_domain", "length", "width", "label", "split", "cifar_index"]
# the real CSV is not sorted by style; neither is this one
CSV_STYLE_ORDER = [
    "impressionism",
    "romanticism",
    "expressionism",
    "surrealism",
    "art_nouveau",
    "renaissance",
    "realism",
    "post_impressionism",
    "baroque",
    "ukiyo_e",
]


def solid_jpeg(path: Path, size: tuple[int, int], value: int) -> None:
    """A width x height JPEG of one grey level (quality 95: decodes within a few levels of `value`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path, format="JPEG", quality=95)


def write_artbench(root: Path, n_train: int = 4, n_test: int = 2, size: tuple[int, int] = (32, 24)) -> list[dict]:
    """n_train + n_test JPEGs per style (grey level = 10 + 20 * canonical style number, so the style of a decoded image
    is readable) and the CSV listing them; returns the CSV rows in file order."""
    root = Path(root)
    rows = []
    for style in CSV_STYLE_ORDER:
        value = 10 + 20 * artbench.STYLES.index(style)
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                name = f"artist-{i}_{style}-{split}-{i}.jpg"
                solid_jpeg(root / artbench.IMAGEFOLDER / split / style / name, size, value)
                rows.append(
                    {
                        "name": name,
                        "artist": f"artist-{i}",
                        "url": f"https://uploads.example/{name}",
                        "is_public_domain": "True",
                        "length": 800,
                        "width": 600,
                        "label": style,
                        "split": split,
                        "cifar_index": i,
                    }
                )
    with open(root / artbench.CSV_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def write_artbench_batches(root: Path, per_batch: int = 20, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """The 32x32 CIFAR-style pickles, labels cycling over the ten styles; returns the arrays written (NCHW)."""
    folder = Path(root) / artbench.BATCHES
    return write_cifar_batches(folder, per_batch, n_test, seed, "meta", {"styles": list(artbench.STYLES)})


def artbench_md5s(monkeypatch, root: Path) -> None:
    """Make the loader expect the md5s of the files written under root instead of the official ones."""
    root = Path(root)
    if (root / artbench.CSV_NAME).is_file():
        monkeypatch.setattr(artbench, "CSV_MD5", md5(root / artbench.CSV_NAME))
    if (root / artbench.TAR_NAME).is_file():
        monkeypatch.setattr(artbench, "TAR_MD5", md5(root / artbench.TAR_NAME))
    if (root / artbench.BATCHES).is_dir():
        monkeypatch.setattr(
            artbench, "BATCHES_MD5", {n: md5(root / artbench.BATCHES / n) for n in artbench.BATCHES_MD5}
        )


def write_celeba(root: Path, partitions: list[int], size: tuple[int, int] = (178, 218)) -> Path:
    """One 178x218 JPEG per entry of `partitions` (grey level 5 * (i % 50)) and list_eval_partition.txt; returns the
    image folder."""
    folder = Path(root) / "celeba" / "img_align_celeba"
    lines = []
    for i, partition in enumerate(partitions):
        name = f"{i + 1:06d}.jpg"
        solid_jpeg(folder / name, size, 5 * (i % 50))
        lines.append(f"{name} {partition}\n")
    (Path(root) / "celeba" / "list_eval_partition.txt").write_text("".join(lines))
    return folder
