"""K-FAC influence end to end on the smoke configuration: the `curvature` stage entry writes a file, the scorer
scorer (scorers/kfac.py, engine engines/kfac.py) reads it back (checking its config) and returns the scores.py sweep format."""

import argparse
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from workflow_scripts.core import curvature
from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import ArtefactError, save_npz
from workflow_scripts.dag.paths import format_curvature_variant
from workflow_scripts.engines import kfac as kfac_engine
from workflow_scripts.families.ddpm import generate, load_model, train_model
from workflow_scripts.scorers import get_scorer
from workflow_scripts.scorers import kfac as K
from workflow_scripts.stages import curvature as C
from workflow_scripts.stages import data

torch.set_num_threads(1)
KFAC = {
    "fisher_type": "mc",
    "kfac_approx": "expand",
    "ekfac": False,
    "draws": 2,
    "fisher_mc_samples": 1,
    "separate_weight_and_bias": False,
    "batch_size": 64,
    "gradient_draws": 2,
    "query_draws": "measure",
    "quantization": "int8",
}


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, smoke_config):
    tmp = tmp_path_factory.mktemp("kfac")
    config = copy.deepcopy(smoke_config)
    config["data"]["n_train"] = 12
    config["train"]["steps"] = 2
    config["compute"] = {"device": "cpu", "threads": 1}
    config["kfac"] = dict(KFAC)
    dataset = tmp / "dataset.npz"
    data.run(argparse.Namespace(dataset_out=dataset, subsets_out=tmp / "subsets.npz"), config)
    images = core_data.load_dataset(dataset)["train_images"]
    model_path = train_model(config, images, np.arange(len(images)), 0, tmp / "model.pt")
    return config, dataset, model_path, tmp


def _kfac(method_cfg, inputs):
    """The kfac scorer as the scores stage runs it: its own lambda grid (KFAC.lambdas), then compute."""
    scorer = get_scorer("kfac")
    return scorer.compute(method_cfg, inputs, scorer.lambdas(method_cfg, inputs.config))


def _inputs(config, dataset, model_path, curvature_path):
    arrays = core_data.load_dataset(dataset)
    queries = {"generated": arrays["heldout_images"][:2], "heldout": arrays["heldout_images"][2:]}
    return SimpleNamespace(
        config=config,
        model_path=model_path,
        curvature_path=curvature_path,
        train_images=lambda: arrays["train_images"],
        queries=lambda: queries,
    )


def test_stage_then_scorer(workflow, caplog):
    config, dataset, model_path, tmp = workflow
    out = (
        tmp
        / "curvature"
        / f"{format_curvature_variant(*(config['kfac'][k] for k in ('fisher_type', 'kfac_approx', 'ekfac')))}.pt"
    )
    args = argparse.Namespace(
        model=str(model_path), dataset=str(dataset), fisher_type=None, kfac_approx=None, ekfac=None, out=str(out)
    )
    C.run(args, config)
    assert out.exists()
    mtime = out.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="workflow_scripts"):
        C.run(args, config)  # same config: reused, not refitted
    assert out.stat().st_mtime_ns == mtime and "reusing" in caplog.text
    lambdas = [1e-3, 1e-1]
    results = kfac_engine.compute({"family": "kfac"}, _inputs(config, dataset, model_path, out), lambdas)
    assert [lam for lam, _ in results] == lambdas
    for _, matrices in results:
        assert set(matrices) == {"generated", "heldout"}
        assert matrices["heldout"].shape == (2, 12) and matrices["heldout"].dtype == np.float32
        assert all(np.isfinite(m).all() for m in matrices.values())
    # a method whose variant differs from the file (EK-FAC) is refused, not silently scored with K-FAC
    with pytest.raises(ArtefactError, match="ekfac"):
        kfac_engine.compute({"family": "kfac", "ekfac": True}, _inputs(config, dataset, model_path, out), lambdas)
    other = copy.deepcopy(config)
    other["kfac"]["draws"] = 3
    with pytest.raises(ArtefactError, match="draws"):
        kfac_engine.compute({"family": "kfac"}, _inputs(other, dataset, model_path, out), lambdas)
    # the CLI override of the variant writes the EK-FAC file that such a method needs
    ek = tmp / "curvature" / "mc-expand-ekfac.pt"
    C.run(argparse.Namespace(**{**vars(args), "ekfac": True, "out": str(ek)}), config)
    assert curvature.load_curvature(ek).is_ekfac
    assert (
        _kfac({"family": "kfac", "ekfac": True, "lambda_grid": [1e-2]}, _inputs(config, dataset, model_path, ek))[0][0]
        == 1e-2
    )


def _generated_samples(config, model_path, path):
    """Two generated queries with their sampling trajectories (as _inputs' generated set), written to path."""
    model, payload = load_model(model_path, config["model"], "cpu")
    sample_cfg = {**config["sample"], "num_inference_steps": 3}
    save_npz(
        path, **generate(model, payload["image_shape"], config["diffusion"], sample_cfg, 0, 2, torch.device("cpu"))
    )
    return path


def _mc_expand_file(workflow):
    """The default variant's curvature file of the module's workflow (fitted by the stage entry once)."""
    config, dataset, model_path, tmp = workflow
    out = tmp / "curvature" / "mc-expand.pt"
    if not out.exists():
        C.run(
            argparse.Namespace(
                model=str(model_path),
                dataset=str(dataset),
                fisher_type=None,
                kfac_approx=None,
                ekfac=None,
                out=str(out),
            ),
            config,
        )
    return out


def test_absolute_damping_equals_relative_damping_over_mean_eigenvalue(workflow):
    """damping: absolute (the paper's untuned 1e-8) is the relative lambda absolute / mean eigenvalue of G."""
    config, dataset, model_path, tmp = workflow
    out = _mc_expand_file(workflow)
    mean = curvature.load_curvature(out).mean_eigenvalue()
    absolute = 0.5 * mean
    inputs = _inputs(config, dataset, model_path, out)
    ((lam_a, scores_a),) = _kfac({"family": "kfac", "damping": "absolute", "lambda_grid": [absolute]}, inputs)
    ((lam_r, scores_r),) = _kfac({"family": "kfac", "lambda_grid": [0.5]}, inputs)
    assert lam_a == pytest.approx(absolute) and lam_r == 0.5  # each reports its own lambda
    for name in scores_r:
        np.testing.assert_allclose(scores_a[name], scores_r[name], rtol=1e-5, atol=1e-6 * np.abs(scores_r[name]).max())
    ((_, other),) = _kfac({"family": "kfac", "lambda_grid": [50.0]}, inputs)
    assert not np.allclose(other["heldout"], scores_r["heldout"])  # the damping matters at all


def test_lambda_grid_precedence():
    """method lambda_grid > kfac.lambda_grid > scores.lambda_grid, resolved once by the scorer (KFAC.lambdas)."""
    scorer = get_scorer("kfac")
    config = {"scores": {"lambda_grid": [1, 10]}, "kfac": dict(KFAC)}
    assert scorer.lambdas({"family": "kfac"}, config) == [1.0, 10.0]
    with_grid = {**config, "kfac": {**KFAC, "lambda_grid": [1e-6, 1e-3]}}
    assert scorer.lambdas({"family": "kfac"}, with_grid) == [1e-6, 1e-3]
    assert scorer.lambdas({"family": "kfac", "lambda_grid": [0.5]}, with_grid) == [0.5]


def test_settings_and_notes_name_the_variant():
    config = {"kfac": dict(KFAC)}
    assert K.settings({"family": "kfac"}, config) == {
        "fisher_type": "mc",
        "kfac_approx": "expand",
        "ekfac": False,
        "quantization": "int8",
        "damping": "relative",
        "query_measurement": "loss",
    }
    assert K.settings({"family": "kfac", "query_measurement": "elbo"}, config)["query_measurement"] == "elbo"
    got = K.settings({"family": "kfac", "fisher_type": "empirical", "ekfac": True, "quantization": "float32"}, config)
    assert (got["fisher_type"], got["ekfac"], got["quantization"]) == ("empirical", True, "float32")
    assert K.notes({"family": "kfac"}) == {}
    note = K.notes({"family": "kfac", "damping": "absolute", "lambda_grid": [1e-8]})
    assert (
        set(note) == {"generated", "heldout", "extra"} and "1e-08" in note["heldout"] and "not tuned" in note["extra"]
    )
    note = K.notes({"family": "kfac", "query_measurement": "trajectory"})
    assert set(note) == {"heldout", "extra"} and "no sampling trajectory" in note["heldout"]


def test_query_measurement_scores(workflow, tmp_path):
    """query_measurement elbo / trajectory change the query side only: a trajectory method's held-out rows (no
    trajectory: loss gradients) equal the loss method's, its generated rows do not."""
    config, dataset, model_path, tmp = workflow
    out = _mc_expand_file(workflow)
    samples = _generated_samples(config, model_path, tmp_path / "generated.npz")
    inputs = SimpleNamespace(**vars(_inputs(config, dataset, model_path, out)), samples=str(samples))
    ((_, loss),) = _kfac({"family": "kfac", "lambda_grid": [1e-2]}, inputs)
    ((_, elbo),) = _kfac({"family": "kfac", "query_measurement": "elbo", "lambda_grid": [1e-2]}, inputs)
    ((_, traj),) = _kfac({"family": "kfac", "query_measurement": "trajectory", "lambda_grid": [1e-2]}, inputs)
    for name in ("generated", "heldout"):
        assert np.isfinite(elbo[name]).all() and not np.allclose(elbo[name], loss[name])
    np.testing.assert_array_equal(traj["heldout"], loss["heldout"])
    assert np.isfinite(traj["generated"]).all() and not np.allclose(traj["generated"], loss["generated"])


def test_missing_inputs_are_named():
    with pytest.raises(ArtefactError, match="curvature_path"):
        kfac_engine.compute({"family": "kfac"}, SimpleNamespace(config={}, model_path="m.pt"), [1.0])


def _variant_file(workflow, fisher_type="mc", kfac_approx="expand", ekfac=False):
    """The curvature file of one variant of the module's workflow (fitted by the stage entry once)."""
    config, dataset, model_path, tmp = workflow
    out = tmp / "curvature" / f"{format_curvature_variant(fisher_type, kfac_approx, ekfac)}.pt"
    if not out.exists():
        C.run(
            argparse.Namespace(
                model=str(model_path),
                dataset=str(dataset),
                fisher_type=fisher_type,
                kfac_approx=kfac_approx,
                ekfac=ekfac,
                out=str(out),
            ),
            config,
        )
    return out


def test_one_pass_family_equals_each_method_alone(workflow, tmp_path, monkeypatch):
    """The whole K-FAC family in one pass of training gradients (compute_family) gives every method exactly the
    scores it gets alone (compute: the same function with one method), for methods that differ in curvature variant,
    EK-FAC, quantisation, damping (grid and kind) and query measurement, with query groups (kfac.query_batch).
    Tolerance 0: the family only shares inputs (query gradients of one measurement, each training gradient batch); each
    method's own operations run on the same rows in the same order, single-threaded, so they give the same bits on
    any CPU. Still caught: a method scored with another's curvature, lambdas, quantisation or measurement (the methods
    differ pairwise below), or rows of a query group written to the wrong place."""
    config, dataset, model_path, tmp = workflow
    config = {**config, "kfac": {**config["kfac"], "query_batch": 1}}  # 2 + 2 queries: 4 groups, 4 passes
    files = {
        "mc-expand": _variant_file(workflow),
        "mc-reduce": _variant_file(workflow, kfac_approx="reduce"),
        "empirical-expand": _variant_file(workflow, fisher_type="empirical"),
        "mc-expand-ekfac": _variant_file(workflow, ekfac=True),
    }
    samples = _generated_samples(config, model_path, tmp_path / "generated.npz")
    mean = curvature.load_curvature(files["mc-expand"]).mean_eigenvalue()
    grid = [1e-3, 1e-1]
    methods = {  # (method entry, its variant's file)
        "kfac": ({"family": "kfac", "lambda_grid": grid}, "mc-expand"),
        "kfac_reduce": ({"family": "kfac", "kfac_approx": "reduce", "lambda_grid": grid}, "mc-reduce"),
        "kfac_empirical": ({"family": "kfac", "fisher_type": "empirical", "lambda_grid": grid}, "empirical-expand"),
        "ekfac": ({"family": "kfac", "ekfac": True, "lambda_grid": grid}, "mc-expand-ekfac"),
        "kfac_float32": ({"family": "kfac", "quantization": "float32", "lambda_grid": grid}, "mc-expand"),
        "kfac_default_damping": (
            {"family": "kfac", "damping": "absolute", "lambda_grid": [0.01 * mean]},
            "mc-expand",
        ),
        "kfac_elbo": ({"family": "kfac", "query_measurement": "elbo", "lambda_grid": grid}, "mc-expand"),
        "kfac_trajectory": ({"family": "kfac", "query_measurement": "trajectory", "lambda_grid": [1e-2]}, "mc-expand"),
    }
    inputs = {
        m: SimpleNamespace(**vars(_inputs(config, dataset, model_path, files[v])), samples=str(samples))
        for m, (_, v) in methods.items()
    }
    scorer = get_scorer("kfac")
    lambdas = {m: scorer.lambdas(cfg, config) for m, (cfg, _) in methods.items()}
    passes = []
    original = kfac_engine.score_pass
    monkeypatch.setattr(kfac_engine, "score_pass", lambda *a, **kw: passes.append(len(a[4])) or original(*a, **kw))
    family = scorer.compute_methods({m: cfg for m, (cfg, _) in methods.items()}, inputs, lambdas)
    assert passes == [len(methods)] * 4  # one pass per query group, shared by every method
    assert list(family) == list(methods)
    for method, (method_cfg, _) in methods.items():
        alone = scorer.compute(method_cfg, inputs[method], lambdas[method])
        assert [lam for lam, _ in family[method]] == [lam for lam, _ in alone] == lambdas[method]
        for (_, got), (_, want) in zip(family[method], alone):
            assert set(got) == set(want) == {"generated", "heldout"}
            for name in want:
                assert np.isfinite(want[name]).all()
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{method}, {name}")
    # every method's generated scores (at its last lambda) differ from every other's: a swap would be seen above
    generated = {m: family[m][-1][1]["generated"] for m in methods}
    for a in methods:
        for b in methods:
            assert a >= b or not np.array_equal(generated[a], generated[b]), (a, b)
