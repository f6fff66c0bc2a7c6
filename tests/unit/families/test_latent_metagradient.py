"""The metagradient (engines/magic.py) through the latent family's LoRA fine-tuning, on a tiny random base pipeline
(built with one pretraining step and saved with save_pretrained in a temp dir) and random latents as model inputs:
the replay is the family's training bit for bit, its reverse pass equals finite differences, the query's caption
enters the scores, and the metagradient stage measures a query exactly as the measure stage does."""

import copy
import json

import numpy as np
import pytest
import torch

from workflow_scripts.core.common import load_npz, load_torch, save_npz
from workflow_scripts.core.data import load_digits_images
from workflow_scripts.dag import paths
from workflow_scripts.dag.config import load_config
from workflow_scripts.engines import magic as mg
from workflow_scripts.families import latent, latent_miniature

torch.set_num_threads(1)
F64 = torch.float64
N_TRAIN = 8


@pytest.fixture(scope="module")
def tiny_config(repo):
    cfg = load_config(repo / "params.yaml", repo / "configs" / "latent.yaml")
    cfg["base"].update(vae_steps=1, unet_steps=1, vae_channels=[8, 16], unet_channels=[8, 16], text_width=8)
    cfg["model"].update(lora={"rank": 2, "alpha": 2, "targets": ["to_q", "to_k", "to_v", "to_out.0"]})
    cfg["model"]["caption_dropout"] = 0.3  # several dropped captions within a few steps
    cfg["train"].update(steps=5, batch_size=4, lr=0.01, warmup_fraction=0.4, grad_clip=None, resume_every=100)
    cfg["measure"].update(n_timesteps=4, n_noise=2, batch_size=8)
    cfg["compute"].update(device="cpu", threads=1)
    return cfg


def with_train(cfg, **train):
    cfg = copy.deepcopy(cfg)
    cfg["train"].update(train)
    return cfg


@pytest.fixture(scope="module")
def pool(tiny_config, tmp_path_factory):
    """latents.npz as the encode stage writes it, with random unit-variance latents (the replay never decodes)."""
    images, labels = load_digits_images()
    base = tmp_path_factory.mktemp("latent-mg") / "base"
    latent_miniature.build_and_pretrain(tiny_config, images[:32], labels[:32], base)
    rng = np.random.default_rng(0)
    return {
        "train_images": rng.standard_normal((N_TRAIN, 4, 8, 8)).astype(np.float32),
        "train_labels": rng.integers(0, 10, N_TRAIN),
        "heldout_images": rng.standard_normal((3, 4, 8, 8)).astype(np.float32),
        "heldout_labels": np.array([2, 5, 9]),
        "captions": np.asarray(latent_miniature.pool_captions()),
        "pipeline": np.asarray(str(base)),
        "pipeline_sha256": np.asarray(latent.pipeline_digest(base)),
    }


def assert_same_params(state_dict, params):
    assert set(state_dict) == set(params) and all(".lora_" in n for n in params)
    for name, p in params.items():
        torch.testing.assert_close(p, state_dict[name], rtol=0, atol=0, msg=name)  # bit for bit on CPU


def test_replay_is_the_fine_tuning_bit_for_bit(tiny_config, pool, tmp_path):
    """w = 1 with clipping active == train_family_model; 0/1 weights without clipping == the weighted fine-tuning."""
    cfg = with_train(tiny_config, grad_clip=0.01)  # below the LoRA gradient norms: every step clips
    out = tmp_path / "full.pt"
    latent.train_family_model(cfg, pool, np.arange(N_TRAIN), 0, out)
    problem, state0 = mg.build_problem(cfg, pool)
    assert problem.grad_clip == 0.01
    assert_same_params(load_torch(out)["state_dict"], mg.train_function(problem, state0, np.ones(N_TRAIN)))
    # the replay did go through dropped captions and flipped latents
    batches = [problem.batch(s) for s in range(problem.steps)]
    assert any((b.cond == len(pool["captions"])).any() for b in batches)
    assert any(not torch.equal(b.x0, problem.images[b.idx]) for b in batches)

    cfg = with_train(tiny_config)  # grad_clip null: no clipping at all
    weights = np.ones(N_TRAIN)
    weights[[1, 6]] = 0
    out = mg.retrain_weighted(cfg, pool, weights, 0, tmp_path / "removed.pt")
    problem, state0 = mg.build_problem(cfg, pool)
    assert problem.grad_clip is None
    removed = mg.train_function(problem, state0, weights)
    assert_same_params(load_torch(out)["state_dict"], removed)
    full = mg.train_function(problem, state0, np.ones(N_TRAIN))
    assert any(not torch.equal(full[n], removed[n]) for n in full)


def measure(problem, params, queries):
    return np.array([mg.query_value_and_grad(problem, params, queries, q)[0] for q in range(len(queries))])


def test_metagradient_equals_finite_differences(tiny_config, pool):
    problem, state0 = mg.build_problem(tiny_config, pool, dtype=F64)
    queries = mg.measurement_queries(
        tiny_config, pool["heldout_images"], stream=1, dtype=F64, cond=pool["heldout_labels"], indices=[0, 2]
    )
    w = np.random.default_rng(1).uniform(0.5, 1.5, N_TRAIN)
    result = mg.metagradients(problem, state0, queries, weights=w, every=2)
    # Central differences, h = 1e-5, float64: truncation ~h^2 |d3m/dw3| (~1e-10 relative) is below the rounding of
    # the quotient, ~eps |m| / h ~ 1e-11 (measured 5e-12); the bound allows 30x that and still catches an O(|dm/dw|)
    # error, 1e5x larger: a reverse pass replaying other draws than the forward, or a query adjoint without its caption.
    h = 1e-5
    tolerance = 30 * np.finfo(np.float64).eps * np.abs(result.values).max() / h
    for i in (0, 3, 6):
        e = np.zeros(N_TRAIN)
        e[i] = h
        fd = (
            measure(problem, mg.train_function(problem, state0, w + e), queries)
            - measure(problem, mg.train_function(problem, state0, w - e), queries)
        ) / (2 * h)
        np.testing.assert_allclose(result.dm_dw[:, i], fd, rtol=0, atol=tolerance)
    assert np.abs(result.dm_dw).max() > 1e4 * tolerance  # not trivially zero


def test_the_query_caption_changes_the_scores(tiny_config, pool):
    """The same query latent and noise draws under two captions: different measurements, different scores."""
    problem, state0 = mg.build_problem(tiny_config, pool)
    one = mg.measurement_queries(tiny_config, pool["heldout_images"], stream=1, indices=[0], cond=[3, 3, 3])
    queries = mg.QueryDraws(one.images.repeat(2, 1, 1, 1), one.t, one.eps.repeat(2, 1, 1, 1, 1), torch.tensor([3, 7]))
    result = mg.metagradients(problem, state0, queries)
    assert result.values[0] != result.values[1]
    difference = np.abs(result.scores[0] - result.scores[1]).max()
    assert difference > 0.05 * np.abs(result.scores).max(), result.scores


def stage(*argv):
    from workflow_scripts.__main__ import main

    assert main([str(a) for a in argv]) == 0


def test_metagradient_stage_measures_the_queries_as_the_measure_stage(tiny_config, pool, tmp_path):
    """Rule metagradient on latents.npz: the recomputed training ends at the full LoRA checkpoint (check_full_model),
    m_q at theta_T is the measure stage's loss of that checkpoint, each query under its own caption, and the scorer
    computing in-process (no chunk files) gives the chunk's scores."""
    from workflow_scripts.scorers import get_scorer
    from workflow_scripts.stages.scores import ScorerInputs

    method = {"family": "metagradient", "max_queries": 2, "checkpoint_every": 2}
    cfg = {**tiny_config, "scores": {**tiny_config["scores"], "methods": {"magic": method}}}
    files = {name: tmp_path / f"{name}.npz" for name in ("latents", "samples", "chunk000", "measurement")}
    save_npz(files["latents"], **pool)
    generated = np.random.default_rng(2).standard_normal((3, 4, 8, 8)).astype(np.float32)
    save_npz(files["samples"], images=generated, labels=np.array([4, 8, 0]))
    model = tmp_path / "full.pt"
    latent.train_family_model(cfg, pool, np.arange(N_TRAIN), 0, model)
    inputs = ["--dataset", files["latents"], "--samples", files["samples"], "--model", model]
    stage(
        *["metagradient", "--config", paths.metagradient_config(cfg, "magic"), "--method", "magic", *inputs],
        *["--queries", "generated=0,1", "heldout=0,1", "--out", files["chunk000"]],
    )
    stage("measure", "--config", paths.stage_config(cfg, "measure"), *inputs, "--out", files["measurement"])
    chunk, measured = load_npz(files["chunk000"]), load_npz(files["measurement"])
    assert json.loads(str(chunk["info"]))["n_queries"] == 4
    for name in ("generated", "heldout"):
        np.testing.assert_allclose(chunk[f"{name}_values"], measured[name][:2], rtol=1e-5)

    scorer_inputs = ScorerInputs(str(files["latents"]), str(files["samples"]), model_path=str(model), config=cfg)
    [(_, direct)] = get_scorer("metagradient").compute(method, scorer_inputs, [1.0])
    for name in ("generated", "heldout"):
        np.testing.assert_allclose(direct[name][:2], chunk[f"{name}_scores"], rtol=1e-5, atol=1e-7)
        assert np.abs(direct[name][:2]).max() > 0
    assert np.isnan(direct["generated"][2]).all()  # beyond max_queries: not attributed
