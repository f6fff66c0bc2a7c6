"""Atomic artefact writes (workflow_scripts.common)."""

import logging
import os
import pickle
import shlex
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from workflow_scripts.core import common


def test_atomic_write_has_umask_permissions_and_leaves_no_temp(tmp_path):
    old = os.umask(0o022)
    try:
        common.save_npy(np.arange(3), tmp_path / "a.npy")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.npy").stat().st_mode) == 0o644  # not mkstemp's 0600
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_failed_write_keeps_the_old_file(tmp_path):
    common.save_text("old", tmp_path / "t.txt")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        common.write_atomically(tmp_path / "t.txt", boom)
    assert (tmp_path / "t.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


# ---------------------------------------------------------------- checkpoints (save_torch / load_torch)


class _RunsCommand:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("container", ["pickle", "torch-archive"])
def test_crafted_pickle_is_refused_without_running_its_code(tmp_path, container):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    if container == "pickle":
        evil.write_bytes(pickle.dumps(_RunsCommand(marker)))
    else:  # inside a real torch archive, next to genuine tensors
        torch.save({"state_dict": {"w": torch.zeros(3)}, "extra": _RunsCommand(marker)}, evil)
    with pytest.raises(common.ArtefactError, match=r"evil\.pt: not a plain tensor checkpoint"):
        common.load_torch(evil)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_RunsCommand(marker)))  # the payload is live: unpickled, it does create the marker
    assert marker.exists()


def test_checkpoint_with_numpy_values_asks_for_a_rerun(tmp_path):
    # what a checkpoint written before loading became weights-only could hold
    path = tmp_path / "old.pt"
    torch.save({"lr": np.float64(0.1), "members": np.arange(3)}, path)
    with pytest.raises(common.ArtefactError, match=r"old\.pt: not a plain tensor checkpoint \(it holds numpy.*rerun"):
        common.load_torch(path)


@pytest.mark.parametrize(
    ("value", "named"),
    [(np.float64(0.1), r"numpy\.float64"), (np.arange(3), r"numpy\.ndarray"), (Path("x"), r"pathlib.*Path")],
)
def test_save_torch_refuses_what_loading_would_refuse(tmp_path, value, named):
    with pytest.raises(TypeError, match=rf"payload\['config'\]\['train'\]\[1\] is a {named}"):
        common.save_torch({"config": {"train": [1, value]}}, tmp_path / "m.pt")
    assert not any(tmp_path.iterdir())  # nothing written


def test_identical_payloads_give_identical_bytes(tmp_path):
    payload = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "config": {"lr": 0.1, "name": "x"}, "step": 3}
    common.save_torch(payload, tmp_path / "a" / "model.pt")
    common.save_torch(payload, tmp_path / "b" / "other.pt")
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "other.pt").read_bytes()
    loaded = common.load_torch(tmp_path / "b" / "other.pt")
    assert torch.equal(loaded["state_dict"]["w"], payload["state_dict"]["w"]) and loaded["config"] == payload["config"]


def test_load_resume_state(tmp_path, caplog):
    identity = {"seed": 1, "members_sha256": "ab"}
    path = tmp_path / "model.resume.pt"
    assert common.load_resume_state(path, identity) is None  # none saved yet
    common.save_torch({"identity": identity, "step": 4}, path)
    assert common.load_resume_state(path, identity)["step"] == 4
    with caplog.at_level(logging.WARNING, logger="workflow_scripts"):
        assert common.load_resume_state(path, {**identity, "seed": 2}) is None
    assert "different configuration" in caplog.text and path.exists()  # another training's state is left alone

    # an unreadable one (here a crafted pickle) is discarded with a warning naming it, its code not run
    marker = tmp_path / "marker"
    path.write_bytes(pickle.dumps(_RunsCommand(marker)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="workflow_scripts"):
        assert common.load_resume_state(path, identity) is None
    assert f"discarding resume file {path}" in caplog.text
    assert not path.exists() and not marker.exists()


def _garble_tensor_bytes(path: Path, tensor: torch.Tensor, n: int = 64) -> None:
    """Overwrite n bytes inside the stored data of `tensor` (located by its raw bytes), keeping the file's mtime:
    a bad copy or a failing disk, not a rewrite."""
    data, raw = bytearray(path.read_bytes()), tensor.numpy().tobytes()
    start = data.index(raw) + len(raw) // 2
    data[start : start + n] = bytes(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8))
    stamp = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def test_garbled_tensor_bytes_are_refused_naming_the_file(tmp_path):
    weights = torch.linspace(-1.0, 1.0, 256)
    path = tmp_path / "model.pt"
    common.save_torch({"state_dict": {"w": weights}, "config": {"seed": 1}, "step": 20}, path)
    assert torch.equal(common.load_torch(path)["state_dict"]["w"], weights)
    _garble_tensor_bytes(path, weights)
    # torch itself reads the garbled weights without complaint: the fault this guards against
    garbled = torch.load(path, weights_only=True)["state_dict"]["w"]
    assert not torch.equal(garbled, weights)
    with pytest.raises(
        common.ArtefactError, match=r"model\.pt: the checkpoint's contents do not match its payload_sha256"
    ):
        common.load_torch(path)


def test_edited_plain_value_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    common.save_torch({"state_dict": {"w": torch.zeros(3)}, "step": 20, "lr": 0.125}, path)
    payload = torch.load(path, weights_only=True)
    payload["lr"] = 0.25  # e.g. an edited learning rate, which TracInCP weights checkpoints by
    torch.save(payload, path)
    with pytest.raises(common.ArtefactError, match=r"model\.pt: .*do not match its payload_sha256"):
        common.load_torch(path)


def test_checkpoint_without_digest_asks_for_a_rerun(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "step": 1}, path)  # as written before digests
    with pytest.raises(common.ArtefactError, match=r"old\.pt: the checkpoint has no payload_sha256.*rerun"):
        common.load_torch(path)


def test_garbled_resume_state_restarts_training(tmp_path, caplog):
    """A resume file whose weights were garbled is discarded like a truncated one (not resumed from)."""
    identity = {"seed": 1}
    path = tmp_path / "model.resume.pt"
    weights = torch.linspace(0.0, 1.0, 256)
    common.save_torch({"identity": identity, "model": {"w": weights}, "step": 5}, path)
    _garble_tensor_bytes(path, weights)
    with caplog.at_level(logging.WARNING, logger="workflow_scripts"):
        assert common.load_resume_state(path, identity) is None
    assert "payload_sha256" in caplog.text and not path.exists()
