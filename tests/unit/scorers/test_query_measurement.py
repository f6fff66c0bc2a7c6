"""query_measurement for the TRAK family: query features of a likelihood measurement (gradients.py --measurement)
and the scorers that read them (scorers/base.py query_features)."""

import numpy as np
import pytest
import torch
from fakes import TINY_MODEL

from workflow_scripts.core import store as store_mod
from workflow_scripts.core.common import ArtefactError
from workflow_scripts.core.projection import Projector
from workflow_scripts.families.ddpm import build_model
from workflow_scripts.families.likelihood import target_measurement
from workflow_scripts.scorers import get_scorer, gradient_similarity, normalized_if, trak
from workflow_scripts.stages import gradients
from workflow_scripts.stages.scores import ScorerInputs

torch.set_num_threads(1)

SHAPE = (1, 8, 8)
GRAD_CFG = {
    "timesteps": 2,
    "projection": "gaussian",
    "projection_dim": 16,
    "batch_size": 2,
    "timestep_chunk": 4,
    "projection_memory_mb": 64,
    "sjlt_nonzeros": 4,
}


def reference_features(model, images, measurement, project):
    """Independent reference: per image, torch.autograd.grad of measurement.objective (its own draws, model called
    directly, no vmap / functional_call) w.r.t. every parameter, then the projection."""
    rows = []
    for i, x in enumerate(images):
        d = {k: v[0] for k, v in measurement.draws(1, x.shape, i).items()}
        value = measurement.objective(lambda x_t, t: model(x_t, t).sample, x, d)
        grads = torch.autograd.grad(value, list(model.parameters()))
        rows.append(torch.cat([g.flatten() for g in grads]))
    return project(torch.stack(rows)).numpy()


@pytest.mark.parametrize("target", ["elbo", "timestep_loss_t500"])
def test_measurement_features_are_projected_measurement_gradients(smoke_config, target):
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, SHAPE).eval()
    images = (torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1).numpy()
    measurement = target_measurement(smoke_config, target, "heldout")
    n_params = sum(p.numel() for p in model.parameters())
    project = Projector(n_params, 16, "gaussian", 6, 64)
    out = gradients.compute_measurement_features(model, images, measurement, GRAD_CFG, torch.device("cpu"), project)
    ref = reference_features(model, torch.from_numpy(images), measurement, project)
    assert out.shape == (3, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    assert not np.allclose(out[0], out[1])  # per image
    # not the loss features of the same images (the measurement really replaces the loss)
    loss = gradients.compute_features(
        model,
        images,
        "loss",
        GRAD_CFG,
        smoke_config["diffusion"],
        {"gradients": 5, "projection": 6},
        torch.device("cpu"),
        project=project,
    )
    assert not np.allclose(out, loss, rtol=0.1)


# ---------------------------------------------------------------- the scorers on real stores

PAYLOAD = {"config": {"tiny": 1}, "step": 20, "lr": 1e-3}


def _write_stores(tmp_path, config, target, rng, query_dim=None):
    """A loss store (final) and a query_measurement store (query) with random features; returns --features dirs."""
    n = {"train": 12, "generated": 3, "heldout": 2}
    final = tmp_path / "loss_avg_K2_gaussian16"
    for split, rows in n.items():
        identity = gradients.store_identity(config, PAYLOAD, "loss", split, rows, timesteps=2)
        store_mod.write_store(rng.standard_normal((rows, 16)), identity, final / f"{split}.npy")
    query = final / f"measurement_{target}"
    splits = ["generated"] if target == "trajectory" else ["generated", "heldout"]
    qconfig = (
        config if query_dim is None else {**config, "gradients": {**config["gradients"], "projection_dim": query_dim}}
    )
    for split in splits:
        images = np.zeros((n[split], *SHAPE), dtype=np.float32)
        identity = gradients.measurement_identity(
            qconfig, PAYLOAD, "loss", split, images, 2, target, {"trajectories": np.zeros(3)}
        )
        store_mod.write_store(
            rng.standard_normal((n[split], qconfig["gradients"]["projection_dim"])), identity, query / f"{split}.npy"
        )
    return {"final": str(final), "query": str(query)}


@pytest.fixture
def config(smoke_config):
    return {**smoke_config, "gradients": {**smoke_config["gradients"], "projection_dim": 16}}


def test_loss_query_measurement_equals_todays_scores(tmp_path, config):
    stores = _write_stores(tmp_path, config, "elbo", np.random.default_rng(0))
    inputs = ScorerInputs("unused", "unused", {"final": stores["final"]})
    for family, extra in (
        (trak, {}),
        (normalized_if, {"normalization": "relative"}),
        (gradient_similarity, {"similarity": "cosine"}),
    ):
        cfg = {"family": family.__name__.rsplit(".", 1)[1], "output_function": "loss", **extra}
        today = family.compute(cfg, inputs, [0.1, 1.0])
        explicit = family.compute({**cfg, "query_measurement": "loss"}, inputs, [0.1, 1.0])
        for (lam_a, a), (lam_b, b) in zip(today, explicit):
            assert lam_a == lam_b and a.keys() == b.keys()
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])


def test_measurement_queries_are_read_from_the_query_store(tmp_path, config):
    stores = _write_stores(tmp_path, config, "elbo", np.random.default_rng(0))
    inputs = ScorerInputs("unused", "unused", stores)
    ((_, loss),) = trak.compute({"family": "trak", "output_function": "loss"}, inputs, [1.0])
    ((_, elbo),) = trak.compute(
        {"family": "trak", "output_function": "loss", "query_measurement": "elbo"}, inputs, [1.0]
    )
    solver = trak.KernelSolver(np.load(f"{stores['final']}/train.npy"))
    for name in ("generated", "heldout"):
        want = solver.scores(np.load(f"{stores['query']}/{name}.npy"), 1.0).astype(np.float32)
        np.testing.assert_allclose(elbo[name], want, rtol=1e-6)
        assert not np.allclose(elbo[name], loss[name])
    assert get_scorer("trak").query_target({"family": "trak", "query_measurement": "elbo"}) == "elbo"
    assert get_scorer("gradient_similarity").query_target({"family": "gradient_similarity"}) == "loss"


def test_trajectory_heldout_keeps_the_loss_features(tmp_path, config):
    stores = _write_stores(tmp_path, config, "trajectory", np.random.default_rng(0))
    inputs = ScorerInputs("unused", "unused", stores)
    cfg = {"family": "gradient_similarity", "output_function": "loss", "similarity": "dot"}
    ((_, loss),) = gradient_similarity.compute(cfg, inputs, [None])
    ((_, traj),) = gradient_similarity.compute({**cfg, "query_measurement": "trajectory"}, inputs, [None])
    np.testing.assert_array_equal(traj["heldout"], loss["heldout"])
    assert not np.allclose(traj["generated"], loss["generated"])
    assert set(get_scorer("gradient_similarity").notes({**cfg, "query_measurement": "trajectory"})) == {
        "heldout",
        "extra",
    }


def test_query_store_in_another_projection_is_refused(tmp_path, config):
    stores = _write_stores(tmp_path, config, "elbo", np.random.default_rng(0), query_dim=8)
    inputs = ScorerInputs("unused", "unused", stores)
    with pytest.raises(ArtefactError, match="projection_dim"):
        trak.compute({"family": "trak", "output_function": "loss", "query_measurement": "elbo"}, inputs, [1.0])


def test_query_measurement_config_and_stores(smoke_config):
    from workflow_scripts.dag import paths
    from workflow_scripts.dag.config import ConfigError, validate_config

    stores = paths.method_stores(smoke_config, "trak_elbo")
    assert stores["query"] == (f"{stores['final'][0]}/measurement_elbo", "measurement_elbo")
    files = paths.method_feature_stores(smoke_config, "trak_elbo")
    assert f"{stores['final'][0]}/measurement_elbo/heldout.npy" in files
    traj = {
        **smoke_config,
        "scores": {
            **smoke_config["scores"],
            "methods": {"t": {"family": "trak", "output_function": "loss", "query_measurement": "trajectory"}},
        },
    }
    assert (
        f"{paths.method_stores(traj, 't')['final'][0]}/measurement_trajectory/heldout.npy"
        not in paths.method_feature_stores(traj, "t")
    )
    validate_config(smoke_config)  # trak_elbo is a valid method
    tracin = {
        **smoke_config,
        "scores": {
            **smoke_config["scores"],
            "methods": {
                **smoke_config["scores"]["methods"],
                "t": {"family": "tracin", "output_function": "loss", "similarity": "dot", "query_measurement": "elbo"},
            },
        },
    }
    with pytest.raises(ConfigError, match="loss query gradients only"):
        validate_config(tracin)


def test_dry_run_plans_the_measurement_stores(repo, tmp_path):
    """snakemake -n on the smoke config: trak_elbo's scores job reads a store of rule gradients_measurement, run as
    `gradients --measurement elbo` in the loss store's directory; the trajectory method's of the trajectory rule."""
    from workflow_runs import copy_repo, snakemake

    workdir = copy_repo(repo, tmp_path / "repo")
    result = snakemake(
        workdir,
        "-n",
        "-p",
        "results/smoke/scores/trak_elbo/chosen.json",
        "results/smoke/scores/gradient_similarity_trajectory/chosen.json",
        "--configfile",
        "configs/smoke.yaml",
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    from workflow_scripts.dag import paths
    from workflow_scripts.dag.config import load_config

    store = paths.feature_dir(load_config(repo / "params.yaml", repo / "configs" / "smoke.yaml"), "loss")
    assert "rule gradients_measurement:" in out and "rule gradients_measurement_trajectory:" in out, out[-3000:]
    assert f"{store}/measurement_elbo/heldout.npy" in out
    assert f"--measurement elbo --out-dir {store}/measurement_elbo" in out
    assert f"--measurement trajectory --out-dir {store}/measurement_trajectory" in out
    assert f"{store}/measurement_trajectory/heldout.npy" not in out


def test_trajectory_measurement_features(smoke_config):
    """The trajectory measurement (generated queries: their stored sampling trajectories) against the reference."""
    from workflow_scripts.families import ddpm as sample_stage

    torch.manual_seed(0)
    model = build_model(TINY_MODEL, SHAPE).eval()
    samples = sample_stage.generate(
        model,
        SHAPE,
        smoke_config["diffusion"],
        {**smoke_config["sample"], "num_inference_steps": 3},
        0,
        2,
        torch.device("cpu"),
    )
    measurement = target_measurement(smoke_config, "trajectory", "generated", samples)
    assert target_measurement(smoke_config, "trajectory", "heldout", samples) is None
    project = Projector(sum(p.numel() for p in model.parameters()), 16, "gaussian", 6, 64)
    images = samples["images"]
    out = gradients.compute_measurement_features(model, images, measurement, GRAD_CFG, torch.device("cpu"), project)
    ref = reference_features(model, torch.from_numpy(images), measurement, project)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    assert not np.allclose(out[0], out[1])


def test_substitution_table_lists_trak_methods_that_differ_only_in_query_measurement(tmp_path):
    import json

    from workflow_scripts.stages import evaluate as E

    def method(name, config, settings=None):
        (tmp_path / name).mkdir()
        (tmp_path / name / "chosen.json").write_text(
            json.dumps({"method": name, "config": config, "settings": settings or {}})
        )
        return tmp_path / name

    trak_cfg = {"family": "trak", "output_function": "loss"}
    kfac = {"fisher_type": "mc", "kfac_approx": "expand", "ekfac": False, "quantization": "int8", "damping": "relative"}
    dirs = {
        "trak": method("trak", trak_cfg),
        "trak_elbo": method("trak_elbo", {**trak_cfg, "query_measurement": "elbo"}),
        "d_trak": method("d_trak", {**trak_cfg, "output_function": "mean"}),  # another output function: no pair
        "gs": method(
            "gs",
            {
                "family": "gradient_similarity",
                "output_function": "loss",
                "similarity": "cosine",
                "query_measurement": "elbo",
            },
        ),  # no loss partner
        "kfac": method("kfac", {"family": "kfac"}, {**kfac, "query_measurement": "loss"}),
        "kfac_elbo": method(
            "kfac_elbo", {"family": "kfac", "query_measurement": "elbo"}, {**kfac, "query_measurement": "elbo"}
        ),
    }
    assert E.substitution_methods(dirs) == {"trak": "loss", "trak_elbo": "elbo", "kfac": "loss", "kfac_elbo": "elbo"}
