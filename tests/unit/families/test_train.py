"""Unit tests of workflow_scripts.families.ddpm (resume determinism, checkpoints, data order), plus
measure.load_targets and common.load_torch error handling."""

import copy
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from workflow_scripts.core import data, seeds
from workflow_scripts.core.common import ArtefactError, load_torch, save_npz, save_torch
from workflow_scripts.families import ddpm as train
from workflow_scripts.families.ddpm import load_model
from workflow_scripts.families.likelihood import load_targets
from workflow_scripts.stages import train as train_mod

torch.set_num_threads(1)
CPU = torch.device("cpu")
STEPS, RESUME_EVERY = 12, 4


@pytest.fixture(scope="module")
def config(smoke_config):
    cfg = copy.deepcopy(smoke_config)
    cfg["train"].update(steps=STEPS, resume_every=RESUME_EVERY, batch_size=8, checkpoint_every=4)
    cfg["compute"].update(device="cpu", threads=1)
    return cfg


@pytest.fixture(scope="module")
def images():
    return data.load_digits_images()[0][:32]


MEMBERS = np.arange(1, 32, 2)  # 16 of the 32 images: 2 steps per epoch with batch 8


@pytest.fixture(scope="module")
def uninterrupted(config, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "model.pt"
    ckpts = {4: str(out.with_name("step4.pt")), 8: str(out.with_name("step8.pt"))}
    assert train.train_model(config, images, MEMBERS, 0, out, checkpoint_paths=ckpts, device=CPU) == out
    return out, ckpts


def _state(path):
    return load_torch(path)["state_dict"]


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_reproduces_uninterrupted_run(config, images, uninterrupted, tmp_path, caplog):
    full_out, full_ckpts = uninterrupted
    out = tmp_path / "model.pt"
    resume = tmp_path / "model.resume.pt"
    ckpts = {4: str(tmp_path / "step4.pt"), 8: str(tmp_path / "step8.pt")}

    assert train.train_model(config, images, MEMBERS, 0, out, checkpoint_paths=ckpts, device=CPU, stop_after=7) is None
    assert not out.exists()
    assert resume.exists() and load_torch(resume)["step"] == 4  # the last multiple of resume_every before 7
    assert (tmp_path / "step4.pt").exists() and not (tmp_path / "step8.pt").exists()

    with caplog.at_level(logging.INFO, logger="workflow_scripts"):
        assert train.train_model(config, images, MEMBERS, 0, out, checkpoint_paths=ckpts, device=CPU) == out
    assert any("from step 4" in r.getMessage() for r in caplog.records)  # really resumed, not restarted
    assert out.exists()
    assert not resume.exists()  # removed once training has finished
    _assert_same_state(_state(out), _state(full_out))
    _assert_same_state(_state(ckpts[8]), _state(full_ckpts[8]))
    _assert_same_state(_state(ckpts[4]), _state(full_ckpts[4]))
    # and byte for byte: the same weights make the same file, wherever and whenever it was written
    assert out.read_bytes() == full_out.read_bytes()
    assert all(Path(ckpts[s]).read_bytes() == Path(full_ckpts[s]).read_bytes() for s in ckpts)


def test_training_changes_the_model_and_is_seeded(config, images, uninterrupted, tmp_path):
    full_out, _ = uninterrupted
    final, step4 = _state(full_out), _state(uninterrupted[1][4])
    assert any(not torch.equal(final[k], step4[k]) for k in final)
    # another replicate (seed) gives another model
    other = train.train_model(config, images, MEMBERS, 1, tmp_path / "other.pt", device=CPU)
    assert any(not torch.equal(final[k], v) for k, v in _state(other).items())


def test_resume_file_of_other_configuration_is_ignored(config, images, uninterrupted, tmp_path, caplog):
    full_out, _ = uninterrupted
    other = copy.deepcopy(config)
    other["train"]["lr"] = config["train"]["lr"] * 3
    out = tmp_path / "model.pt"
    train.train_model(other, images, MEMBERS, 0, out, device=CPU, stop_after=5)
    assert (tmp_path / "model.resume.pt").exists()
    with caplog.at_level(logging.WARNING, logger="workflow_scripts"):
        train.train_model(config, images, MEMBERS, 0, out, device=CPU)
    assert any("different configuration" in r.getMessage() for r in caplog.records)
    _assert_same_state(_state(out), _state(full_out))
    assert out.read_bytes() == full_out.read_bytes()  # two trainings from scratch: byte-identical model files


def test_corrupt_resume_file_is_discarded_and_training_restarts(config, images, uninterrupted, tmp_path, caplog):
    full_out, _ = uninterrupted
    out, resume = tmp_path / "model.pt", tmp_path / "model.resume.pt"
    train.train_model(config, images, MEMBERS, 0, out, device=CPU, stop_after=5)
    resume.write_bytes(resume.read_bytes()[: resume.stat().st_size // 2])  # as a kill during a copy leaves it
    with caplog.at_level(logging.INFO, logger="workflow_scripts"):
        assert train.train_model(config, images, MEMBERS, 0, out, device=CPU) == out
    assert any(r.levelno == logging.WARNING and str(resume) in r.getMessage() for r in caplog.records)
    assert not any("resuming" in r.getMessage() for r in caplog.records)  # restarted from step 0
    assert out.read_bytes() == full_out.read_bytes() and not resume.exists()


def test_unit_weights_equal_ordinary_training(config, images, uninterrupted, tmp_path):
    out = train.train_model(config, images, MEMBERS, 0, tmp_path / "w.pt", weights=np.ones(len(images)), device=CPU)
    _assert_same_state(_state(out), _state(uninterrupted[0]))


def _expected_lr(config, done):
    """Cosine schedule with linear warm-up: the lr used by the optimizer step that produced step `done`."""
    base, steps = config["train"]["lr"], config["train"]["steps"]
    warmup = int(config["train"]["warmup_fraction"] * steps)
    s = done - 1
    if s < warmup:
        return base * s / max(1, warmup)
    return base * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))


def test_intermediate_checkpoints_record_step_and_lr(config, uninterrupted):
    full_out, ckpts = uninterrupted
    for step, path in ckpts.items():
        payload = load_torch(path)
        assert payload["kind"] == "ddpm-unet" and payload["step"] == step
        assert payload["lr"] == pytest.approx(_expected_lr(config, step), rel=1e-9)
        assert payload["config"]["n_members"] == len(MEMBERS)
        assert payload["config"]["seed"] == config["seeds"]["train"]
        model, loaded = load_model(path, config["model"])
        assert loaded["image_shape"] == (1, 8, 8)
    assert load_torch(ckpts[4])["lr"] > load_torch(ckpts[8])["lr"]  # decaying after warm-up
    final = load_torch(full_out)
    assert final["step"] == STEPS


def test_checkpoint_step_parsing():
    assert train_mod.checkpoint_step("results/x/ckpt_step250.pt") == 250
    with pytest.raises(ValueError, match="step<N>"):
        train_mod.checkpoint_step("results/x/final.pt")


# ---------------------------------------------------------------- data order


def test_batch_indices_each_member_once_per_epoch():
    members = np.arange(100, 124)  # 24 members, batch 8: 3 steps per epoch
    epochs = []
    for epoch in range(3):
        batches = [seeds.batch_indices(members, 8, seed=5, step=epoch * 3 + k) for k in range(3)]
        assert all(len(b) == 8 for b in batches)
        order = np.concatenate(batches)
        np.testing.assert_array_equal(np.sort(order), members)
        epochs.append(order)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    np.testing.assert_array_equal(seeds.batch_indices(members, 8, 5, 4), seeds.batch_indices(members, 8, 5, 4))
    assert not np.array_equal(seeds.batch_indices(members, 8, 5, 0), seeds.batch_indices(members, 8, 6, 0))


def test_batch_indices_incomplete_last_batch_is_dropped():
    members = np.arange(30)  # 30 members, batch 8: 3 full batches per epoch, 6 members skipped
    for epoch in range(2):
        order = np.concatenate([seeds.batch_indices(members, 8, 0, epoch * 3 + k) for k in range(3)])
        assert len(order) == 24 and len(np.unique(order)) == 24
        assert set(order.tolist()) <= set(members.tolist())


def test_batch_indices_batch_larger_than_members():
    members = np.array([3, 9, 4])
    for step in range(3):
        np.testing.assert_array_equal(np.sort(seeds.batch_indices(members, 64, 0, step)), np.sort(members))


# ---------------------------------------------------------------- measure.load_targets


def _write_measurements(tmp_path, order, n_queries=3):
    paths = []
    for k, (subset, replicate) in enumerate(order):
        path = tmp_path / f"m{k}.npz"
        value = 10 * subset + replicate
        save_npz(
            path,
            subset=np.array(subset),
            replicate=np.array(replicate),
            generated=np.full(n_queries, value, float),
            heldout=np.full(2, -value, float),
        )
        paths.append(str(path))
    return paths


def test_load_targets_subset_major(tmp_path):
    paths = _write_measurements(tmp_path, [(j, s) for j in range(3) for s in range(2)])
    targets = load_targets(paths, n_subsets=3, n_seeds=2)
    assert targets["generated"].shape == (3, 2, 3) and targets["heldout"].shape == (3, 2, 2)
    for j in range(3):
        for s in range(2):
            assert np.all(targets["generated"][j, s] == 10 * j + s)
            assert np.all(targets["heldout"][j, s] == -(10 * j + s))


def test_load_targets_wrong_order_names_file(tmp_path):
    order = [(j, s) for s in range(2) for j in range(3)]  # seed-major: wrong
    paths = _write_measurements(tmp_path, order)
    with pytest.raises(ArtefactError, match=r"m1\.npz: holds subset 1 seed 0, expected subset 0 seed 1"):
        load_targets(paths, n_subsets=3, n_seeds=2)


def test_load_targets_wrong_count(tmp_path):
    paths = _write_measurements(tmp_path, [(0, 0), (0, 1), (1, 0)])
    with pytest.raises(ArtefactError, match="expected 4 measurement files, got 3"):
        load_targets(paths, n_subsets=2, n_seeds=2)


# ---------------------------------------------------------------- common.load_torch


def test_load_torch_corrupt_and_missing(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ArtefactError, match=r"garbage\.pt: corrupt checkpoint"):
        load_torch(garbage)

    good = tmp_path / "good.pt"
    save_torch({"w": torch.arange(1000.0)}, good)
    assert torch.equal(load_torch(good)["w"], torch.arange(1000.0))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArtefactError, match="corrupt"):
        load_torch(truncated)

    with pytest.raises(ArtefactError, match="missing"):
        load_torch(tmp_path / "absent.pt")
