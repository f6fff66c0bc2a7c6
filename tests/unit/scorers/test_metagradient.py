"""Metagradient / MAGIC (workflow_scripts.engines.magic, scorers.metagradient).

(a) the reverse pass equals central finite differences of the training function in w (float64, tiny UNet, 5 steps
    of warm-up + cosine lr, AdamW state, clipping active or not) and exact autograd through the unrolled training;
(b) checkpointing does not change the result (every = 1 .. T);
(c) w = 1 (and 0/1 masks) reproduce train.train_model bit for bit on CPU;
(d) the fixed-seed ground truth: retraining with the removed examples weighted 0 changes m_q by the first-order
    prediction sum_{i in R} S[q, i], up to the second-order Taylor remainder (estimated from the half removal);
(e) bad input is rejected; the scorer family's format, NaN rows for queries not attributed, config schema.
"""

import copy

import numpy as np
import pytest
import torch

from workflow_scripts.core import data
from workflow_scripts.core.common import ArtefactError, load_torch
from workflow_scripts.dag.config import ConfigError, validate_config
from workflow_scripts.engines import magic as mg
from workflow_scripts.engines import metagradient as metagradient_engine
from workflow_scripts.families import ddpm as train
from workflow_scripts.scorers import get_scorer
from workflow_scripts.scorers.metagradient import Metagradient

family = get_scorer("metagradient")

torch.set_num_threads(1)
F64 = torch.float64


@pytest.fixture(scope="module")
def digits():
    return data.load_digits_images()[0]


@pytest.fixture(scope="module")
def tiny(smoke_config):
    """A 11.6k-parameter UNet (conv + attention), few measurement draws."""
    cfg = copy.deepcopy(smoke_config)
    cfg["model"].update(block_out_channels=[4, 8], norm_num_groups=2, attention_head_dim=4)
    cfg["measure"].update(n_timesteps=4, n_noise=2, batch_size=8)
    cfg["compute"].update(device="cpu", threads=1)
    return cfg


def _with_train(cfg, **train_cfg):
    cfg = copy.deepcopy(cfg)
    cfg["train"].update(train_cfg)
    return cfg


def _measure(problem, params, queries):
    return np.array([mg.query_value_and_grad(problem, params, queries, q)[0] for q in range(len(queries))])


def _grad_norm(problem, state, weights, step):
    batch = problem.batch(step)
    params = {n: p.detach().requires_grad_() for n, p in state["params"].items()}
    loss = mg.batch_loss(problem, params, torch.as_tensor(weights, dtype=problem.dtype)[batch.idx], batch)
    grads = torch.autograd.grad(loss, list(params.values()))
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


# ---------------------------------------------------------------- (a) finite differences


@pytest.mark.parametrize("clip, at", [(100.0, "ones"), (0.05, "random")], ids=["no-clipping-w1", "clipping-random-w"])
def test_metagradient_equals_finite_differences(tiny, digits, clip, at):
    cfg = _with_train(tiny, steps=5, batch_size=4, lr=0.01, warmup_fraction=0.4, grad_clip=clip)
    problem, state0 = mg.build_problem(cfg, digits[:8], dtype=F64)
    # lr schedule: 0 at step 0, linear warm-up, cosine decay
    assert problem.lrs[0] == 0 and problem.lrs[1] == pytest.approx(0.005) and problem.lrs[2] == pytest.approx(0.01)
    assert problem.lrs[3] > problem.lrs[4] > 0
    w = np.ones(8) if at == "ones" else np.random.default_rng(0).uniform(0.5, 1.5, 8)
    norms = [_grad_norm(problem, mg.train(problem, state0, w, stop=s)[0], w, s) for s in range(5)]
    assert (min(norms) > clip) if clip < 1 else (max(norms) < clip)  # clipping active at every step, or never
    queries = mg.measurement_queries(cfg, digits[100:102], stream=0, dtype=F64)
    result = mg.metagradients(problem, state0, queries, weights=w, every=2)

    h = 1e-5  # central differences: truncation ~h^2 (measured 1e-9 relative here), rounding ~1e-16/h
    for i in (0, 3, 7):
        e = np.zeros(8)
        e[i] = h
        fd = (
            _measure(problem, mg.train_function(problem, state0, w + e), queries)
            - _measure(problem, mg.train_function(problem, state0, w - e), queries)
        ) / (2 * h)
        np.testing.assert_allclose(result.dm_dw[:, i], fd, rtol=0, atol=1e-6 * np.abs(result.dm_dw).max())
    assert np.abs(result.dm_dw).max() > 1e-4  # not trivially zero
    np.testing.assert_array_equal(result.scores, -result.dm_dw)


def test_metagradient_equals_autograd_through_unrolled_training(tiny, digits):
    """The same derivative from one autograd graph of the whole (unrolled, uncheckpointed) training."""
    cfg = _with_train(tiny, steps=5, batch_size=4, lr=0.01, warmup_fraction=0.4, grad_clip=1.0)
    problem, state0 = mg.build_problem(cfg, digits[:8], dtype=F64)
    queries = mg.measurement_queries(cfg, digits[100:102], stream=1, dtype=F64)
    result = mg.metagradients(problem, state0, queries)
    w = torch.ones(8, dtype=F64, requires_grad=True)
    state = {key: {n: x.clone().requires_grad_() for n, x in part.items()} for key, part in state0.items()}
    for step in range(problem.steps):
        batch = problem.batch(step)
        state = mg.training_step(problem, state, w[batch[0]], step, batch, create_graph=True)
    for q in range(len(queries)):
        x0 = queries.images[q].expand(len(queries.t), *queries.images.shape[1:])
        pred = mg._predict(
            problem.model, state["params"], train.add_noise(x0, queries.t, queries.eps[q], problem.a_bar), queries.t
        )
        value = (queries.eps[q] - pred).pow(2).flatten(1).mean(1).mean()
        assert float(value.detach()) == pytest.approx(result.values[q], rel=1e-12)
        (grad,) = torch.autograd.grad(value, w, retain_graph=True)
        np.testing.assert_allclose(result.dm_dw[q], grad.numpy(), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- (b) checkpointing


def test_checkpointing_does_not_change_the_metagradient(tiny, digits):
    cfg = _with_train(tiny, steps=7, batch_size=4, lr=0.01, warmup_fraction=0.2)
    problem, state0 = mg.build_problem(cfg, digits[:12], dtype=F64)
    queries = mg.measurement_queries(cfg, digits[200:202], stream=0, dtype=F64)
    results = {every: mg.metagradients(problem, state0, queries, every=every) for every in (1, 2, 3, 7, 100, None)}
    reference = results[1].dm_dw  # every state stored: no recomputation
    for result in results.values():
        np.testing.assert_allclose(result.dm_dw, reference, rtol=1e-12, atol=1e-15)
    assert results[1].info["n_checkpoints"] == 7 and results[7].info["n_checkpoints"] == 1
    assert results[100].info["every"] == 7 and results[3].info["n_checkpoints"] == 3
    assert results[None].info["every"] == mg.default_every(7) == 3  # ceil(sqrt(T))
    assert mg.default_every(600) == 25 and mg.default_every(1) == 1
    # memory bookkeeping: checkpoints + one segment of states, 3 tensors (params, exp_avg, exp_avg_sq) each
    info = results[3].info
    assert info["checkpoint_mb"] == pytest.approx(3 * 3 * info["n_params"] * 8 / 2**20)
    assert info["peak_rss_mb"] > 0


# ---------------------------------------------------------------- (c) the project's training


@pytest.fixture(scope="module")
def float32_setup(smoke_config, digits):
    cfg = copy.deepcopy(smoke_config)
    cfg["train"].update(steps=12, batch_size=8, resume_every=100)
    cfg["compute"].update(device="cpu", threads=1)
    return cfg, digits[:32]


def _assert_same_params(state_dict, params):
    assert set(state_dict) == set(params)
    for name, p in params.items():
        torch.testing.assert_close(p, state_dict[name], rtol=0, atol=0, msg=name)  # bit for bit on CPU


def test_unit_weights_reproduce_train_model(float32_setup, tmp_path):
    cfg, images = float32_setup
    out = train.train_model(cfg, images, np.arange(len(images)), 0, tmp_path / "full.pt", device=torch.device("cpu"))
    problem, state0 = mg.build_problem(cfg, images)
    _assert_same_params(load_torch(out)["state_dict"], mg.train_function(problem, state0, np.ones(len(images))))


def test_unit_weights_reproduce_train_model_on_the_smoke_split(smoke_config, tmp_path):
    """The smoke benchmark's own data and settings (20 steps, clipping active): here autograd returns some conv weight
    gradients non-contiguous, and a norm over another memory layout differs from clip_grad_norm_'s in the last bit."""
    cfg = copy.deepcopy(smoke_config)
    cfg["compute"].update(device="cpu", threads=1)
    images = data.make_dataset(cfg["data"], cfg["seeds"]["split"])["train_images"]
    out = train.train_model(cfg, images, np.arange(len(images)), 0, tmp_path / "full.pt", device=torch.device("cpu"))
    problem, state0 = mg.build_problem(cfg, images)
    _assert_same_params(load_torch(out)["state_dict"], mg.train_function(problem, state0, np.ones(len(images))))


def test_weighted_retraining_is_the_training_function(float32_setup, tmp_path):
    """The ground truth (train.train_model with weights 0 for the removed examples, same seed and order)."""
    cfg, images = float32_setup
    weights = np.ones(len(images))
    weights[[3, 17, 20]] = 0
    out = mg.retrain_weighted(cfg, images, weights, 0, tmp_path / "removed.pt")
    problem, state0 = mg.build_problem(cfg, images)
    removed = mg.train_function(problem, state0, weights)
    _assert_same_params(load_torch(out)["state_dict"], removed)
    full = mg.train_function(problem, state0, np.ones(len(images)))
    assert any(not torch.equal(full[n], removed[n]) for n in full)


def test_measurement_draws_are_the_measure_stage(tiny, digits):
    from workflow_scripts.families.ddpm import build_model, measure_loss

    queries_images = digits[300:305]
    torch.manual_seed(0)
    model = build_model(tiny["model"], digits.shape[1:]).eval()
    problem, _ = mg.build_problem(_with_train(tiny, steps=2), digits[:8], model=model)
    expected = measure_loss(
        model, queries_images, tiny["diffusion"], tiny["measure"], tiny["seeds"]["measure"], 1, "cpu"
    )
    selected = np.array([1, 4])
    queries = mg.measurement_queries(tiny, queries_images, stream=1, indices=selected)
    params = {n: p.detach() for n, p in model.named_parameters()}
    np.testing.assert_allclose(_measure(problem, params, queries), expected[selected], rtol=1e-6)


# ---------------------------------------------------------------- (d) fixed-seed ground truth


def test_removal_changes_measurement_by_first_order_prediction(tiny, digits):
    """Retrain (same seed and order) with examples R weighted 0: the change A of m_q vs the MAGIC prediction
    P = sum_{i in R} S[q, i]. A smooth tiny problem: no clipping kink (grad_clip above every gradient norm), 20
    steps of the project's AdamW + schedule, batch 16 of 64 (one example = 1/16 of a batch: a LARGE removal).

    Tolerance, from the Taylor expansion of f(s) = m_q(theta_T(1 - s e_R)) = f0 - s g + s^2 c/2 - s^3 d/6 (P = -g):
    the half removal gives R2 = 2 (A - 2 A_half) = c/2 - d/4, so A - P - R2 = d/12, third order. Checked:
    |A - P - R2| <= 0.25 |R2| (measured <= 0.06: the first-order error is the second-order term), and the sign of P
    wherever the first-order term dominates (|A| > |R2|). With the opposite sign convention A - P = A + g would be
    off by 2|g| and fail. (The second-order term is positive for every removal here -- removing data raises the
    query loss more than the linear prediction -- and as large as the first-order term for single examples.)"""
    cfg = _with_train(tiny, steps=20, batch_size=16, lr=1e-3, warmup_fraction=0.2, grad_clip=100.0)
    cfg["measure"].update(n_timesteps=8, n_noise=2)
    n = 64
    problem, state0 = mg.build_problem(cfg, digits[:n], dtype=F64)
    queries = mg.measurement_queries(cfg, digits[100:102], stream=0, dtype=F64)
    scores = mg.metagradients(problem, state0, queries).scores
    base = _measure(problem, mg.train_function(problem, state0, np.ones(n)), queries)
    assert max(_grad_norm(problem, state0, np.ones(n), s) for s in range(3)) < 100.0
    actual, half, predicted = [], [], []
    for removed in ([16], [21], [48], [9, 30, 57]):
        w = np.ones(n)
        w[removed] = 0.0
        actual.append(_measure(problem, mg.train_function(problem, state0, w), queries) - base)
        w[removed] = 0.5
        half.append(_measure(problem, mg.train_function(problem, state0, w), queries) - base)
        predicted.append(scores[:, removed].sum(1))
    actual, half, predicted = map(np.concatenate, (actual, half, predicted))
    remainder2 = 2 * (actual - 2 * half)
    table = np.c_[actual, predicted, remainder2]
    assert np.all(np.abs(actual - predicted - remainder2) <= 0.25 * np.abs(remainder2)), table
    dominated = np.abs(actual) > np.abs(remainder2)
    assert dominated.sum() >= 3, table
    np.testing.assert_array_equal(np.sign(predicted[dominated]), np.sign(actual[dominated]))


# ---------------------------------------------------------------- (e) bad input


def test_bad_input_is_rejected(tiny, digits):
    cfg = _with_train(tiny, steps=3, batch_size=4)
    problem, state0 = mg.build_problem(cfg, digits[:8])
    queries = mg.measurement_queries(cfg, digits[100:101], stream=0)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        mg.metagradients(problem, state0, queries, weights=np.ones(7))
    with pytest.raises(ValueError, match="finite"):
        mg.train(problem, state0, np.r_[np.ones(7), np.nan])
    for every in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            mg.metagradients(problem, state0, queries, every=every)
    with pytest.raises(ValueError, match="no queries"):
        mg.metagradients(problem, state0, mg.measurement_queries(cfg, digits[100:101], stream=0, indices=[]))
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        mg.measurement_queries(cfg, digits[100:101], stream=0, indices=[1])
    with pytest.raises(ValueError, match="unknown query sets"):
        mg.attribute(cfg, digits[:8], {"heldout": digits[100:102]}, {"generated": [0]})
    with pytest.raises(ValueError, match="no queries selected"):
        mg.attribute(cfg, digits[:8], {"heldout": digits[100:102]}, {"heldout": []})
    with pytest.raises(ValueError, match="learning rates"):
        mg.TrainingProblem(problem.model, problem.images, problem.a_bar, problem.batches, 3, [0.1], 0.0, 1.0)


# ---------------------------------------------------------------- scorer family


class _Inputs:
    def __init__(self, config, train_images, queries, model_path=None):
        self.config, self._train, self._queries, self.model_path = config, train_images, queries, model_path

    def train_images(self):
        return self._train

    def queries(self):
        return self._queries


def test_scorer_family_attributes_first_queries_and_marks_the_rest(tiny, digits, tmp_path):
    cfg = _with_train(tiny, steps=6, batch_size=8, resume_every=100)
    images = digits[:16]
    queries = {"generated": digits[100:103], "heldout": digits[200:202]}
    model_path = train.train_model(cfg, images, np.arange(16), 0, tmp_path / "full.pt", device=torch.device("cpu"))
    assert isinstance(family, Metagradient)
    method = {"family": "metagradient", "max_queries": 2, "checkpoint_every": 2}
    [(lam, matrices)] = family.compute(method, _Inputs(cfg, images, queries, str(model_path)), [0.1, 1.0])
    assert lam is None and set(matrices) == {"generated", "heldout"}
    assert matrices["generated"].shape == (3, 16) and matrices["heldout"].shape == (2, 16)
    assert all(m.dtype == np.float32 for m in matrices.values())
    assert np.isfinite(matrices["generated"][:2]).all() and np.isnan(matrices["generated"][2]).all()
    assert np.isfinite(matrices["heldout"]).all()
    # the same numbers as the library with the measure stage's streams (generated = 0, heldout = 1)
    problem, state0 = mg.build_problem(cfg, images)
    heldout = mg.metagradients(problem, state0, mg.measurement_queries(cfg, queries["heldout"], stream=1))
    np.testing.assert_allclose(matrices["heldout"], heldout.scores, rtol=1e-5, atol=1e-7)
    assert "first 2 queries" in family.notes(method)["generated"]
    # the extra queries are never attributed (family.unscored_sets): always noted, with or without max_queries
    assert (
        set(family.notes({"family": "metagradient"})) == {"extra"} and "not attributed" in family.notes(method)["extra"]
    )
    assert family.settings(method, cfg) == {
        "checkpoint_every": 2,
        "max_queries": 2,
        "replicate": 0,
        "train_steps": 6,
        "queries_per_job": None,
    }
    assert family.settings({"family": "metagradient"}, cfg)["checkpoint_every"] == 3

    other = _with_train(cfg, lr=cfg["train"]["lr"] * 2)  # the checkpoint is not the model of this training
    with pytest.raises(ArtefactError, match="not the model of this training"):
        metagradient_engine.check_full_model(
            str(model_path), other, images, 0, mg.train_function(*mg.build_problem(other, images), np.ones(16))
        )


def test_scorer_family_rejects_bad_options(tiny, digits):
    inputs = _Inputs(tiny, digits[:8], {"heldout": digits[100:101]})
    for bad in ({"max_queries": 0}, {"checkpoint_every": 2.5}, {"replicate": -1}, {"steps": 3}):
        with pytest.raises(ValueError, match="metagradient"):
            family.compute({"family": "metagradient", **bad}, inputs, [1.0])
    with pytest.raises(ArtefactError, match="full configuration"):
        family.compute({"family": "metagradient"}, _Inputs(None, digits[:8], {"heldout": digits[100:101]}), [1.0])


def test_config_schema_accepts_metagradient_methods(base_config):
    cfg = copy.deepcopy(base_config)
    cfg["scores"]["methods"]["magic"] = {"family": "metagradient", "checkpoint_every": 25, "max_queries": 4}
    cfg["scores"]["methods"]["magic_all"] = {"family": "metagradient", "checkpoint_every": None, "max_queries": None}
    validate_config(cfg)
    for bad in ({"max_queries": 0}, {"checkpoint_every": "sqrt"}, {"lambda_grid": [1.0]}):
        cfg["scores"]["methods"]["magic"] = {"family": "metagradient", **bad}
        with pytest.raises(ConfigError, match="scores.methods.magic"):
            validate_config(cfg)


# ---------------------------------------------------------------- (f) the workflow stages
def _stage(*argv):
    from workflow_scripts.__main__ import main

    assert main([str(a) for a in argv]) == 0


def test_fixed_seed_stage_retrains_with_zero_weights(float32_setup, tmp_path):
    """Rule fixed_seed_sets + a train_subset job of kind fixed_seed == the training function with those weights 0."""
    import json

    from workflow_scripts.core import fixed_seed
    from workflow_scripts.core.common import load_npz, save_npz
    from workflow_scripts.dag import paths

    cfg, images = float32_setup
    n = len(images)
    masks = np.random.default_rng(0).random((3, n)) < 0.5
    save_npz(tmp_path / "subsets.npz", masks=masks, tuning=np.arange(1), evaluation=np.arange(1, 3))
    save_npz(tmp_path / "dataset.npz", train_images=images, heldout_images=images[:2])
    cfg = {**cfg, "fixed_seed": {"loo_sets": 2, "loo_fraction": 0.1}}
    _stage(
        "fixed_seed", "--config", json.dumps(cfg), "--subsets", tmp_path / "subsets.npz", "--out", tmp_path / "sets.npz"
    )
    sets = load_npz(tmp_path / "sets.npz")
    assert [str(s) for s in sets["names"]] == ["subset001", "subset002", "loo000", "loo001"]
    np.testing.assert_array_equal(sets["masks"][:2], masks[1:])  # the evaluation subsets, unchanged
    assert ((~sets["masks"][2:]).sum(1) == round(0.1 * n)).all()  # leave-out sets: round(0.1 * 32) = 3 removed
    assert not np.array_equal(sets["masks"][2], sets["masks"][3])
    assert fixed_seed.removed_count(0.01, 32) == 1  # at least one example

    problem, state0 = mg.build_problem(cfg, images)
    for name, row in (("subset002", 1), ("loo001", 3)):
        out = tmp_path / name / "model.pt"
        _stage(
            "train",
            "--config",
            json.dumps(cfg),
            "--dataset",
            tmp_path / "dataset.npz",
            *paths.retraining_args("fixed_seed", name, str(tmp_path / "sets.npz")).split(),
            "--out",
            out,
        )
        payload = load_torch(out)
        _assert_same_params(payload["state_dict"], mg.train_function(problem, state0, sets["masks"][row].astype(float)))
        assert payload["config"]["n_members"] == n  # all examples, the removed ones weighted 0
        assert payload["config"]["weights_sha256"]  # ... and recorded: not the identity of the full model
    with pytest.raises(ArtefactError, match="'loo007' is not in the sets file"):
        _stage(
            "train",
            "--config",
            json.dumps(cfg),
            "--dataset",
            tmp_path / "dataset.npz",
            "--fixed-seed-sets",
            tmp_path / "sets.npz",
            "--fixed-seed-set",
            "loo007",
            "--out",
            tmp_path / "x.pt",
        )


def test_chunk_jobs_assemble_to_the_scores_of_one_pass(tiny, digits, tmp_path):
    """Rule metagradient (one job per chunk of queries) + the scores stage's assembly == one call of the family."""
    import json

    from workflow_scripts.core.common import save_npz
    from workflow_scripts.dag import paths

    cfg = _with_train(tiny, steps=6, batch_size=8, resume_every=100)
    images = digits[:16]
    queries = {"generated": digits[100:103], "heldout": digits[200:202]}
    save_npz(tmp_path / "dataset.npz", train_images=images, heldout_images=queries["heldout"])
    save_npz(tmp_path / "samples.npz", images=queries["generated"])
    model = train.train_model(cfg, images, np.arange(16), 0, tmp_path / "full.pt", device=torch.device("cpu"))
    method = {"family": "metagradient", "max_queries": 2, "checkpoint_every": 2, "queries_per_job": 3}
    cfg = {**cfg, "scores": {**cfg["scores"], "methods": {"magic": method}}}
    chunks = paths.metagradient_chunks(cfg, "magic")
    assert [len(c) for c in chunks] == [3, 1]  # generated 0, 1 + heldout 0 | heldout 1
    files = []
    for k in range(len(chunks)):
        files.append(tmp_path / f"chunk{k:03d}.npz")
        _stage(
            "metagradient",
            "--config",
            paths.metagradient_config(cfg, "magic"),
            "--method",
            "magic",
            "--dataset",
            tmp_path / "dataset.npz",
            "--samples",
            tmp_path / "samples.npz",
            "--model",
            model,
            *paths.metagradient_chunk_args(cfg, "magic", f"chunk{k:03d}").split(),
            "--out",
            files[-1],
        )
    inputs = _Inputs(cfg, images, queries, str(model))
    inputs.chunks = [str(f) for f in files]
    [(_, assembled)] = family.compute(method, inputs, [1.0])
    inputs.chunks = []
    [(_, direct)] = family.compute(method, inputs, [1.0])
    for name in queries:
        np.testing.assert_allclose(assembled[name], direct[name], rtol=1e-5, atol=1e-7)  # NaN rows included
    assert np.isnan(assembled["generated"][2]).all() and np.isfinite(assembled["heldout"]).all()
    inputs.chunks = [str(files[0])]  # a chunk missing: heldout query 1 would silently be NaN
    with pytest.raises(ArtefactError, match=r"heldout queries \[0\], expected exactly \[0, 1\]"):
        family.compute(method, inputs, [1.0])
    info = json.loads(str(np.load(files[0])["info"]))
    assert info["n_queries"] == 3 and info["time_total"] > 0
