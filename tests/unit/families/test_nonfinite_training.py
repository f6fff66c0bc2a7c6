"""Training stops at the first non-finite loss, naming the step and the learning rate to lower, in every training
loop: the ddpm and vesde families, the embedding classifier and the latent family's miniature base (the latent
LoRA fine-tuning: tests/unit/families/test_latent.py). Without the check, a learning rate of 10 (schema-valid)
trained an all-NaN model with exit 0."""

import copy
import re

import numpy as np
import pytest
import torch
from fakes import TINY_MODEL

from workflow_scripts.core import classifier, data
from workflow_scripts.core.common import NonFiniteError, load_torch
from workflow_scripts.families import ddpm, latent_miniature
from workflow_scripts.families import vesde as V

torch.set_num_threads(1)
CPU = torch.device("cpu")
STEP = re.compile(r"at step (\d+) of (\d+)")


@pytest.fixture(scope="module")
def config(smoke_config):
    cfg = copy.deepcopy(smoke_config)
    cfg["train"].update(steps=20, batch_size=8, lr=10.0, warmup_fraction=0.0, resume_every=20, checkpoint_every=20)
    cfg["compute"].update(device="cpu", threads=1)
    return cfg


@pytest.fixture(scope="module")
def images():
    return data.load_digits_images()[0][:16]


def _step(error) -> int:
    match = STEP.search(str(error.value))
    assert match, str(error.value)
    return int(match.group(1))


def test_ddpm_lr_10_diverges_without_the_check(config, images, tmp_path, monkeypatch):
    """The fault itself: with the check disabled, lr 10 ends in a model whose weights are NaN."""
    monkeypatch.setattr(ddpm, "check_training_loss", lambda *args: None)
    out = ddpm.train_model(config, images, np.arange(16), 0, tmp_path / "model.pt", device=CPU)
    state = load_torch(out)["state_dict"]
    assert not all(torch.isfinite(v).all() for v in state.values())


def test_ddpm_training_stops_at_the_first_non_finite_loss(config, images, tmp_path):
    out = tmp_path / "model.pt"
    with pytest.raises(NonFiniteError, match=r"model\.pt: the training loss is nan at step \d+ of 20") as error:
        ddpm.train_model(config, images, np.arange(16), 0, out, device=CPU)
    assert "learning rate too high (train.lr = 10)" in str(error.value)
    assert not out.exists()  # no NaN model for the later stages to read
    # the first: every loss before the named step is finite (training stopped before it, no error)
    step = _step(error)
    assert 1 < step <= 20
    assert ddpm.train_model(config, images, np.arange(16), 0, out, device=CPU, stop_after=step - 1) is None


def test_a_reasonable_learning_rate_trains_to_the_end(config, images, tmp_path):
    cfg = copy.deepcopy(config)
    cfg["train"].update(lr=1e-3, steps=4)
    assert ddpm.train_model(cfg, images, np.arange(16), 0, tmp_path / "model.pt", device=CPU).exists()


def test_vesde_training_stops_at_the_first_non_finite_loss(config, tmp_path):
    cfg = copy.deepcopy(config)
    cfg["model"] = {**TINY_MODEL, "family": "vesde"}
    cfg["train"].update(lr=1e6, steps=20, batch_size=4)
    x = (np.random.default_rng(0).integers(0, 17, (10, 1, 8, 8)) / 8.0 - 1).astype(np.float32)
    with pytest.raises(NonFiniteError, match=r"vesde training of .*v\.pt: the training loss is .* at step") as error:
        V.train_vesde(cfg, x, np.arange(10), 0, model_out=tmp_path / "v.pt", device=CPU)
    assert "train.lr = 1e+06" in str(error.value) and 1 < _step(error) <= 20
    assert not (tmp_path / "v.pt").exists()


def test_classifier_training_stops_at_the_first_non_finite_loss(images):
    cfg = {
        "channels": [4, 8],
        "feature_dim": 8,
        "steps": 30,
        "batch_size": 8,
        "lr": 1e8,
        "weight_decay": 0.0,
        "augment_shift": 0,
    }
    labels = data.load_digits_images()[1][:16]
    with pytest.raises(
        NonFiniteError,
        match=r"the embedding classifier: the training loss .*at step \d+ of 30.*\(classifier\.lr = 1e\+08",
    ):
        classifier.train_classifier(cfg, 0, images, labels)


def test_miniature_base_training_stops_at_the_first_non_finite_loss(tmp_path):
    config = {
        "seeds": {"train": 2},
        "diffusion": {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
        "base": {"vae_steps": 10, "unet_steps": 10, "vae_channels": [8, 16], "unet_channels": [8, 16], "lr": 1e8},
        "compute": {"device": "cpu", "threads": 1},
    }
    digits, labels = data.load_digits_images()
    with pytest.raises(
        NonFiniteError, match=r"the miniature base's (VAE|UNet): .* at step \d+ of 10.*base\.lr = 1e\+08"
    ):
        latent_miniature.build_and_pretrain(config, digits[:32], labels[:32], tmp_path / "base")
    assert not (tmp_path / "base").exists()
