"""The classifier stage (small CNN on the digits) and the classifier-embedding scorer."""

import argparse

import numpy as np
import pytest
import torch
from fakes import FakeInputs

from workflow_scripts.core import classifier
from workflow_scripts.core.common import ArtefactError, load_torch, save_npz, save_torch
from workflow_scripts.core.data import load_digits_images
from workflow_scripts.scorers import get_scorer
from workflow_scripts.stages import classifier as classifier_mod

torch.set_num_threads(1)

FAST = {**classifier.DEFAULTS, "steps": 200}  # default architecture, shorter training
SEED = 8


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits_images()
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:300], order[300:800]
    return images[train], labels[train], images[test], labels[test]


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    x, y, _, _ = digits
    model, payload = classifier.train_classifier(FAST, SEED, x, y)
    path = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    save_torch(payload, path)
    return model, payload, path


def test_classifier_learns(digits, trained):
    _, _, x_test, y_test = digits
    model, payload, _ = trained
    assert payload["metrics"]["train_accuracy"] > 0.9
    assert classifier.accuracy(model, x_test, y_test) > 0.8  # 500 held-out digits, 300 training images


def test_classifier_is_deterministic(digits, trained):
    x, y, _, _ = digits
    cfg = {**FAST, "steps": 20}
    _, a = classifier.train_classifier(cfg, SEED, x, y)
    _, b = classifier.train_classifier(cfg, SEED, x, y)
    _, c = classifier.train_classifier(cfg, SEED + 1, x, y)
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0)
    assert not torch.equal(a["state_dict"]["fc.weight"], c["state_dict"]["fc.weight"])


def test_checkpoint_roundtrip_and_mismatch_refused(digits, trained, tmp_path):
    x, y, _, _ = digits
    model, payload, path = trained
    expected = classifier.identity(FAST, SEED, x, y)
    loaded, _ = classifier.load_classifier(path, expected=expected, train_images=x)
    np.testing.assert_array_equal(classifier.embed(loaded, x[:5]), classifier.embed(model, x[:5]))
    with pytest.raises(ArtefactError, match="different configuration.*classifier"):
        classifier.load_classifier(path, expected=classifier.identity({**FAST, "lr": 0.01}, SEED, x, y))
    with pytest.raises(ArtefactError, match="seed"):
        classifier.load_classifier(path, expected=classifier.identity(FAST, SEED + 1, x, y))
    with pytest.raises(ArtefactError, match="other images"):
        classifier.load_classifier(path, train_images=x[::-1].copy())
    save_torch({"kind": "ddpm-unet"}, tmp_path / "unet.pt")
    with pytest.raises(ArtefactError, match="not a classifier"):
        classifier.load_classifier(tmp_path / "unet.pt")
    broken = load_torch(path)
    broken["identity"]["classifier"]["feature_dim"] = 7  # says 7, weights have 128
    save_torch(broken, tmp_path / "broken.pt")
    with pytest.raises(ArtefactError, match="does not fit"):
        classifier.load_classifier(tmp_path / "broken.pt")


@pytest.mark.parametrize("kind", ["dot", "cosine"])
def test_embedding_scorer_matches_direct_formula(digits, trained, kind):
    x, _, x_test, _ = digits
    model, _, path = trained
    train, queries = x[:40], {"generated": x_test[:5], "heldout": x_test[5:8]}
    # the checkpoint was trained on all of x: the scorer's data check must see the same images
    inputs = FakeInputs(x, queries, classifier_path=str(path))
    [(lam, matrices)] = get_scorer("embedding").compute({"family": "embedding", "similarity": kind}, inputs, [1.0])
    assert lam is None
    with torch.no_grad():
        f_train = model.features(torch.from_numpy(x)).double().numpy()
        for name, q in queries.items():
            f_q = model.features(torch.from_numpy(q)).double().numpy()
            if kind == "cosine":
                f_q = f_q / np.linalg.norm(f_q, axis=1, keepdims=True)
                f_t = f_train / np.linalg.norm(f_train, axis=1, keepdims=True)
            else:
                f_t = f_train
            assert matrices[name].shape == (len(q), len(x)) and matrices[name].dtype == np.float32
            np.testing.assert_allclose(matrices[name], f_q @ f_t.T, rtol=1e-4, atol=1e-4)
    # features are the penultimate layer: logits = head(features)
    with torch.no_grad():
        torch.testing.assert_close(model.head(model.features(torch.from_numpy(train))), model(torch.from_numpy(train)))


def test_embedding_scorer_needs_and_checks_classifier(digits, trained):
    x, _, x_test, _ = digits
    _, _, path = trained
    with pytest.raises(ArtefactError, match="classifier_path"):
        get_scorer("embedding").compute(
            {"family": "embedding", "similarity": "dot"}, FakeInputs(x, {"heldout": x_test[:2]}), [1.0]
        )
    other = FakeInputs(x[:100], {"heldout": x_test[:2]}, classifier_path=str(path))
    with pytest.raises(ArtefactError, match="other images"):
        get_scorer("embedding").compute({"family": "embedding", "similarity": "dot"}, other, [1.0])


def test_stage_run_writes_checkpoint(tmp_path, digits, caplog):
    x, y, x_test, y_test = digits
    save_npz(
        tmp_path / "dataset.npz",
        train_images=x[:120],
        train_labels=y[:120],
        heldout_images=x_test[:30],
        heldout_labels=y_test[:30],
    )
    parser = argparse.ArgumentParser()
    classifier_mod.add_arguments(parser)
    args = parser.parse_args(["--dataset", str(tmp_path / "dataset.npz"), "--out", str(tmp_path / "c.pt")])
    config = {
        "classifier": {"channels": [8, 16], "feature_dim": 16, "steps": 30},
        "seeds": {"classifier": SEED},
        "compute": {"device": "cpu", "threads": 1},
    }
    with caplog.at_level("INFO", logger="workflow_scripts"):
        classifier_mod.run(args, config)
    assert "held-out accuracy" in caplog.text
    payload = load_torch(tmp_path / "c.pt")
    assert 0 <= payload["metrics"]["heldout_accuracy"] <= 1
    expected = classifier.identity(classifier.classifier_config(config), SEED, x[:120], y[:120])
    classifier.load_classifier(tmp_path / "c.pt", expected=expected, train_images=x[:120])
    with pytest.raises(ValueError, match="unknown keys"):
        classifier.classifier_config({"classifier": {"epochs": 3}})
    with pytest.raises(ValueError, match="seeds.classifier"):
        classifier_mod.run(args, {**config, "seeds": {}})
