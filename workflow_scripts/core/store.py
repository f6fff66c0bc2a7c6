"""The gradient-store format: a float array (.npy, memory-mapped when read) and a JSON sidecar that records what
made it. Writes are atomic; a store is reused only when its sidecar matches, and read only when it matches what
the reader expects. The store's tag and directory are dag/paths.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np

from workflow_scripts.core.common import (
    FULL_DISK,
    ArtefactError,
    NoSpaceError,
    load_json,
    load_npy,
    log,
    no_space,
    reserve_space,
    save_json,
)


def array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()[:16]


def write_store(features: np.ndarray, identity: dict, path: str | Path) -> None:
    """Atomic write of the .npy store and its .json sidecar (sidecar last, so it vouches for the array)."""
    with new_store(identity, path) as store:
        store[:] = features


@contextlib.contextmanager
def new_store(identity: dict, path: str | Path):
    """A float32 memory map of the identity's shape to fill (e.g. compute_features(out=...)); on success it becomes the
    .npy store (atomic rename, then the sidecar), on an exception the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # "w+" below truncates one left by a killed run
    shape = tuple(identity["shape"])
    try:
        store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        # the memory map is a sparse file: without the blocks reserved now, a full disk would surface as a SIGBUS
        # ("Bus error", no file named, the temporary file left behind) at the first page that finds no block
        with open(tmp, "r+b") as f:
            reserve_space(f.fileno(), os.fstat(f.fileno()).st_size, path)
    except BaseException as exc:
        store = None
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, NoSpaceError) and exc.errno in FULL_DISK:
            raise no_space(path, needed=int(np.prod(shape)) * 4) from exc
        raise
    try:
        yield store
        store.flush()
    except BaseException:
        del store
        tmp.unlink(missing_ok=True)
        raise
    del store
    os.replace(tmp, path)
    save_json(identity, sidecar_path(path))


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def store_rule(path: str | Path) -> str:
    """The rule that makes a store (for the advice in errors): gradients/<checkpoint>/<tag>/[measurement_<m>/]."""
    path = Path(path)
    if path.parent.name.startswith("measurement_"):
        return "gradients_measurement"
    return "gradients_journey" if "_journey_" in path.parent.name else "gradients"


SIDECAR_KEYS = ("split", "shape", "dtype", "config_hash")


def read_sidecar(path: str | Path) -> dict:
    path, side = Path(path), sidecar_path(path)
    if not path.exists() or not side.exists():
        raise ArtefactError(
            f"{path}: gradient store or its sidecar {side.name} is missing (rule {store_rule(path)} makes them)"
        )
    sidecar = load_json(side, store_rule(path))
    missing = [key for key in SIDECAR_KEYS if key not in sidecar]
    if missing:
        raise ArtefactError(
            f"{side}: sidecar lacks {missing}; delete it and its store {path.name} and run snakemake again: "
            f"rule {store_rule(path)} remakes them"
        )
    return sidecar


def open_store(path: str | Path, expected: dict | None = None) -> np.ndarray:
    """Memory-map a store, checking its sidecar (and, if given, the identity it must have)."""
    sidecar = read_sidecar(path)
    array = load_npy(path, store_rule(path), mmap_mode="r")
    if list(array.shape) != sidecar["shape"] or str(array.dtype) != sidecar["dtype"]:
        raise ArtefactError(
            f"{path}: array is {array.dtype}{list(array.shape)}, sidecar says {sidecar['dtype']}{sidecar['shape']}; "
            f"delete both and run snakemake again: rule {store_rule(path)} remakes them"
        )
    if expected is not None:
        for key in ("split", "shape", "config_hash"):
            if sidecar[key] != expected[key]:
                have, want = sidecar.get("made_by", {}), expected["made_by"]
                diff = [k for k in sorted({*have, *want}) if have.get(k) != want.get(k)]
                raise ArtefactError(
                    f"{path}: store {key} is {sidecar[key]}, config expects {expected[key]}"
                    + (f" (differs in {', '.join(diff)})" if diff else "")
                )
    return array


def reusable(path: Path, identity: dict) -> bool:
    try:
        open_store(path, identity)
    except ArtefactError as exc:
        if path.exists():
            log.info("gradients: recomputing %s (%s)", path, exc)
        return False
    log.info("gradients: reusing %s (config matches)", path)
    return True
