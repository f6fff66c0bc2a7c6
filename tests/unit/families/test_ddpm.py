"""Unit tests of workflow_scripts.families.ddpm against hand-written DDPM formulas."""

import numpy as np
import pytest
import torch
from fakes import TINY_MODEL

from workflow_scripts.core.common import ArtefactError, save_torch
from workflow_scripts.families import ddpm as diffusion

torch.set_num_threads(1)

DIFFUSION = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}
SHAPE = (1, 8, 8)


def hand_alphas_cumprod(T=1000, start=1e-4, end=0.02) -> np.ndarray:
    betas = np.array([start + (end - start) * s / (T - 1) for s in range(T)], dtype=np.float64)
    out = np.empty(T)
    running = 1.0
    for s in range(T):
        running *= 1.0 - betas[s]
        out[s] = running
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return diffusion.build_model(TINY_MODEL, SHAPE).eval()


def test_alphas_cumprod_matches_hand_formula():
    a_bar = diffusion.alphas_cumprod(DIFFUSION)
    assert a_bar.dtype == torch.float32 and a_bar.shape == (1000,)
    expected = hand_alphas_cumprod()
    np.testing.assert_allclose(a_bar.numpy(), expected, rtol=1e-4)
    # spot values: a_bar_0 = 1 - beta_0, strictly decreasing, tiny at T-1
    assert a_bar[0].item() == pytest.approx(1 - 1e-4, rel=1e-7)
    assert torch.all(a_bar[1:] < a_bar[:-1])
    assert a_bar[-1].item() == pytest.approx(expected[-1], rel=1e-4) and expected[-1] < 1e-4


def test_alphas_cumprod_other_schedule():
    cfg = {"num_train_timesteps": 50, "beta_start": 0.001, "beta_end": 0.2}
    np.testing.assert_allclose(diffusion.alphas_cumprod(cfg).numpy(), hand_alphas_cumprod(50, 0.001, 0.2), rtol=1e-5)


def test_add_noise_matches_formula():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, *SHAPE, generator=g)
    eps = torch.randn(5, *SHAPE, generator=g)
    t = torch.tensor([0, 1, 250, 500, 999])
    a_bar_np = hand_alphas_cumprod()
    out = diffusion.add_noise(x0, t, eps, diffusion.alphas_cumprod(DIFFUSION))
    expected = np.stack(
        [
            np.sqrt(a_bar_np[ti]) * x0[i].numpy() + np.sqrt(1 - a_bar_np[ti]) * eps[i].numpy()
            for i, ti in enumerate(t.tolist())
        ]
    )
    assert out.shape == x0.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_add_noise_limits():
    x0, eps = torch.ones(2, *SHAPE), torch.full((2, *SHAPE), 3.0)
    a_bar = torch.tensor([1.0, 0.0])
    out = diffusion.add_noise(x0, torch.tensor([0, 1]), eps, a_bar)
    assert torch.equal(out[0], x0[0]) and torch.equal(out[1], eps[1])


def test_simple_loss_matches_hand_computation(model):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, *SHAPE, generator=g) * 2 - 1
    eps = torch.randn(4, *SHAPE, generator=g)
    t = torch.tensor([3, 100, 600, 998])
    a_bar = diffusion.alphas_cumprod(DIFFUSION)
    with torch.no_grad():
        loss = diffusion.simple_loss(model, x0, t, eps, a_bar)
        a_hand = torch.from_numpy(hand_alphas_cumprod()).float()
        expected = []
        for i in range(4):
            a = a_hand[t[i]]
            x_t = (a.sqrt() * x0[i] + (1 - a).sqrt() * eps[i])[None]
            pred = model(x_t, t[i : i + 1]).sample[0]
            expected.append(((eps[i] - pred) ** 2).sum() / pred.numel())
    assert loss.shape == (4,)
    np.testing.assert_allclose(loss.numpy(), torch.stack(expected).numpy(), rtol=1e-4)


HAND = {
    "loss": lambda p, e: ((e - p) ** 2).reshape(len(p), -1).mean(1),
    "mean-squared-l2-norm": lambda p, e: (p**2).reshape(len(p), -1).mean(1),
    "mean": lambda p, e: p.reshape(len(p), -1).mean(1),
    "l1-norm": lambda p, e: np.abs(p).reshape(len(p), -1).sum(1),
    "l2-norm": lambda p, e: np.sqrt((p**2).reshape(len(p), -1).sum(1)),
    "linf-norm": lambda p, e: np.abs(p).reshape(len(p), -1).max(1),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_output_function_matches_hand_formula(name):
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(3, *SHAPE))
    eps = rng.normal(size=(3, *SHAPE))
    out = diffusion.output_function(name, torch.from_numpy(pred), torch.from_numpy(eps))
    assert out.shape == (3,)
    np.testing.assert_allclose(out.numpy(), HAND[name](pred, eps), rtol=1e-12)


def test_output_function_unknown_name():
    with pytest.raises(ValueError, match="cube"):
        diffusion.output_function("cube", torch.zeros(1, 4), torch.zeros(1, 4))


@pytest.mark.parametrize("k", [1, 2, 4, 10, 100, 1000])
def test_timestep_grid_equals_range(k):
    grid = diffusion.timestep_grid(1000, k)
    assert grid.tolist() == list(range(0, 1000, 1000 // k))
    assert len(grid) == k


@pytest.mark.parametrize("k", [3, 7, 300])
def test_timestep_grid_non_divisor_has_k_points(k):
    # range(0, 1000, 1000 // k) has one or more points too many when k does not divide 1000;
    # the grid keeps the first k of them
    grid = diffusion.timestep_grid(1000, k)
    assert grid.tolist() == list(range(0, 1000, 1000 // k))[:k]


def test_timestep_grid_rejects_too_many():
    with pytest.raises(ValueError):
        diffusion.timestep_grid(10, 11)


def test_measurement_draws_deterministic():
    args = (3, SHAPE, 5, 2, 1000)
    t1, e1 = diffusion.measurement_draws(*args, seed=4, stream=0)
    t2, e2 = diffusion.measurement_draws(*args, seed=4, stream=0)
    assert torch.equal(t1, t2) and torch.equal(e1, e2)
    assert e1.shape == (3, 10, *SHAPE)
    # t: a uniform grid over [0, T-1], each value repeated n_noise times
    assert t1.tolist() == [0, 0, 250, 250, 500, 500, 749, 749, 999, 999]
    # queries and noise draws are independent
    assert not torch.equal(e1[0], e1[1])
    assert not torch.equal(e1[0, 0], e1[0, 1])
    # another stream or seed gives other noise
    _, e3 = diffusion.measurement_draws(*args, seed=4, stream=1)
    _, e4 = diffusion.measurement_draws(*args, seed=5, stream=0)
    assert not torch.equal(e1, e3) and not torch.equal(e1, e4)


def test_measurement_draws_prefix_stable():
    # the draws of query q do not depend on how many queries there are
    _, few = diffusion.measurement_draws(2, SHAPE, 4, 1, 1000, seed=0, stream=0)
    _, many = diffusion.measurement_draws(5, SHAPE, 4, 1, 1000, seed=0, stream=0)
    assert torch.equal(few, many[:2])


def test_checkpoint_round_trip_and_mismatch(model, tmp_path):
    path = tmp_path / "model.pt"
    save_torch(diffusion.save_checkpoint_payload(model, {"model": TINY_MODEL}, 7, SHAPE), path)
    loaded, payload = diffusion.load_model(path, TINY_MODEL)
    assert payload["step"] == 7 and payload["image_shape"] == SHAPE
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    other = {**TINY_MODEL, "layers_per_block": 2}
    with pytest.raises(ArtefactError, match="model config"):
        diffusion.load_model(path, other)
    save_torch({"kind": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ArtefactError, match="not a DDPM UNet"):
        diffusion.load_model(tmp_path / "other.pt", TINY_MODEL)
