"""Small helpers shared by every stage: device, threads, seeds, atomic writes, artefact checks.

torch is imported inside the four functions that need it, so that the light modules importing this one (the
gradient-store format, the scorer declarations read by the Snakefile) do not load it."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger("workflow_scripts")


class ArtefactError(RuntimeError):
    """An input artefact is missing, corrupt or was made by a different configuration."""


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


def _atomic(path: str | Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file 0600; give the artefact the permissions of any new file (umask), so a
        # shared results directory (cluster, DVC cache) stays readable by the group
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_torch(obj, path: str | Path) -> None:
    import torch

    _atomic(path, lambda tmp: torch.save(obj, tmp))


def save_npy(array: np.ndarray, path: str | Path) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    _atomic(path, write)


def save_npz(path: str | Path, **arrays) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    _atomic(path, write)


def save_json(obj, path: str | Path) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def save_text(text: str, path: str | Path) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


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
    import torch

    path = Path(path)
    if not path.exists():
        raise ArtefactError(f"{path}: missing (run the workflow stage that makes it)")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise ArtefactError(f"{path}: corrupt checkpoint ({exc}); delete it and rerun") from exc
