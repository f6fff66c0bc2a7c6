"""NaN and infinity are refused where they are made, naming the artefact: sampled images (stage sample),
measurements (stage measure), gradient stores (core/store.new_store, every store the gradients stage writes) and
scores (stage scores: method, query set, lambda). Before, a NaN model's values flowed on and ended in errors such
as "no query has scores" that pointed nowhere near the cause."""

import argparse
import copy

import numpy as np
import pytest
import torch

from workflow_scripts.core import data
from workflow_scripts.core.common import NonFiniteError, load_torch, save_torch
from workflow_scripts.core.store import new_store, write_store
from workflow_scripts.families.ddpm import train_model
from workflow_scripts.stages import data as data_stage
from workflow_scripts.stages import measure, sample
from workflow_scripts.stages.scores import check_scores

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stage(tmp_path_factory, smoke_config):
    """A 2-step model, a copy of it whose weights are NaN (a diverged model), the dataset and generated samples."""
    tmp = tmp_path_factory.mktemp("nonfinite")
    config = copy.deepcopy(smoke_config)
    config["data"].update({"n_train": 12, "n_heldout": 3})
    config["train"].update({"steps": 2, "resume_every": 2})
    config["compute"] = {"device": "cpu", "threads": 1}
    config["sample"].update({"n_generated": 2, "num_inference_steps": 3})
    config["measure"].update({"n_timesteps": 4, "n_noise": 1, "batch_size": 16, "measurements": ["loss"]})
    dataset = tmp / "dataset.npz"
    data_stage.run(argparse.Namespace(dataset_out=dataset, subsets_out=tmp / "subsets.npz"), config)
    images = data.load_dataset(dataset)["train_images"]
    good = train_model(config, images, np.arange(len(images)), 0, tmp / "model.pt")
    payload = load_torch(good)
    payload["state_dict"] = {k: torch.full_like(v, float("nan")) for k, v in payload["state_dict"].items()}
    bad = tmp / "diverged.pt"
    save_torch(payload, bad)
    samples = tmp / "generated.npz"
    sample.run(argparse.Namespace(model=str(good), out=str(samples)), config)
    return config, dataset, samples, good, bad, tmp


def test_sampling_from_a_nan_model_is_refused_naming_the_files(stage):
    config, _, _, _, bad, tmp = stage
    out = tmp / "nan_samples.npz"
    with pytest.raises(NonFiniteError, match=r"nan_samples\.npz: the images sampled from .*diverged\.pt: \d+ of \d+"):
        sample.run(argparse.Namespace(model=str(bad), out=str(out)), config)
    assert not out.exists()


def test_measuring_with_a_nan_model_is_refused_naming_the_measurement(stage):
    config, dataset, samples, _, bad, tmp = stage
    out = tmp / "nan_measure.npz"
    args = argparse.Namespace(
        model=str(bad), dataset=str(dataset), samples=str(samples), subset=0, replicate=0, extra_queries=None
    )
    with pytest.raises(NonFiniteError, match=r"nan_measure\.npz: measurement generated of .*diverged\.pt") as error:
        measure.run(argparse.Namespace(**vars(args), out=str(out)), config)
    assert "train.lr too high" in str(error.value)
    assert not out.exists()


def test_the_healthy_model_samples_and_measures(stage):
    config, dataset, samples, good, _, tmp = stage
    out = tmp / "measure.npz"
    args = argparse.Namespace(
        model=str(good), dataset=str(dataset), samples=str(samples), subset=0, replicate=0, extra_queries=None
    )
    measure.run(argparse.Namespace(**vars(args), out=str(out)), config)
    assert np.isfinite(np.load(out)["generated"]).all()


def _identity(shape):
    return {"split": "train", "shape": list(shape), "dtype": "float32", "config_hash": "x", "made_by": {}}


def test_a_gradient_store_with_nan_is_refused_and_not_written(tmp_path):
    path = tmp_path / "final" / "train.npy"
    with pytest.raises(NonFiniteError, match=r"gradient store .*final/train\.npy: 1 of 40 values .* row 3"):
        with new_store(_identity((10, 4)), path) as store:  # filled batch by batch, as the gradients stage does
            store[:] = 1.0
            store[3, 2] = np.nan
    assert not path.exists() and not path.with_suffix(".json").exists()
    assert list(path.parent.iterdir()) == []  # no temporary file left behind


def test_a_gradient_store_with_infinity_is_refused(tmp_path):
    features = np.ones((5, 3), np.float32)
    features[4, 0] = np.inf
    with pytest.raises(NonFiniteError, match=r"residual\.npy: 1 of 15 values are NaN or infinite \(first in row 4\)"):
        write_store(features, _identity((5, 3)), tmp_path / "residual.npy")


def test_a_finite_gradient_store_is_written(tmp_path):
    write_store(np.ones((5, 3), np.float32), _identity((5, 3)), tmp_path / "train.npy")
    assert (tmp_path / "train.npy").exists()


def test_scores_that_are_all_nan_are_refused_naming_method_query_set_and_lambda():
    finite = np.ones((3, 5))
    with pytest.raises(NonFiniteError, match=r"scores of method trak for the heldout queries, lambda 0\.01: every"):
        check_scores("trak", [(1.0, {"generated": finite}), (0.01, {"generated": finite, "heldout": finite * np.nan})])


def test_scores_with_infinity_are_refused():
    scores = np.ones((3, 5))
    scores[1, 2] = -np.inf
    with pytest.raises(
        NonFiniteError, match=r"scores of method das_vector for the generated queries: score rows \[1\]"
    ):
        check_scores("das_vector", [(None, {"generated": scores})])


def test_nan_rows_of_queries_not_scored_are_accepted():
    """The metagradient scores only its first max_queries queries; the other rows are NaN by design."""
    scores = np.ones((3, 5))
    scores[1:] = np.nan
    check_scores("metagradient", [(None, {"generated": scores})])
