"""The gradient-store format: a float array (.npy, memory-mapped when read) and a JSON sidecar that records what
made it and the sha256 of the array's bytes. Writes are atomic; a store is reused only when its sidecar matches, and
read only when it matches what the reader expects and its bytes still have the recorded digest. The store's tag and
directory are dag/paths.py's.
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
    require_finite,
    reserve_space,
    save_json,
)
from workflow_scripts.core.contracts import config_hash

DIGEST_BLOCK_BYTES = 64 * 2**20  # hashed block by block: a memory-mapped store is never read into RAM whole


def checkpoint_hash(payload: dict) -> str:
    """The identity of the checkpoint a store was computed at (made_by['checkpoint']): what trained it and its step."""
    return config_hash({"identity": payload["config"], "step": payload["step"]})


# the configuration keys store_provenance reads: dag/paths.py scores_config adds them to the config of every scores
# job that reads stores, which checks them against the stores' sidecars
PROVENANCE_KEYS = (
    "model",
    "diffusion",
    "gradients.projection",
    "gradients.projection_dim",
    "gradients.sjlt_nonzeros",
    "seeds.gradients",
    "seeds.projection",
)


def store_provenance(config: dict, checkpoint_payload: dict) -> dict:
    """The made_by entries every gradient store of a run shares at one checkpoint: the model, the projector and the
    checkpoint's identity. The gradients stage writes them; the scores stage expects them of every store it reads
    (train and query stores must come from the same projector and checkpoint)."""
    g = config["gradients"]
    made_by = {
        "model": config["model"],
        "diffusion": config["diffusion"],
        "projection": g["projection"],
        "projection_dim": g["projection_dim"],
        "seed_gradients": config["seeds"]["gradients"],
        "seed_projection": config["seeds"]["projection"],
        "checkpoint": checkpoint_hash(checkpoint_payload),
    }
    if g["projection"] == "sjlt":  # only then, so that dense stores keep their hashes
        made_by["sjlt_nonzeros"] = g["sjlt_nonzeros"]
    return made_by


def data_digest(array: np.ndarray) -> str:
    """Full sha256 of the array's bytes in C order (the sidecar's data_sha256)."""
    flat = array.reshape(-1)  # a view for a C-contiguous (memory-mapped) array
    step = max(1, DIGEST_BLOCK_BYTES // max(1, flat.itemsize))
    digest = hashlib.sha256()
    for start in range(0, len(flat), step):
        digest.update(np.ascontiguousarray(flat[start : start + step]).data)
    return digest.hexdigest()


def array_digest(array: np.ndarray) -> str:
    """A short fingerprint of an array's float32 values, to name it in an identity (equal values, equal name);
    the integrity check of a store's bytes is data_digest."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()[:16]


def write_store(features: np.ndarray, identity: dict, path: str | Path) -> None:
    """Atomic write of the .npy store and its .json sidecar (sidecar last, so it vouches for the array)."""
    with new_store(identity, path) as store:
        store[:] = features


@contextlib.contextmanager
def new_store(identity: dict, path: str | Path):
    """A float32 memory map of the identity's shape to fill (e.g. compute_features(out=...)); on success it becomes the
    .npy store (atomic rename, then the sidecar with the array's data_sha256), on an exception the temporary file is
    removed."""
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
        # refused before it becomes the store: NaN features would make every score NaN, far from the cause
        require_finite(store, f"gradient store {path}")
        digest = data_digest(store)  # the pages were just written: still in the page cache
    except BaseException:
        del store
        tmp.unlink(missing_ok=True)
        raise
    del store
    os.replace(tmp, path)
    save_json({**identity, "data_sha256": digest}, sidecar_path(path))


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
    """Memory-map a store, checking its sidecar (and, if given, the identity it must have), then its bytes against
    the sidecar's data_sha256 (one pass over the array; see docs/reliability.md for the cost)."""
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
    check_digest(path, array, sidecar)
    return array


def check_digest(path: Path, array: np.ndarray, sidecar: dict) -> None:
    """The array must still hold the bytes its sidecar vouched for when it was written (a garbled copy, or rows
    edited with the mtime kept, would otherwise be read as features)."""
    want = sidecar.get("data_sha256")
    if want is None:
        raise ArtefactError(
            f"{path}: its sidecar {sidecar_path(path).name} has no data_sha256 (written by an older version of the "
            "workflow), so its contents cannot be checked; delete the store and rerun the gradients job that makes it"
        )
    have = data_digest(array)
    if have != want:
        raise ArtefactError(
            f"{path}: contents changed since it was written (sha256 {have[:16]}..., sidecar data_sha256 "
            f"{want[:16]}...); delete the store and its sidecar and rerun the gradients job that makes it"
        )


def check_provenance(path: str | Path, sidecar: dict, expected: dict) -> None:
    """The sidecar's made_by must have every entry of `expected` (made_by keys; 'checkpoint_step' / 'checkpoint_lr'
    check the sidecar's checkpoint record). Names the first differing field."""
    made_by, checkpoint = sidecar.get("made_by", {}), sidecar.get("checkpoint", {})
    for key, want in expected.items():
        if key.startswith("checkpoint_"):
            field, have = f"checkpoint.{key[len('checkpoint_') :]}", checkpoint.get(key[len("checkpoint_") :])
        else:
            field, have = f"made_by.{key}", made_by.get(key)
        if have != want:
            raise ArtefactError(
                f"{sidecar_path(path)}: {field} is {have!r}, but this run expects {want!r}: the store was made by "
                "another configuration or checkpoint (or its sidecar was edited); delete the store and rerun the "
                "gradients job that makes it"
            )


def reusable(path: Path, identity: dict) -> bool:
    try:
        open_store(path, identity)
    except ArtefactError as exc:
        if path.exists():
            log.info("gradients: recomputing %s (%s)", path, exc)
        return False
    log.info("gradients: reusing %s (config matches)", path)
    return True
