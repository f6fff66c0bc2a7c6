"""Mixed-precision training (compute.amp, precision.Precision) on CPU: bf16 / fp16 autocast train (finite, falling
loss), the default float32 path is the former code bit for bit, and an fp16 run resumes exactly (GradScaler state)."""

import copy

import numpy as np
import pytest
import torch

from workflow_scripts.core import data, precision, seeds
from workflow_scripts.core.common import load_torch, rng
from workflow_scripts.families import ddpm as train
from workflow_scripts.families.ddpm import alphas_cumprod, build_model, load_model, measurement_draws, simple_loss

torch.set_num_threads(1)
CPU = torch.device("cpu")
MEMBERS = np.arange(64)


@pytest.fixture(scope="module")
def config(smoke_config):
    cfg = copy.deepcopy(smoke_config)
    cfg["train"].update(steps=40, resume_every=20, batch_size=16, lr=3e-3, warmup_fraction=0.05)
    cfg["compute"].update(device="cpu", threads=1)
    return cfg


@pytest.fixture(scope="module")
def images():
    return data.load_digits_images()[0][:64]


def with_amp(config, amp):
    cfg = copy.deepcopy(config)
    if amp is not None:
        cfg["compute"]["amp"] = amp
    return cfg


def fixed_loss(model, cfg, images):
    """Mean simple loss of the training images at fixed (t, eps) draws, in float32."""
    t, eps = measurement_draws(len(images), images.shape[1:], 20, 2, cfg["diffusion"]["num_train_timesteps"], 0, 0)
    a_bar, x = alphas_cumprod(cfg["diffusion"]), torch.from_numpy(images)
    with torch.no_grad():
        return float(
            torch.stack(
                [simple_loss(model, x, t[k].repeat(len(x)), eps[:, k], a_bar).mean() for k in range(0, len(t), 4)]
            ).mean()
        )


def initial_model(cfg, images):
    torch.manual_seed(int(rng(seeds.training_seed(cfg, 0), seeds.INIT_STREAM).integers(2**31)))
    return build_model(cfg["model"], images.shape[1:])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains(config, images, tmp_path, amp):
    cfg = with_amp(config, amp)
    out = train.train_model(cfg, images, MEMBERS, 0, tmp_path / "model.pt", device=CPU)
    model, payload = load_model(out, cfg["model"])
    assert payload["config"]["amp"] == amp  # recorded in the checkpoint's identity
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())
    before, after = fixed_loss(initial_model(cfg, images), cfg, images), fixed_loss(model, cfg, images)
    assert np.isfinite(after) and after < 0.7 * before, (before, after)
    # and it is really another computation than float32
    reference, _ = load_model(
        train.train_model(config, images, MEMBERS, 0, tmp_path / "f32.pt", device=CPU), cfg["model"]
    )
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_float32_is_the_default_and_unchanged(config, images, tmp_path):
    """Absent compute.amp and amp: float32 run the same code: identical parameters bit for bit, same identity."""
    a = train.train_model(with_amp(config, None), images, MEMBERS, 0, tmp_path / "a.pt", device=CPU)
    b = train.train_model(with_amp(config, "float32"), images, MEMBERS, 0, tmp_path / "b.pt", device=CPU)
    sa, sb = load_torch(a), load_torch(b)
    assert "amp" not in sa["config"] and sa["config"] == sb["config"]
    assert all(torch.equal(sa["state_dict"][k], sb["state_dict"][k]) for k in sa["state_dict"])


def test_fp16_resume_reproduces_uninterrupted_run(config, images, tmp_path):
    cfg = with_amp(config, "fp16")
    full = load_torch(train.train_model(cfg, images, MEMBERS, 0, tmp_path / "full" / "model.pt", device=CPU))
    out = tmp_path / "resumed" / "model.pt"
    assert train.train_model(cfg, images, MEMBERS, 0, out, device=CPU, stop_after=30) is None
    assert "scaler" in load_torch(out.with_name("model.resume.pt"))  # the loss scale survives the interruption
    resumed = load_torch(train.train_model(cfg, images, MEMBERS, 0, out, device=CPU))
    assert all(torch.equal(full["state_dict"][k], resumed["state_dict"][k]) for k in full["state_dict"])


def test_unknown_amp_is_refused():
    with pytest.raises(ValueError, match="compute.amp must be"):
        precision.Precision("fp8", CPU)
