"""A full disk: the gradient store (a memory map) and the atomic writes (checkpoints, arrays) fail with an error
naming the file and the bytes it needs, and leave no temporary file behind.

Each fault is tried twice: on a real 1 MiB tmpfs the test mounts (skipped, with the reason, where mounting is not
allowed), and with posix_fallocate made to answer ENOSPC (runs everywhere)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from workflow_scripts.core import common
from workflow_scripts.core.common import NoSpaceError, save_json, save_npy, save_npz, save_torch
from workflow_scripts.core.store import new_store, write_store

BIG = 4 * 2**20  # bytes: more than the 1 MiB disk


def identity(n_bytes: int) -> dict:
    return {"split": "train", "shape": [n_bytes // 4 // 64, 64], "dtype": "float32", "config_hash": "x"}


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted for this test (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        reason = "no mount command"
    else:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
        )
        reason = None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")
    if reason:
        print(f"cannot mount a 1 MiB tmpfs: {reason}")
        pytest.skip(f"cannot mount a 1 MiB tmpfs ({reason}); the simulated-ENOSPC tests cover the code path")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def enospc(monkeypatch):
    """posix_fallocate answering "No space left on device", as on a full disk."""

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)


def everything_in(directory) -> list[str]:
    return sorted(p.name for p in directory.rglob("*"))  # hidden temporary files included


def assert_names_file_and_size(info, path, needed: int | None = None):
    message = str(info.value)
    assert str(path) in message, message
    assert "no space left" in message and "bytes free" in message, message
    if needed is not None:  # the data and the .npy header
        found = re.search(r"needs ([\d,]+) bytes", message)
        assert found and needed <= int(found.group(1).replace(",", "")) <= needed + 4096, message
    assert info.value.errno == errno.ENOSPC


# ------------------------------------------------------------------------------------------- gradient store
def test_store_on_a_full_disk_is_an_error_naming_it_and_leaves_nothing(small_disk):
    path = small_disk / "gradients" / "train.npy"
    with pytest.raises(NoSpaceError) as info:
        with new_store(identity(BIG), path) as store:
            store[:] = 1.0  # without the reservation: SIGBUS here, and the process dies
    assert_names_file_and_size(info, path, BIG)
    assert everything_in(small_disk / "gradients") == []
    assert shutil.disk_usage(small_disk).used < 2**16  # the temporary file's blocks are released


def test_store_that_fits_is_written_on_the_small_disk(small_disk):
    features = np.arange(2048, dtype=np.float32).reshape(32, 64)
    path = small_disk / "train.npy"
    write_store(features, identity(features.nbytes), path)
    np.testing.assert_array_equal(np.load(path), features)
    assert everything_in(small_disk) == ["train.json", "train.npy"]


def test_store_simulated_enospc_is_an_error_naming_it(tmp_path, enospc):
    path = tmp_path / "train.npy"
    with pytest.raises(NoSpaceError) as info:
        with new_store(identity(BIG), path):
            pytest.fail("the store must not be handed out without its space")
    assert_names_file_and_size(info, path, BIG)
    assert everything_in(tmp_path) == []


def test_stale_store_temp_of_a_killed_run_is_replaced(tmp_path):
    stale = tmp_path / ".train.npy.tmp"
    stale.write_bytes(b"\0" * 1000)  # what a SIGKILL during the gradients stage leaves
    write_store(np.ones((4, 64), np.float32), identity(4 * 64 * 4), tmp_path / "train.npy")
    assert everything_in(tmp_path) == ["train.json", "train.npy"]


def test_file_system_without_preallocation_still_writes(tmp_path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    write_store(np.ones((4, 64), np.float32), identity(4 * 64 * 4), tmp_path / "train.npy")
    save_torch({"w": torch.ones(3)}, tmp_path / "model.pt")
    assert everything_in(tmp_path) == ["model.pt", "train.json", "train.npy"]


# ------------------------------------------------------------------------------- checkpoints and arrays
def test_checkpoint_on_a_full_disk_is_an_error_naming_it_and_leaves_nothing(small_disk):
    path = small_disk / "models" / "full.pt"
    with pytest.raises(NoSpaceError) as info:
        save_torch({"weights": torch.zeros(BIG // 4)}, path)
    assert_names_file_and_size(info, path)
    assert everything_in(small_disk / "models") == []


def test_old_checkpoint_survives_a_full_disk(small_disk):
    path = small_disk / "full.pt"
    save_torch({"step": 1, "weights": torch.ones(8)}, path)
    with pytest.raises(NoSpaceError):
        save_torch({"step": 2, "weights": torch.zeros(BIG // 4)}, path)
    assert common.load_torch(path)["step"] == 1
    assert everything_in(small_disk) == ["full.pt"]


@pytest.mark.parametrize("kind", ["torch", "npy", "npz"])
def test_simulated_enospc_names_the_file_and_leaves_no_temp(tmp_path, enospc, kind):
    path = tmp_path / f"artefact.{kind}"
    with pytest.raises(NoSpaceError) as info:
        if kind == "torch":
            save_torch({"weights": torch.zeros(1000)}, path)
        elif kind == "npy":
            save_npy(np.zeros(1000), path)
        else:
            save_npz(path, a=np.zeros(1000))
    assert_names_file_and_size(info, path)
    assert everything_in(tmp_path) == []


def test_enospc_during_a_write_is_named_too(tmp_path, monkeypatch):
    """A file system that accepts the reservation but fails a later write (e.g. a quota on a network disk)."""
    real_write_text = Path.write_text

    def fills_the_disk(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2])  # half written, then the quota is reached
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(Path, "write_text", fills_the_disk)
    path = tmp_path / "chosen.json"
    with pytest.raises(NoSpaceError) as info:
        save_json({"lambda": 1.0}, path)
    assert_names_file_and_size(info, path)
    monkeypatch.undo()
    assert everything_in(tmp_path) == []


def test_stale_temps_of_a_killed_writer_are_removed(tmp_path):
    stale = tmp_path / ".full.pt.k3x9_q2a.tmp"  # a temporary name of write_atomically (mkstemp)
    stale.write_bytes(b"\0" * 100)
    others = [".other.pt.k3x9_q2a.tmp", ".full.pt.resume.k3x9_q2a.tmp"]  # other artefacts' temporary files
    for name in others:
        (tmp_path / name).write_bytes(b"\0")
    save_torch({"w": torch.ones(2)}, tmp_path / "full.pt")
    assert everything_in(tmp_path) == sorted([*others, "full.pt"])


def test_training_resume_file_on_a_full_disk_names_it(small_disk):
    """What a training's periodic save does on a full disk: the resume file is named, nothing is left behind."""
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights, 8 MiB more of Adam state after a step
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 1024)).sum().backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    resume = common.TrainingResume(small_disk / "models" / "full.pt", {"config": "x"})
    with pytest.raises(NoSpaceError) as info:
        resume.save(1, model.state_dict(), optimizer, schedule)
    assert_names_file_and_size(info, small_disk / "models" / "full.resume.pt")
    assert everything_in(small_disk / "models") == []


def test_sweep_figure_on_a_full_disk_names_it_and_leaves_nothing(tmp_path, monkeypatch):
    import matplotlib.figure
    import pandas as pd

    from workflow_scripts.stages.scores import plot_sweep

    def fills_the_disk(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fills_the_disk)
    table = pd.DataFrame(
        [{"lambda": lam, "query_set": "generated", "lds_tuning": 0.1, "lds_evaluation": 0.2} for lam in (0.1, 1.0)]
    )
    path = tmp_path / "scores" / "trak" / "sweep.png"
    with pytest.raises(NoSpaceError) as info:
        plot_sweep(table, 0.1, "trak", path)
    assert_names_file_and_size(info, path)
    assert everything_in(path.parent) == []
