"""Unit tests of workflow_scripts.stages.gradients: vmap per-example gradients and the gradient store."""

import copy
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from fakes import TINY_MODEL, Float64Model, float64_default, float64_gradient_atol, float64_projection_atol

from workflow_scripts.core import store as store_mod
from workflow_scripts.core.common import ArtefactError
from workflow_scripts.families.ddpm import add_noise, alphas_cumprod, build_model, output_function
from workflow_scripts.stages import gradients

torch.set_num_threads(1)

DIFFUSION = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}
SHAPE = (1, 8, 8)
K = 3


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, SHAPE).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, *SHAPE, generator=g) * 2 - 1
    t, eps = gradients.feature_draws(1000, K, SHAPE, seed=5)
    return model, images, t, eps, alphas_cumprod(DIFFUSION)


def loop_gradients(model, images, fn, t, eps, a_bar):
    """Reference: one example at a time, loss.backward()."""
    rows = []
    for x in images:
        model.zero_grad(set_to_none=True)
        xs = x.unsqueeze(0).expand(len(t), *x.shape)
        prediction = model(add_noise(xs, t, eps, a_bar), t).sample
        output_function(fn, prediction, eps).mean().backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


@pytest.mark.parametrize("fn", ["loss", "mean-squared-l2-norm", "mean", "l1-norm", "l2-norm", "linf-norm"])
def test_vmap_gradients_equal_loop(setup, fn):
    model, images, t, eps, a_bar = setup
    fast = gradients.per_example_gradients(model, images, fn, t, eps, a_bar)
    slow = loop_gradients(model, images, fn, t, eps, a_bar)
    n_params = sum(p.numel() for p in model.parameters())
    assert fast.shape == (len(images), n_params)
    scale = slow.abs().max()
    assert scale > 0
    # elementwise rtol 1e-4; atol relative to the gradient's scale (float32 noise on near-zero entries)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * scale.item())
    assert ((fast - slow).norm() / slow.norm()).item() < 1e-4
    # different images give different gradients (the vmap really is per example)
    assert not torch.allclose(fast[0], fast[1])


def test_gradient_is_mean_over_timesteps(setup):
    """In float64 (a float64 copy of the model and draws): one batch of K timesteps and K batches of one differ only by
    float64 rounding (in float32 by ~1e-6 of a gradient entry, which kernels of another CPU can double)."""
    model, images, t, eps, a_bar = setup
    model, images, eps = Float64Model(model), images.double(), eps.double()
    full = gradients.per_example_gradients(model, images, "loss", t, eps, a_bar)
    per_t = [
        gradients.per_example_gradients(model, images, "loss", t[k : k + 1], eps[k : k + 1], a_bar) for k in range(K)
    ]
    mean = torch.stack(per_t).mean(0)
    assert full.dtype == mean.dtype == torch.float64
    torch.testing.assert_close(full, mean, rtol=0, atol=float64_gradient_atol(model, mean))
    # ... not their sum
    assert not torch.allclose(full, torch.stack(per_t).sum(0), rtol=1e-2)


def test_feature_draws_grid_and_shared_noise():
    t10, eps10 = gradients.feature_draws(1000, 10, SHAPE, seed=5)
    t5, eps5 = gradients.feature_draws(1000, 5, SHAPE, seed=5)
    assert t10.tolist() == list(range(0, 1000, 100))
    assert t5.tolist() == list(range(0, 1000, 200))
    assert eps10.shape == (10, *SHAPE)
    # eps is seeded by (seed, t): the same t gets the same noise whatever K is
    assert torch.equal(eps10[2], eps5[1])  # t = 200
    assert not torch.equal(eps10[0], eps10[1])
    _, other = gradients.feature_draws(1000, 10, SHAPE, seed=6)
    assert not torch.equal(eps10, other)


def test_compute_features_is_projected_mean_gradient(setup):
    from workflow_scripts.core.projection import Projector

    model, images, _, _, a_bar = setup
    grad_cfg = {
        "timesteps": 2,
        "projection": "gaussian",
        "projection_dim": 16,
        "batch_size": 2,
        "timestep_chunk": 10,
        "projection_memory_mb": 64,
    }
    seeds = {"gradients": 5, "projection": 6}
    # in float64 (a float64 copy of the model, draws and projection; features stored float32), where the batched
    # vmap and the loop differ only by float64 rounding
    model, images = Float64Model(model), images.double()
    with float64_default():
        out = gradients.compute_features(model, images.numpy(), "loss", grad_cfg, DIFFUSION, seeds, torch.device("cpu"))
        t, eps = gradients.feature_draws(1000, 2, SHAPE, 5)
        raw = loop_gradients(model, images, "loss", t, eps, a_bar)
        project = Projector(raw.shape[1], 16, "gaussian", 6, 64)
        expected = project(raw).numpy()
    assert out.shape == (3, 16) and out.dtype == np.float32
    # the float64 feature rounded once to float32 (2^-24) + the float64 rounding bound; another timestep's draws or
    # another projection is O(|feature|) away
    atol = float64_projection_atol(raw, project.matrix / 16**0.5)
    np.testing.assert_array_less(np.abs(out - expected), atol + 2**-24 * np.abs(expected))


def test_compute_features_with_the_sparse_projection(setup):
    from workflow_scripts.core.projection import SparseProjector

    model, images, _, _, a_bar = setup
    grad_cfg = {
        "timesteps": 2,
        "projection": "sjlt",
        "projection_dim": 16,
        "sjlt_nonzeros": 2,
        "batch_size": 2,
        "timestep_chunk": 10,
        "projection_memory_mb": 64,
    }
    seeds = {"gradients": 5, "projection": 6}
    project = gradients.make_projector(model, grad_cfg, seeds, torch.device("cpu"))
    assert isinstance(project, SparseProjector) and project.nonzeros == 2
    # in float64 (model copy, draws, gradients; the sketch's values +-1/sqrt(s) are applied in the gradients' dtype)
    model64, images64 = Float64Model(model), images.double()
    with float64_default():
        out = gradients.compute_features(
            model64, images64.numpy(), "loss", grad_cfg, DIFFUSION, seeds, torch.device("cpu")
        )
        t, eps = gradients.feature_draws(1000, 2, SHAPE, 5)
        raw = loop_gradients(model64, images64, "loss", t, eps, a_bar)
    assert out.shape == (3, 16) and out.dtype == np.float32
    sketch = SparseProjector(raw.shape[1], 16, 6, 2, 64)
    expected = sketch(raw).numpy()
    # the float64 feature rounded once to float32 + the float64 rounding bound; another sketch is O(|feature|) away
    atol = float64_projection_atol(raw, sketch.matrix.to_dense().T)
    np.testing.assert_array_less(np.abs(out - expected), atol + 2**-24 * np.abs(expected))
    # another s is another sketch
    with float64_default():
        other = gradients.compute_features(
            model64, images64.numpy(), "loss", {**grad_cfg, "sjlt_nonzeros": 4}, DIFFUSION, seeds, torch.device("cpu")
        )
    assert not np.allclose(out, other)


# ---------------------------------------------------------------- the store and its sidecar


@pytest.fixture
def identity(smoke_config):
    payload = {"config": {"model": smoke_config["model"], "seed": 2}, "step": 20}
    return gradients.store_identity(smoke_config, payload, "loss", "train", 6)


def _features(n=6, d=None, smoke_dim=64):
    return np.random.default_rng(0).normal(size=(n, d or smoke_dim)).astype(np.float32)


def test_store_round_trip(tmp_path, identity):
    features = _features()
    path = tmp_path / "g" / "train.npy"
    store_mod.write_store(features, identity, path)
    assert store_mod.sidecar_path(path).exists()
    assert not list(path.parent.glob(".*tmp"))  # no temp file left behind
    array = store_mod.open_store(path, identity)
    assert isinstance(array, np.memmap)
    np.testing.assert_array_equal(np.asarray(array), features)
    sidecar = store_mod.read_sidecar(path)
    assert sidecar.pop("data_sha256") == hashlib.sha256(features.tobytes()).hexdigest()
    assert sidecar == json.loads(json.dumps(identity))
    np.testing.assert_array_equal(store_mod.open_store(path), features)  # without an expected identity


def test_store_identity_records_config(smoke_config, identity):
    assert identity["split"] == "train"
    assert identity["shape"] == [6, smoke_config["gradients"]["projection_dim"]]
    assert identity["made_by"]["output_function"] == "loss"
    other_ckpt = gradients.store_identity(smoke_config, {"config": {"seed": 2}, "step": 10}, "loss", "train", 6)
    assert other_ckpt["config_hash"] != identity["config_hash"]


def test_store_identity_records_sjlt_nonzeros(tmp_path, smoke_config):
    payload = {"config": {"model": smoke_config["model"], "seed": 2}, "step": 20}
    dense_cfg = copy.deepcopy(smoke_config)
    dense_cfg["gradients"]["projection"] = "gaussian"
    dense = gradients.store_identity(dense_cfg, payload, "loss", "train", 6)
    assert "sjlt_nonzeros" not in dense["made_by"]  # dense stores keep the hashes they had before sjlt
    cfg = copy.deepcopy(smoke_config)
    cfg["gradients"]["projection"] = "sjlt"
    sparse = gradients.store_identity(cfg, payload, "loss", "train", 6)
    assert sparse["made_by"]["projection"] == "sjlt"
    assert sparse["made_by"]["sjlt_nonzeros"] == cfg["gradients"]["sjlt_nonzeros"]
    assert sparse["config_hash"] != dense["config_hash"]
    path = tmp_path / "train.npy"
    store_mod.write_store(_features(), sparse, path)
    cfg["gradients"]["sjlt_nonzeros"] += 1
    with pytest.raises(ArtefactError, match=r"differs in sjlt_nonzeros\)"):
        store_mod.open_store(path, gradients.store_identity(cfg, payload, "loss", "train", 6))


def test_store_config_hash_mismatch_names_difference(tmp_path, smoke_config, identity):
    path = tmp_path / "train.npy"
    store_mod.write_store(_features(), identity, path)
    payload = {"config": {"model": smoke_config["model"], "seed": 2}, "step": 20}
    expected = gradients.store_identity(smoke_config, payload, "mean-squared-l2-norm", "train", 6)
    with pytest.raises(ArtefactError) as info:
        store_mod.open_store(path, expected)
    message = str(info.value)
    assert "config_hash" in message and "output_function" in message and str(path) in message

    cfg = copy.deepcopy(smoke_config)
    cfg["seeds"]["projection"] += 1
    expected = gradients.store_identity(cfg, payload, "loss", "train", 6)
    with pytest.raises(ArtefactError, match="seed_projection"):
        store_mod.open_store(path, expected)


def test_store_split_mismatch(tmp_path, identity):
    path = tmp_path / "train.npy"
    store_mod.write_store(_features(), identity, path)
    expected = {**identity, "split": "heldout"}
    with pytest.raises(ArtefactError, match=r"split is train, config expects heldout"):
        store_mod.open_store(path, expected)


def test_store_shape_mismatch(tmp_path, smoke_config, identity):
    path = tmp_path / "train.npy"
    store_mod.write_store(_features(), identity, path)
    payload = {"config": {"model": smoke_config["model"], "seed": 2}, "step": 20}
    expected = gradients.store_identity(smoke_config, payload, "loss", "train", 7)
    with pytest.raises(ArtefactError, match=r"shape is \[6, 64\], config expects \[7, 64\]"):
        store_mod.open_store(path, expected)


def test_array_disagreeing_with_its_sidecar(tmp_path, identity):
    path = tmp_path / "train.npy"
    store_mod.write_store(_features(), identity, path)
    np.save(path, _features(n=5))  # replaced behind the sidecar's back
    with pytest.raises(ArtefactError, match="sidecar says"):
        store_mod.open_store(path)
    np.save(path, _features().astype(np.float64))
    with pytest.raises(ArtefactError, match="float64"):
        store_mod.open_store(path)


@pytest.mark.parametrize("edit", ["negate", "triple"])
def test_edited_store_rows_are_refused_although_mtime_is_kept(tmp_path, identity, edit):
    """Rows of a store negated or tripled in place, its mtime restored: the array still matches its sidecar's
    shape and dtype, so only its data_sha256 tells."""
    path = tmp_path / "train.npy"
    store_mod.write_store(_features(), identity, path)
    stamp = path.stat()
    array = np.load(path, mmap_mode="r+")
    array[1:3] *= -1.0 if edit == "negate" else 3.0
    array.flush()
    del array
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    with pytest.raises(ArtefactError, match=r"train\.npy: contents changed since it was written"):
        store_mod.open_store(path, identity)
    assert not store_mod.reusable(path, identity)  # the gradients stage recomputes it


def test_store_without_digest_asks_for_a_rerun(tmp_path, identity):
    path = tmp_path / "train.npy"
    store_mod.write_store(_features(), identity, path)
    store_mod.save_json(identity, store_mod.sidecar_path(path))  # a sidecar as written before digests
    with pytest.raises(ArtefactError, match=r"train\.npy: its sidecar train\.json has no data_sha256.*rerun"):
        store_mod.open_store(path)


def test_missing_sidecar_or_store_raises(tmp_path, identity):
    path = tmp_path / "train.npy"
    store_mod.write_store(_features(), identity, path)
    store_mod.sidecar_path(path).unlink()
    with pytest.raises(ArtefactError, match="sidecar"):
        store_mod.open_store(path, identity)
    with pytest.raises(ArtefactError, match="missing"):
        store_mod.open_store(tmp_path / "absent.npy")


@pytest.mark.parametrize("kind, directions", [("avg", None), ("sketch", 2)])
def test_compute_features_fills_the_store_memory_map(setup, tmp_path, kind, directions):
    """The gradients stage writes features straight into the store's memory map (never all in RAM): same numbers
    as the in-memory array; an interrupted fill leaves no store and no temporary file."""
    model, images, _, _, _ = setup
    grad_cfg = {
        "timesteps": 2,
        "projection": "sjlt",
        "projection_dim": 16,
        "sjlt_nonzeros": 2,
        "batch_size": 2,
        "timestep_chunk": 10,
        "projection_memory_mb": 64,
    }
    seeds = {"gradients": 5, "projection": 6}
    fn = "eps" if kind == "sketch" else "loss"
    args = (model, images.numpy(), fn, grad_cfg, DIFFUSION, seeds, torch.device("cpu"))
    in_memory = gradients.compute_features(*args, kind=kind, directions=directions)
    identity = {"split": "train", "shape": list(in_memory.shape), "dtype": "float32", "config_hash": "h", "made_by": {}}
    with store_mod.new_store(identity, tmp_path / "train.npy") as store:
        gradients.compute_features(*args, kind=kind, directions=directions, out=store)
    np.testing.assert_array_equal(store_mod.open_store(tmp_path / "train.npy"), in_memory)
    with pytest.raises(ValueError, match="out has shape"):
        with store_mod.new_store({**identity, "shape": [1, 16]}, tmp_path / "bad.npy") as store:
            gradients.compute_features(*args, kind=kind, directions=directions, out=store)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.json", "train.npy"]
