"""CLIP scorer (scorers/clip.py): a tiny random open_clip model saved as the "weights" file, checked
against embeddings computed by hand, and the no-weights path (ScorerNotRun, no numbers). The
classifier-embedding scorer (scorers/embedding.py) is tested in test_classifier.py."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import FakeInputs

from workflow_scripts.core.common import ArtefactError

torch.set_num_threads(1)

open_clip = pytest.importorskip("open_clip")

from workflow_scripts.scorers import clip  # noqa: E402

TINY_CLIP = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 4, "vocab_size": 16, "width": 8, "heads": 1, "layers": 1},
}
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def images(n, seed):
    return (np.random.default_rng(seed).random((n, 1, 8, 8)) * 2 - 1).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny CLIP saved like real weights: model-config JSON + state-dict file."""
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    net = open_clip.CLIP(**TINY_CLIP).eval()
    torch.save(net.state_dict(), root / "tiny.pt")
    (root / "tiny.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": MEAN, "std": STD}}))
    return net, str(root / "tiny.json"), str(root / "tiny.pt")


def by_hand(net, x, mean=MEAN, std=STD):
    """Embeddings written out: [-1,1] -> [0,1], bilinear to 16x16, 3 channels, normalise, encode."""
    with torch.no_grad():
        x = (torch.from_numpy(x) + 1) / 2
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        return net.encode_image(x).double().numpy()


@pytest.mark.parametrize("kind", ["dot", "cosine"])
def test_clip_matches_direct_formula(tiny_clip, kind):
    net, config_path, weights = tiny_clip
    train, queries = images(7, 1), {"generated": images(3, 2), "heldout": images(2, 3)}
    cfg = {"family": "clip", "similarity": kind, "model": config_path, "weights": weights, "batch_size": 4}
    [(lam, matrices)] = clip.compute(cfg, FakeInputs(train, queries), [0.1, 1.0])
    assert lam is None and set(matrices) == set(queries)
    e_train = by_hand(net, train)
    if kind == "cosine":
        e_train /= np.linalg.norm(e_train, axis=1, keepdims=True)
    for name, q in queries.items():
        e_q = by_hand(net, q)
        if kind == "cosine":
            e_q /= np.linalg.norm(e_q, axis=1, keepdims=True)
        assert matrices[name].dtype == np.float32 and matrices[name].shape == (len(q), len(train))
        np.testing.assert_allclose(matrices[name], e_q @ e_train.T, rtol=1e-4, atol=1e-5)
    if kind == "cosine":
        assert np.abs(matrices["generated"]).max() <= 1 + 1e-5


def test_clip_registered_model_name(tiny_clip, tmp_path):
    """A model NAME goes through open_clip.create_model with the weights file (OpenAI mean / std)."""
    net, _, weights = tiny_clip
    assert (clip.OPENAI_MEAN, clip.OPENAI_STD) == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    (tmp_path / "tinyclip-test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "tinyclip-test.json")
    train, queries = images(5, 4), {"heldout": images(2, 5)}
    cfg = {"family": "clip", "similarity": "dot", "model": "tinyclip-test", "weights": weights}
    [(_, matrices)] = clip.compute(cfg, FakeInputs(train, queries), [1.0])
    expected = (
        by_hand(net, queries["heldout"], clip.OPENAI_MEAN, clip.OPENAI_STD)
        @ by_hand(net, train, clip.OPENAI_MEAN, clip.OPENAI_STD).T
    )
    np.testing.assert_allclose(matrices["heldout"], expected, rtol=1e-4, atol=1e-5)


def test_clip_preprocess_constant_image():
    """Black (-1) and white (+1) images map to (0 - mean) / std and (1 - mean) / std per channel."""
    x = np.stack([np.full((1, 8, 8), -1.0), np.full((1, 8, 8), 1.0)]).astype(np.float32)
    out = clip.preprocess(x, 24, MEAN, STD)
    assert out.shape == (2, 3, 24, 24)
    for c in range(3):
        np.testing.assert_allclose(out[0, c].numpy(), (0 - MEAN[c]) / STD[c], rtol=1e-6)
        np.testing.assert_allclose(out[1, c].numpy(), (1 - MEAN[c]) / STD[c], rtol=1e-6)


@pytest.mark.parametrize("weights", [None, "", "missing.pt"])
def test_clip_without_weights_is_not_run(tmp_path, weights):
    class NoData:  # reading any data would be a bug: no weights, no numbers
        def train_images(self):
            raise AssertionError("read training images")

        def queries(self):
            raise AssertionError("read queries")

    cfg = {
        "family": "clip",
        "similarity": "cosine",
        "model": "ViT-B-32",
        "weights": None if weights is None else (weights and str(tmp_path / weights)),
    }
    with pytest.raises(clip.ScorerNotRun) as info:
        clip.compute(cfg, NoData(), [1.0])
    assert info.value.reason == "not run: no CLIP weights"
    assert str(info.value).startswith("not run: no CLIP weights")


def test_clip_wrong_weights_is_an_error(tiny_clip, tmp_path):
    """Weights that exist but do not fit the model are a broken artefact, not a skip."""
    _, config_path, _ = tiny_clip
    other = dict(TINY_CLIP, embed_dim=4)
    torch.save(open_clip.CLIP(**other).state_dict(), tmp_path / "other.pt")
    cfg = {"family": "clip", "similarity": "dot", "model": config_path, "weights": str(tmp_path / "other.pt")}
    with pytest.raises(ArtefactError, match="do not load"):
        clip.compute(cfg, FakeInputs(images(2, 0), {"heldout": images(1, 1)}), [1.0])
