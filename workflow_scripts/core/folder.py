"""The user's own training images from a local folder (`data.dataset: folder`; docs/your-data.md).

Layout of `data.root`: either image files only (one class), or one subfolder per class and nothing else at the top
(labels 0..C-1 in the sorted order of the subfolder names; a class subfolder's images may sit in nested folders).
Image files are those with an extension torchvision's ImageFolder reads (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff
.webp, any case); any other file is named in an error, except hidden files (name starting with ".", such as
.DS_Store), which are left out and counted in the log. Every image file is opened, verified and fully decoded by PIL
before anything is drawn, and every problem is named in one error: unreadable or truncated files, and files whose
mode cannot be converted to `data.channels` without changing what they show:

- converted: 1 (bilevel), L (grey), P (palette, no transparency), RGB, CMYK, YCbCr, to L (channels 1) or RGB (3);
- refused: an alpha channel (RGBA, LA, PA, P with a transparent colour: transparent pixels have no defined colour)
  and 16-bit, 32-bit or float pixels (I;16, I, F: not 0..255, conversion would clip them).

Each image is centre-cropped to its largest square and resized (bilinear) to `data.resolution` x `data.resolution`.

Captions (`data.captions`, optional; required by the text-conditional `model.family: latent`): a CSV with header
`file,caption`, one row per image, `file` the image's path relative to data.root (forward slashes). A row naming a
missing file, a file listed twice, an empty caption and an image without a row are each named in the error. The
caption table is the sorted distinct captions; an image's label is its caption's index (the latent family's
condition), else its class.

Held-out queries: from `data.heldout_folder` when set (same layout; its class subfolders must be training classes;
captions in `data.heldout_captions`, paths relative to the held-out folder), else drawn from data.root itself after
the training draw, so that the two never overlap. Draws are uniform and seeded by seeds.split (not class-balanced:
a user's classes seldom are). `*_index` = the image's position in its folder's sorted file list, `*_files` its path
relative to that folder.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workflow_scripts.core.common import log
from workflow_scripts.core.datasets import DataNotFound, ImageSource, list_problems, read_image_files, square_resize

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision ImageFolder's
MODES = {1: "L", 3: "RGB"}  # data.channels -> the PIL mode every image is converted to
CONVERTIBLE = ("1", "L", "P", "RGB", "CMYK", "YCbCr")
CSV_HEADER = ["file", "caption"]
SHOWN = 20  # problems named in one error (then the count of the rest)


WHAT = {  # what the folder of each config key holds, for the errors
    "data.root": "the folder of your training images",
    "data.heldout_folder": "the folder of your held-out images",
    "queries.extra": "the folder of your own query images",
}


def channels(data_cfg: dict) -> int:
    return int(data_cfg.get("channels", 3))


def _path(value: str) -> Path:
    return Path(os.path.expanduser(str(value))).absolute()  # absolute: the error names the files wherever the job ran


@dataclass(frozen=True)
class Folder:
    """The image files of one folder: paths relative to `root` (sorted) and their class subfolder names."""

    root: Path
    files: list[str]
    classes: list[str]  # per file: its class subfolder, "" in a flat folder


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def scan(root: Path, key: str, skip: Path | None = None) -> Folder:
    """The image files under root (the folder of config key `key`); `skip` (the captions CSV) may lie inside."""
    if not root.is_dir():
        raise DataNotFound(f"{key} {root}: not a directory ({WHAT.get(key, 'a folder of images')})")
    top = sorted(p for p in root.iterdir() if not p.name.startswith(".") and p != skip)
    subfolders = [p for p in top if p.is_dir()]
    loose = [p for p in top if not p.is_dir()]
    if subfolders and loose:
        raise DataNotFound(
            f"{key} {root} mixes files and subfolders at its top level: hold either image files only (one class) or "
            f"one subfolder per class. " + list_problems("loose", loose, SHOWN)
        )
    # hidden entries at the top (class layout: a flat folder's are met by the walk below)
    hidden = sum(p.name.startswith(".") for p in root.iterdir()) if subfolders else 0
    files, classes, other, empty = [], [], [], []
    for folder in subfolders or [root]:
        found = sorted(p for p in folder.rglob("*") if not p.is_dir() and p != skip)
        kept = []
        for path in found:
            relative = path.relative_to(root)
            if _hidden(relative):
                hidden += 1
            elif path.suffix.lower() not in EXTENSIONS:
                other.append(path)
            else:
                kept.append(relative.as_posix())
        if not kept:
            empty.append(folder)
        files += kept
        classes += [folder.name if subfolders else ""] * len(kept)
    problems = []
    if other:
        problems.append(list_problems("non-image", other, SHOWN) + f" (image extensions: {' '.join(EXTENSIONS)})")
    if empty:
        problems.append(f"no image files in {', '.join(map(str, empty))}")
    if problems:
        raise DataNotFound(f"{key} {root}: " + "; ".join(problems))
    if hidden:
        log.info("data: %s %s: %d hidden files or folders (names starting with '.') left out", key, root, hidden)
    return Folder(root, files, classes)


def image_problem(path: Path, mode: str) -> str | None:
    """Why the image file cannot be used (converted to `mode`), or None. Verified (PIL's structural check) and
    then fully decoded, which finds truncated data verify() does not."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            found, transparent = image.mode, "transparency" in image.info
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for broken files
        return f"{path} (unreadable: {type(exc).__name__}: {exc})"
    if found not in CONVERTIBLE:
        why = "an alpha channel" if "A" in found else "pixels that are not 8-bit"
        return f"{path} (mode {found}: {why}; save it as 8-bit {mode} without transparency)"
    if transparent:
        return f"{path} (mode {found} with a transparent colour; save it as 8-bit {mode} without transparency)"
    return None


def check_images(
    folders: list[Folder],
    mode: str,
    why: str = "data.dataset folder converts every image to mode {mode}, data.channels",
) -> None:
    """Open every image file; raise DataNotFound naming each unusable one (never skipped)."""
    bad = [p for f in folders for p in (image_problem(f.root / name, mode) for name in f.files) if p]
    if bad:
        raise DataNotFound(
            list_problems("unusable image", bad, SHOWN) + f"\n({why.format(mode=mode)}; fix or remove these files)"
        )


def read_captions(path: Path, folder: Folder, key: str) -> list[str]:
    """The caption of each image of the folder (in its file order) from the CSV at path (header file,caption)."""
    if not path.is_file():
        raise DataNotFound(f"{key} {path}: no such file (a CSV with header file,caption)")
    with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a spreadsheet's byte-order mark
        reader = csv.reader(f)
        header = next(reader, None)
        rows = list(enumerate(reader, start=2))
    if header is None or [h.strip() for h in header] != CSV_HEADER:
        raise DataNotFound(f"{key} {path}: the header must be 'file,caption', found {header}")
    known, captions, mentioned, problems = set(folder.files), {}, set(), []
    for number, row in rows:
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        if len(row) != 2:
            problems.append(f"line {number}: {len(row)} fields, expected 2 (file,caption; quote captions with commas)")
            continue
        name, caption = row[0].strip().replace("\\", "/"), row[1].strip()
        mentioned.add(name)
        if name not in known:
            what = "a hidden or non-image file" if (folder.root / name).is_file() else "a missing file"
            problems.append(f"line {number}: {name!r} is {what} (under {folder.root})")
        elif name in captions:
            problems.append(f"line {number}: {name!r} is listed twice")
        elif not caption:
            problems.append(f"line {number}: {name!r} has an empty caption")
        else:
            captions[name] = caption
    uncaptioned = [folder.root / name for name in folder.files if name not in mentioned]
    if uncaptioned:
        problems.append(list_problems("uncaptioned image", uncaptioned, SHOWN) + " (no row in the CSV)")
    if problems:
        raise DataNotFound(f"{key} {path}: " + "; ".join(problems[:SHOWN]) + _more(len(problems)))
    return [captions[name] for name in folder.files]


def _more(n: int) -> str:
    return f"; and {n - SHOWN} more problems" if n > SHOWN else ""


def open_source(data_cfg: dict) -> ImageSource:
    """The folder data set of data_cfg (root, resolution, channels, captions, heldout_folder, heldout_captions),
    every file checked."""
    if not data_cfg.get("root"):
        raise DataNotFound("data.dataset 'folder' needs data.root: the folder of your training images")
    size, mode = int(data_cfg["resolution"]), MODES[channels(data_cfg)]
    csvs = {part: _path(data_cfg[key]) if data_cfg.get(key) else None for part, key in CAPTION_KEYS.items()}
    train = scan(_path(data_cfg["root"]), "data.root", csvs["train"])
    shared = not data_cfg.get("heldout_folder")
    heldout = train if shared else scan(_path(data_cfg["heldout_folder"]), "data.heldout_folder", csvs["heldout"])
    folders = {"train": train, "heldout": heldout}
    class_names = sorted(set(train.classes))
    stray = sorted(set(heldout.classes) - set(class_names))
    if stray:
        raise DataNotFound(
            f"data.heldout_folder {heldout.root}: its classes {_classes(stray)} are not those of data.root "
            f"{train.root} ({_classes(class_names)}); the held-out folder takes the same layout"
        )
    check_images([train] if shared else [train, heldout], mode)
    if csvs["train"] is not None:
        if not shared and csvs["heldout"] is None:
            raise DataNotFound("data.captions is set: the images of data.heldout_folder need data.heldout_captions")
        texts = {"train": read_captions(csvs["train"], train, "data.captions")}
        texts["heldout"] = (
            texts["train"] if shared else read_captions(csvs["heldout"], heldout, "data.heldout_captions")
        )
        table = sorted(set(texts["train"]) | set(texts["heldout"]))
        labels = {part: np.searchsorted(table, texts[part]).astype(np.int64) for part in folders}
        captions, n_classes = np.array(table), len(table)
    else:
        labels = {part: np.searchsorted(class_names, folders[part].classes).astype(np.int64) for part in folders}
        captions, n_classes = None, len(class_names)
    index = {part: np.arange(len(folders[part].files), dtype=np.int64) for part in folders}
    files = {part: np.array(folders[part].files) for part in folders}

    def read(part: str, positions: np.ndarray) -> np.ndarray:
        paths = [folders[part].root / folders[part].files[i] for i in positions]
        return read_image_files(paths, square_resize(size), size, "fix or remove the files named", mode)

    names = {"train": f"folder {train.root} ({len(train.files)} images)"}
    names["heldout"] = (
        f"folder {train.root} after the training draw"
        if shared
        else f"held-out folder {heldout.root} ({len(heldout.files)} images)"
    )
    return ImageSource(labels, index, read, n_classes, names, captions, balanced=False, shared=shared, files=files)


def read_query_folder(queries_cfg: dict, size: int, mode: str) -> dict[str, np.ndarray]:
    """The user's own query images (queries.extra: a folder laid out as data.root, its subfolders only a layout here)
    and their captions (queries.extra_captions, a file,caption CSV as data.captions), each image checked as the
    training folder's and centre-cropped and resized to the data set's `size` in `mode` (L or RGB). Returns files
    (paths relative to the folder, sorted), images (n, C, size, size) in [-1, 1] and, with a CSV, captions."""
    csv_path = _path(queries_cfg["extra_captions"]) if queries_cfg.get("extra_captions") else None
    found = scan(_path(queries_cfg["extra"]), "queries.extra", csv_path)
    check_images([found], mode, "queries.extra: every image is converted to mode {mode}, the training images' mode")
    out = {
        "files": np.array(found.files),
        "images": read_image_files(
            [found.root / name for name in found.files],
            square_resize(size),
            size,
            "fix or remove the files named",
            mode,
        ),
    }
    if csv_path is not None:
        out["captions"] = np.array(read_captions(csv_path, found, "queries.extra_captions"))
    log.info(
        "queries: %d extra query images from %s%s", len(found.files), found.root, " with captions" * bool(csv_path)
    )
    return out


def _classes(names: list[str]) -> str:
    return ", ".join(name or "(no class subfolders)" for name in names)


CAPTION_KEYS = {"train": "captions", "heldout": "heldout_captions"}  # data.<key>: the captions CSV of each part
