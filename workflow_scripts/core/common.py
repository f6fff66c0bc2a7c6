"""Small helpers shared by every stage: device, threads, seeds, atomic writes, artefact checks.

torch is imported inside the functions that need it, so that the light modules importing this one (the
gradient-store format, the scorer declarations read by the Snakefile) do not load it."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger("workflow_scripts")


class ArtefactError(RuntimeError):
    """An input artefact is missing, corrupt or was made by a different configuration."""


class NonFiniteError(FloatingPointError):
    """A computed value (a training loss, sampled images, measurements, gradients, scores) is NaN or infinite."""


DIVERGED_HINT = "the model probably diverged in training (train.lr too high?)"


def check_training_loss(loss: float, step: int, steps: int, where: str, lr_key: str, lr: float) -> None:
    """Stop training at the first non-finite loss (0-based `step`): everything after it, and every artefact made
    from the model, would be NaN, and fail late with errors that no longer point here."""
    if not np.isfinite(loss):
        raise NonFiniteError(
            f"{where}: the training loss is {loss} at step {step + 1} of {steps}: training diverged. The likely "
            f"cause is a learning rate too high ({lr_key} = {lr:g}); lower it and run again"
        )


def require_finite(values, what: str, hint: str = DIVERGED_HINT, chunk_rows: int = 4096) -> None:
    """Refuse NaN or infinite entries in `values` (an array, or a memory map read row chunk by row chunk), naming
    the artefact `what`, how many entries are bad and the first bad row."""
    values = np.asarray(values) if not isinstance(values, np.ndarray) else values
    if values.dtype.kind not in "fc":
        return
    flat = values.reshape(len(values), -1) if values.ndim > 1 else values.reshape(-1, 1)
    n_bad, first = 0, None
    for start in range(0, len(flat), chunk_rows):
        bad = ~np.isfinite(flat[start : start + chunk_rows])
        if bad.any():
            rows = np.flatnonzero(bad.any(1))
            first = start + int(rows[0]) if first is None else first
            n_bad += int(bad.sum())
    if n_bad:
        where = f"row {first}" if values.ndim > 1 else f"entry {first}"
        raise NonFiniteError(f"{what}: {n_bad} of {values.size} values are NaN or infinite (first in {where}); {hint}")


def setup_logging(log_file: str | None = None) -> None:
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers, force=True
    )


def select_device(compute: dict) -> torch.device:
    """CUDA when present (device: auto), else CPU; 'cuda' without a GPU is an error, not a fallback."""
    import torch

    torch.set_num_threads(compute["threads"])
    wanted = compute["device"]
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("compute.device is 'cuda' but no CUDA device is available")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def generator(*seed_parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded by a tuple of integers (e.g. (base_seed, step)), independent per tuple."""
    import torch

    seed = int(np.random.SeedSequence([int(s) for s in seed_parts]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


def rng(*seed_parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(s) for s in seed_parts]))


class NoSpaceError(OSError):
    """An artefact does not fit on its disk: the message names the file, the bytes it needs and the bytes free."""


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
# posix_fallocate's answers on a file system that cannot preallocate (some network and copy-on-write file systems)
NO_PREALLOCATION = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def no_space(path: str | Path, needed: int | None = None, written: int | None = None) -> NoSpaceError:
    """The error for an artefact that does not fit: which file, how much it needs, how much is free."""
    path = Path(path)
    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    if needed is not None:
        size = f"needs {needed:,} bytes"
    elif written is not None:
        size = f"ran out after {written:,} bytes"
    else:
        size = "does not fit"
    return NoSpaceError(
        errno.ENOSPC,
        f"{path}: no space left on the device ({size}, {free} in {path.parent}); nothing was written. "
        "Free space there (or move results/ to a larger disk) and rerun",
    )


def reserve_space(fd: int, nbytes: int, path: str | Path) -> None:
    """Allocate the first nbytes of the open file fd now, so that a full disk fails here with NoSpaceError naming
    `path` and the size, instead of later in a write deep inside torch, or as a SIGBUS ("Bus error") when a
    memory-mapped page finds no block. A file system that cannot preallocate is left to report ENOSPC on write."""
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in FULL_DISK:
            raise no_space(path, needed=nbytes) from exc
        if exc.errno not in NO_PREALLOCATION:
            raise
        log.debug("%s: the file system cannot preallocate (%s); writing without a reservation", path, exc)


def remove_stale_temps(path: Path) -> None:
    """Temporary files of `path` left by a killed writer (SIGKILL, power loss): they may hold gigabytes."""
    # write_atomically's names (mkstemp), no other file's
    made_by_mkstemp = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    for stale in (p for p in path.parent.glob(f".{path.name}.*.tmp") if made_by_mkstemp.fullmatch(p.name)):
        log.warning("removing %s, left by an interrupted write of %s", stale, path.name)
        stale.unlink(missing_ok=True)


def write_atomically(path: str | Path, write, reserve: int = 0) -> None:
    """Write `path` through a temporary file beside it, renamed into place once complete; on any failure the
    temporary file is removed and the old file (if any) is kept. `reserve`: bytes to allocate up front, for
    writers that open the temporary file "r+b" and truncate it (a full disk then fails before any byte is
    written); a full disk found later is reported as NoSpaceError naming the file too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            reserve_space(fd, reserve, path)
        finally:
            os.close(fd)
        write(tmp)
        # mkstemp creates the file 0600; give the artefact the permissions of any new file (umask), so a
        # shared results directory (cluster, DVC cache) stays readable by the group
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else None
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, NoSpaceError) and exc.errno in FULL_DISK:
            raise no_space(path, needed=reserve or None, written=written) from exc
        raise


def _write_reserved(data):
    """A writer of `data` (bytes-like) into a temporary file write_atomically has reserved len(data) bytes of."""

    def write(tmp):
        with open(tmp, "r+b") as f:  # not "wb": truncating would free the reservation
            f.write(data)
            f.truncate()

    return write


_PLAIN = (str, bytes, int, float, bool, type(None))


def _check_plain(obj, where: str = "payload") -> None:
    """Raise TypeError at the first value load_torch would refuse. Exact types: np.float64 is a float subclass,
    but weights-only loading refuses it."""
    import torch

    if type(obj) in _PLAIN or isinstance(obj, (torch.Tensor, torch.dtype, torch.device)):
        return
    if type(obj) in (dict, OrderedDict):  # a state_dict is an OrderedDict
        for key, value in obj.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(value, f"{where}[{key!r}]")
    elif type(obj) in (list, tuple, torch.Size):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    else:
        raise TypeError(
            f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint holds only tensors and plain "
            "Python values (convert numpy values with .tolist() or torch.from_numpy, paths with str)"
        )


PAYLOAD_DIGEST = "payload_sha256"  # the key of save_torch's content digest in a checkpoint


def payload_digest(obj) -> str:
    """sha256 over a payload's structure, plain values and tensor bytes, in order. torch.load does not check the
    tensor data it reads (a few garbled bytes load as other weights, often NaN), so save_torch records this digest
    and load_torch compares it."""
    import hashlib

    import torch

    digest = hashlib.sha256()

    def walk(value, where: str) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{where}:{value.dtype}:{list(value.shape)}|".encode())
            digest.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
        elif isinstance(value, dict):
            digest.update(f"{where}:dict{len(value)}|".encode())
            for key, item in value.items():
                walk(item, f"{where}[{key!r}]")
        elif isinstance(value, (list, tuple)):
            digest.update(f"{where}:{type(value).__name__}{len(value)}|".encode())
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")
        else:
            digest.update(f"{where}={value!r}|".encode())

    walk(obj, "")
    return digest.hexdigest()


def save_torch(obj: dict, path: str | Path) -> None:
    """Atomic torch.save of a payload that load_torch can read: a dict of tensors in dicts, lists and tuples of plain
    Python values (no numpy objects, paths or custom classes, which weights-only loading refuses). Checked before
    writing, so that a wrong value fails where it is saved, not hours later where it is loaded. The payload's digest
    (payload_digest) is stored with it under PAYLOAD_DIGEST."""
    import torch

    if type(obj) not in (dict, OrderedDict):
        raise TypeError(f"a checkpoint payload is a dict, not a {type(obj).__qualname__}")
    if PAYLOAD_DIGEST in obj:
        raise ValueError(f"{PAYLOAD_DIGEST!r} is the key of the checkpoint's own digest; name the entry otherwise")
    _check_plain(obj)
    obj = {**obj, PAYLOAD_DIGEST: payload_digest(obj)}
    # serialised in memory first (briefly twice the payload in RAM): the exact size is then known, reserved on
    # disk before writing, and a full disk is a NoSpaceError naming the file, not a torch "file write failed".
    # Given a file object, torch.save names the archive inside it "archive"; given a path, after the random
    # temp name, and the same weights would give other bytes at every write.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    write_atomically(path, _write_reserved(data), reserve=len(data))


NPY_OVERHEAD = 4096  # bytes reserved beyond an array's data: its .npy header (and, in an .npz, its zip entry)


def _write_numpy(save):
    """A writer that calls save(file) on a temporary file write_atomically has reserved space in (the array's bytes plus
    NPY_OVERHEAD; not buffered in memory: score matrices can be large), then drops what the reservation left over."""

    def write(tmp):
        with open(tmp, "r+b") as f:
            save(f)
            f.truncate()

    return write


def save_npy(array: np.ndarray, path: str | Path) -> None:
    array = np.asanyarray(array)
    write_atomically(path, _write_numpy(lambda f: np.save(f, array)), reserve=array.nbytes + NPY_OVERHEAD)


def save_npz(path: str | Path, **arrays) -> None:
    size = sum(np.asanyarray(a).nbytes + NPY_OVERHEAD for a in arrays.values()) + NPY_OVERHEAD
    write_atomically(path, _write_numpy(lambda f: np.savez(f, **arrays)), reserve=size)


def save_json(obj, path: str | Path) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def save_text(text: str, path: str | Path) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def _unreadable(path: Path, what: str, exc: Exception, rule: str) -> ArtefactError:
    return ArtefactError(
        f"{path}: {what} cannot be read ({type(exc).__name__}: {exc}); it is truncated or corrupt. "
        f"Delete it and run snakemake again: rule {rule} remakes it"
    )


def load_json(path: str | Path, rule: str) -> dict:
    """A JSON artefact (a sidecar, chosen.json, ...); a missing, truncated or garbled file is an ArtefactError naming
    it and the rule that makes it."""
    path = Path(path)
    if not path.exists():
        raise ArtefactError(f"{path}: missing (rule {rule} makes it)")
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _unreadable(path, "JSON file", exc, rule) from exc
    if not isinstance(value, dict):
        raise _unreadable(path, "JSON file", TypeError(f"holds a {type(value).__name__}, not an object"), rule)
    return value


def load_npy(path: str | Path, rule: str, mmap_mode: str | None = None) -> np.ndarray:
    """An .npy artefact (a score matrix, a gradient store with mmap_mode="r"); a missing, truncated or garbled file
    is an ArtefactError naming it and the rule that makes it."""
    path = Path(path)
    if not path.exists():
        raise ArtefactError(f"{path}: missing (rule {rule} makes it)")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # header, size or pickle errors of a truncated file
        raise _unreadable(path, "array file", exc, rule) from exc


def load_npz(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise ArtefactError(f"{path}: missing (run the workflow stage that makes it)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # zip/pickle errors of a truncated file
        raise ArtefactError(f"{path}: cannot be read ({exc}); delete it and rerun") from exc
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ArtefactError(f"{path}: lacks arrays {missing}")
    return arrays


def load_torch(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint of save_torch, loaded weights-only: unpickling arbitrary objects would run whatever code a
    crafted file names, so a file holding anything but tensors and plain Python values is refused. Its contents must
    match the digest save_torch stored (returned without it)."""
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise ArtefactError(f"{path}: missing (run the workflow stage that makes it)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"it holds {found.group(1)}" if found else "it holds more than tensors and plain values"
        raise ArtefactError(
            f"{path}: not a plain tensor checkpoint ({what}, which loading would have to run code to rebuild); "
            "refused. A checkpoint of an older version of the workflow can hold numpy values: delete it and rerun "
            "the stage that makes it"
        ) from exc
    except Exception as exc:
        raise ArtefactError(f"{path}: corrupt checkpoint ({exc}); delete it and rerun") from exc
    want = payload.pop(PAYLOAD_DIGEST, None) if isinstance(payload, dict) else None
    if want is None:
        raise ArtefactError(
            f"{path}: the checkpoint has no {PAYLOAD_DIGEST} (written by an older version of the workflow), so its "
            "contents cannot be checked; delete it and rerun the stage that makes it"
        )
    if payload_digest(payload) != want:
        raise ArtefactError(
            f"{path}: the checkpoint's contents do not match its {PAYLOAD_DIGEST} (garbled bytes in a copy or on "
            "disk); delete it and rerun the stage that makes it"
        )
    return payload


def load_resume_state(path: str | Path, identity: dict) -> dict | None:
    """The resumable training state at `path` when it exists and was saved by this training (`identity`), else None.

    A file that cannot be loaded (truncated by a kill during a copy, garbled, not weights-only) is deleted with a
    warning rather than raised: it is only a shortcut, and the training restarted from step 0 ends with the same
    model, while an error would fail the job at every rerun until someone deleted the file."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = load_torch(path)
    except ArtefactError as exc:
        log.warning("discarding resume file %s, training restarts from step 0: %s", path, exc)
        path.unlink(missing_ok=True)
        return None
    if not isinstance(state, dict) or state.get("identity") != identity:
        log.warning("ignoring %s: made by a different configuration", path)
        return None
    return state


class TrainingResume:
    """The resume file `<model stem>.resume.pt` of one training: restored at the start, saved every
    train.resume_every steps, removed when the model is written. One home for what a family's training loop does
    with it (model weights, optimizer, schedule and, with loss scaling, the scaler's state)."""

    def __init__(self, model_out: str | Path, identity: dict):
        model_out = Path(model_out)
        self.path, self.identity = model_out.with_name(model_out.stem + ".resume.pt"), identity

    def restore(self, model, optimizer, schedule, scaler=None, strict: bool = True) -> int:
        """Load a saved state of this training into the objects; returns the step to continue from (0: none).
        strict=False for a model whose saved weights are a subset (LoRA adapters on a frozen base)."""
        state = load_resume_state(self.path, self.identity)
        if state is None:
            return 0
        model.load_state_dict(state["model"], strict=strict)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        log.info("resuming %s from step %d", self.path, state["step"])
        return state["step"]

    def save(self, step: int, model_state: dict, optimizer, schedule, scaler=None) -> None:
        state = {
            "identity": self.identity,
            "model": model_state,
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "step": step,
        }
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        save_torch(state, self.path)

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
