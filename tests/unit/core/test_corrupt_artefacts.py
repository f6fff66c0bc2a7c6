"""Truncated or garbled artefacts (a gradient store, its sidecar, a score matrix, chosen.json): the error names the
file and the rule that remakes it, instead of a traceback from numpy or json that names nothing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.core.common import ArtefactError
from workflow_scripts.core.store import open_store, read_sidecar, reusable, write_store
from workflow_scripts.stages import counterfactual, evaluate, figures

IDENTITY = {"split": "train", "shape": [8, 16], "dtype": "float32", "config_hash": "abc", "made_by": {}}


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "gradients" / "full" / "loss_avg_K10_gaussian32" / "train.npy"
    write_store(np.ones((8, 16), np.float32), IDENTITY, path)
    return path


def assert_names(info, path, rule: str) -> None:
    message = str(info.value)
    assert str(path) in message, message
    assert f"rule {rule}" in message, message


def test_truncated_store_names_it_and_its_rule(store):
    truncate(store)
    with pytest.raises(ArtefactError) as info:
        open_store(store)
    assert_names(info, store, "gradients")
    assert "truncated or corrupt" in str(info.value)
    assert not reusable(store, IDENTITY)  # the gradients stage recomputes it rather than failing


def test_truncated_header_of_a_store(store):
    truncate(store, keep=0.01)
    with pytest.raises(ArtefactError) as info:
        open_store(store)
    assert_names(info, store, "gradients")


def test_broken_sidecar_names_it_and_its_rule(store):
    sidecar = store.with_suffix(".json")
    truncate(sidecar)
    with pytest.raises(ArtefactError) as info:
        read_sidecar(store)
    assert_names(info, sidecar, "gradients")
    with pytest.raises(ArtefactError):
        open_store(store)
    assert not reusable(store, IDENTITY)


def test_sidecar_without_its_keys(store):
    sidecar = store.with_suffix(".json")
    sidecar.write_text(json.dumps({"split": "train"}))
    with pytest.raises(ArtefactError) as info:
        read_sidecar(store)
    assert_names(info, sidecar, "gradients")
    assert "shape" in str(info.value)


def test_measurement_and_journey_stores_name_their_own_rules(tmp_path):
    for directory, rule in [
        ("loss_avg_K10_gaussian32/measurement_elbo", "gradients_measurement"),
        ("loss_journey_K5_gaussian32", "gradients_journey"),
    ]:
        path = tmp_path / directory / "generated.npy"
        write_store(np.ones((8, 16), np.float32), {**IDENTITY, "split": "generated"}, path)
        path.with_suffix(".json").write_text("{")
        with pytest.raises(ArtefactError) as info:
            open_store(path)
        assert_names(info, path.with_suffix(".json"), rule)


def score_dir(tmp_path, n_query: int = 3, n_train: int = 10):
    directory = tmp_path / "scores" / "trak"
    directory.mkdir(parents=True)
    chosen = {"method": "trak", "config": {"family": "trak"}, "lambda": 0.1, "notes": {}, "settings": {}}
    (directory / "chosen.json").write_text(json.dumps(chosen))
    rng = np.random.default_rng(0)
    for query_set in ("generated", "heldout"):
        np.save(directory / f"{query_set}.npy", rng.normal(size=(n_query, n_train)).astype(np.float32))
    pd.DataFrame(
        [{"lambda": 0.1, "query_set": q, "lds_tuning": 0.0, "lds_evaluation": 0.0} for q in ("generated", "heldout")]
    ).to_csv(directory / "sweep.csv", index=False)
    return directory


def lds_inputs(n_query: int = 3, n_train: int = 10, n_subsets: int = 6):
    rng = np.random.default_rng(1)
    masks = rng.random((n_subsets, n_train)) < 0.5
    targets = {q: rng.normal(size=(n_subsets, 2, n_query)) for q in ("generated", "heldout")}
    return {"masks": masks, "evaluation": np.arange(2, n_subsets), "tuning": np.arange(2)}, targets


@pytest.mark.parametrize("broken", ["generated.npy", "chosen.json"])
def test_evaluate_names_a_broken_score_file(tmp_path, broken):
    directory = score_dir(tmp_path)
    subsets, targets = lds_inputs()
    evaluate.lds_table({"trak": directory}, subsets, targets, {"bootstrap_samples": 10, "ci": 0.95}, seed=0)  # intact
    truncate(directory / broken)
    with pytest.raises(ArtefactError) as info:
        evaluate.lds_table({"trak": directory}, subsets, targets, {"bootstrap_samples": 10, "ci": 0.95}, seed=0)
    assert_names(info, directory / broken, "scores")


@pytest.mark.parametrize("broken", ["generated.npy", "chosen.json"])
def test_counterfactual_names_a_broken_score_file(tmp_path, broken):
    directory = score_dir(tmp_path)
    assert counterfactual.load_generated_scores(directory, "trak").shape == (3, 10)
    truncate(directory / broken)
    with pytest.raises(ArtefactError) as info:
        counterfactual.load_generated_scores(directory, "trak")
    assert_names(info, directory / broken, "scores")


def test_figures_name_a_garbled_chosen_json(tmp_path):
    directory = score_dir(tmp_path)
    (directory / "chosen.json").write_bytes(b"\x00\xff garbage")
    with pytest.raises(ArtefactError) as info:
        figures.load_sweeps({"trak": directory})
    assert_names(info, directory / "chosen.json", "scores")


def test_figures_name_a_truncated_score_matrix(tmp_path):
    directory = score_dir(tmp_path)
    truncate(directory / "generated.npy")
    with pytest.raises(ArtefactError) as info:
        figures.load_scores({"trak": directory}, ["trak"])
    assert_names(info, directory / "generated.npy", "scores")
