"""Unit tests of workflow_scripts.data: LDS subset masks and the train / held-out split."""

import numpy as np
import pytest

from workflow_scripts.core import data
from workflow_scripts.core.common import ArtefactError, save_npz

LDS = {"n_subsets": 12, "n_tuning": 4, "fraction": 0.5, "n_seeds": 2, "bootstrap_samples": 10, "ci": 0.9}


@pytest.mark.parametrize("n_train, fraction", [(40, 0.5), (41, 0.5), (43, 0.3), (10, 0.75), (7, 0.5)])
def test_subset_sizes_are_round_fraction_n(n_train, fraction):
    subsets = data.make_subsets(n_train, {**LDS, "fraction": fraction}, subsets_seed=1)
    masks = subsets["masks"]
    assert masks.shape == (LDS["n_subsets"], n_train)
    assert masks.dtype == bool
    np.testing.assert_array_equal(masks.sum(1), round(fraction * n_train))


def test_subsets_differ_from_each_other():
    masks = data.make_subsets(40, LDS, 1)["masks"]
    assert len({m.tobytes() for m in masks}) == len(masks)


def test_tuning_and_evaluation_partition_the_subsets():
    subsets = data.make_subsets(40, LDS, 1)
    tuning, evaluation = subsets["tuning"], subsets["evaluation"]
    assert len(tuning) == LDS["n_tuning"]
    assert set(tuning).isdisjoint(evaluation)
    assert sorted(np.concatenate([tuning, evaluation]).tolist()) == list(range(LDS["n_subsets"]))
    # the first n_tuning subsets tune, the rest evaluate
    np.testing.assert_array_equal(tuning, np.arange(LDS["n_tuning"]))


def test_subsets_are_deterministic_per_seed():
    a = data.make_subsets(40, LDS, 3)
    b = data.make_subsets(40, LDS, 3)
    for key in ("masks", "tuning", "evaluation"):
        np.testing.assert_array_equal(a[key], b[key])
    c = data.make_subsets(40, LDS, 4)
    assert not np.array_equal(a["masks"], c["masks"])


def test_subset_membership_is_roughly_balanced():
    # each example is in each subset with probability `fraction`: no example always in or always out
    masks = data.make_subsets(20, {**LDS, "n_subsets": 200, "n_tuning": 2}, 0)["masks"]
    freq = masks.mean(0)
    assert np.all((freq > 0.3) & (freq < 0.7)), freq


@pytest.fixture(scope="module")
def dataset():
    return data.make_dataset({"dataset": "digits", "n_train": 50, "n_heldout": 10}, split_seed=0)


def test_split_sizes_and_disjoint(dataset):
    assert dataset["train_images"].shape == (50, 1, 8, 8)
    assert dataset["heldout_images"].shape == (10, 1, 8, 8)
    assert dataset["train_images"].dtype == np.float32
    assert len(dataset["train_labels"]) == 50 and len(dataset["heldout_labels"]) == 10
    train, held = dataset["train_index"], dataset["heldout_index"]
    assert len(set(train.tolist())) == 50 and len(set(held.tolist())) == 10
    assert set(train.tolist()).isdisjoint(held.tolist())


def test_split_images_match_their_source_index(dataset):
    images, labels = data.load_digits_images()
    np.testing.assert_array_equal(dataset["train_images"], images[dataset["train_index"]])
    np.testing.assert_array_equal(dataset["heldout_images"], images[dataset["heldout_index"]])
    np.testing.assert_array_equal(dataset["train_labels"], labels[dataset["train_index"]])


def test_images_scaled_to_minus_one_one():
    from sklearn.datasets import load_digits

    images, labels = data.load_digits_images()
    raw = load_digits()
    assert images.shape == (1797, 1, 8, 8)
    assert images.min() == -1.0 and images.max() == 1.0
    np.testing.assert_allclose(images[:, 0], raw.images / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels, raw.target)


def test_split_is_deterministic_per_seed():
    cfg = {"dataset": "digits", "n_train": 30, "n_heldout": 5}
    a, b, c = data.make_dataset(cfg, 7), data.make_dataset(cfg, 7), data.make_dataset(cfg, 8)
    np.testing.assert_array_equal(a["train_index"], b["train_index"])
    np.testing.assert_array_equal(a["heldout_index"], b["heldout_index"])
    assert not np.array_equal(a["train_index"], c["train_index"])


def test_load_round_trip_and_missing_file(tmp_path):
    subsets = data.make_subsets(20, LDS, 0)
    save_npz(tmp_path / "subsets.npz", **subsets)
    loaded = data.load_subsets(tmp_path / "subsets.npz")
    np.testing.assert_array_equal(loaded["masks"], subsets["masks"])
    with pytest.raises(ArtefactError, match="missing"):
        data.load_subsets(tmp_path / "nope.npz")
    save_npz(tmp_path / "partial.npz", masks=subsets["masks"])
    with pytest.raises(ArtefactError, match="tuning"):
        data.load_subsets(tmp_path / "partial.npz")
