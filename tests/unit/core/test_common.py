"""Atomic artefact writes (workflow_scripts.common)."""

import os
import stat

import numpy as np
import pytest

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
        common._atomic(tmp_path / "t.txt", boom)
    assert (tmp_path / "t.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]
