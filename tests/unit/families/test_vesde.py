"""Unit tests of workflow_scripts.families.vesde: the VE-SDE, the exact probability-flow log-likelihood checked against a
known density (Gaussian data, analytic optimal score), the exact divergence against the autograd Jacobian,
gradients with vs without checkpointing, the Measurement under vmap vs a per-image loop, DSM training."""

import copy
import math

import numpy as np
import pytest
import torch
from fakes import TINY_MODEL, Float64Model, float64_default, float64_gradient_atol

from workflow_scripts.core import measurement as K
from workflow_scripts.core.curvature import ParamLayout
from workflow_scripts.families import vesde as V

torch.set_num_threads(1)

SHAPE = (1, 8, 8)
D = 64
SETTINGS = dict(V.VESDE_DEFAULTS)
SIGMA_MIN, SIGMA_MAX = V.std_range(SETTINGS)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return V.build_score_model(TINY_MODEL, SHAPE).eval()


# ---------------------------------------------------------------- the SDE


def test_marginal_std_formula_and_derivative():
    assert SIGMA_MAX == pytest.approx(math.sqrt((25**2 - 1) / (2 * math.log(25))), rel=1e-12)
    assert SIGMA_MAX == pytest.approx(9.8452, rel=1e-4)
    assert SIGMA_MIN == pytest.approx(math.sqrt(1e-5), rel=1e-4)  # sigma_t ~ sqrt(t) for small t
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    # d sigma_t^2 / dt = g(t)^2 (central differences)
    h = 1e-6
    deriv = (V.marginal_std(t + h) ** 2 - V.marginal_std(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(deriv, V.diffusion_coeff(t) ** 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(V.time_of_std(V.marginal_std(t)), t, rtol=1e-10, atol=0)
    assert V.marginal_std(0.5) == pytest.approx(float(V.marginal_std(torch.tensor(0.5, dtype=torch.float64))))


def test_bits_per_dim_offset():
    assert V.bpd_offset(17) == 3.0  # bins of width 2/16 = 1/8: -log2(1/8)
    assert V.bpd_offset(257) == pytest.approx(7.0)  # Song et al.'s offset for 256 levels on [-1, 1]
    assert V.bits_per_dim(D * math.log(2.0), D, 17) == pytest.approx(4.0)


# ---------------------------------------------------------------- exactness on Gaussian data


def gaussian_case(mu=0.3, s=0.5, n=3, seed=0):
    """Data N(mu, s^2 I): the marginal at noise std sigma is N(mu, (s^2 + sigma^2) I), so the optimal
    eps_theta = -sigma * score = sigma (x - mu) / (s^2 + sigma^2)."""

    def eps_fn(x, sigma):
        sigma = sigma.view(-1, 1, 1, 1)
        return sigma * (x - mu) / (s**2 + sigma**2)

    g = torch.Generator().manual_seed(seed)
    x = mu + s * torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    return eps_fn, x, mu, s


@pytest.mark.parametrize("solver, n_steps, tol", [("rk4", 64, 1e-3), ("rk4", 128, 1e-4), ("heun", 512, 1e-2)])
def test_ode_log_likelihood_of_gaussian_data_is_exact(solver, n_steps, tol):
    """Analytic score + the matching prior N(mu, (s^2 + sigma_1^2) I): the ODE log-likelihood must equal the true
    log-density N(x; mu, (s^2 + sigma_min^2) I) up to the solver error (tol in nats for D = 64)."""
    eps_fn, x, mu, s = gaussian_case()
    grid = V.log_sigma_grid(SIGMA_MIN, SIGMA_MAX, n_steps)
    prior = lambda x1: V.gaussian_prior_logp(x1, math.sqrt(s**2 + SIGMA_MAX**2), mu)  # noqa: E731
    nll = V.pf_ode_nll(eps_fn, x, grid, solver, prior_logp=prior)
    true = -V.gaussian_prior_logp(x, math.sqrt(s**2 + SIGMA_MIN**2), mu)
    assert torch.all((nll - true).abs() < tol), nll - true


def test_ode_log_likelihood_with_default_prior_matches_closed_form():
    """With the method's prior N(0, sigma_1^2 I) (not the true marginal), the result is the closed form
    ln N(x(1); 0, sigma_1^2) + D/2 ln((s^2 + sigma_1^2) / (s^2 + sigma_min^2)), x(1) = mu + (x - mu) sqrt(ratio)."""
    eps_fn, x, mu, s = gaussian_case(mu=0.1, s=0.6)
    grid = V.log_sigma_grid(SIGMA_MIN, SIGMA_MAX, 96)
    nll, terms = V.pf_ode_nll(eps_fn, x, grid, "rk4", return_terms=True)
    ratio = (s**2 + SIGMA_MAX**2) / (s**2 + SIGMA_MIN**2)
    x1 = mu + (x - mu) * math.sqrt(ratio)
    torch.testing.assert_close(terms["x1"], x1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        terms["delta"], torch.full((3,), D / 2 * math.log(ratio), dtype=torch.float64), rtol=1e-6, atol=1e-4
    )
    expected = -(V.gaussian_prior_logp(x1, SIGMA_MAX) + D / 2 * math.log(ratio))
    torch.testing.assert_close(nll, expected, rtol=1e-6, atol=1e-3)
    # and the prior mismatch is small (sigma_1 = 9.8 >> s): of the order D s^2 / (2 sigma_1^2) = 0.12 nats
    true = -V.gaussian_prior_logp(x, math.sqrt(s**2 + SIGMA_MIN**2), mu)
    assert torch.all((nll - true).abs() < 0.5)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_solver_order_of_convergence(solver, order):
    eps_fn, x, mu, s = gaussian_case()
    prior = lambda x1: V.gaussian_prior_logp(x1, math.sqrt(s**2 + SIGMA_MAX**2), mu)  # noqa: E731
    true = -V.gaussian_prior_logp(x, math.sqrt(s**2 + SIGMA_MIN**2), mu)
    n = 64 if solver == "rk4" else 256
    err = [
        (V.pf_ode_nll(eps_fn, x, V.log_sigma_grid(SIGMA_MIN, SIGMA_MAX, k), solver, prior_logp=prior) - true)
        .abs()
        .max()
        .item()
        for k in (n, 2 * n)
    ]
    assert 2**order * 0.7 < err[0] / err[1] < 2**order * 1.3  # halving the step divides the error by 2^order


# ---------------------------------------------------------------- exact divergence


def test_exact_divergence_equals_trace_of_autograd_jacobian(net):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *SHAPE, generator=g)
    std = torch.tensor([0.01, 0.7, 9.0])
    out, div = V.exact_divergence(lambda y: net(y, std), x)
    torch.testing.assert_close(out, net(x, std))
    for b in range(3):
        J = torch.autograd.functional.jacobian(lambda y: net(y[None], std[b : b + 1])[0], x[b])
        assert div[b].item() == pytest.approx(J.reshape(D, D).trace().item(), rel=1e-4, abs=1e-5)


def test_exact_divergence_of_a_linear_map():
    A = torch.randn(D, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fn = lambda y: (y.flatten(1) @ A.T).view(y.shape)  # noqa: E731
    x = torch.randn(4, *SHAPE, dtype=torch.float64)
    _, div = V.exact_divergence(fn, x)
    torch.testing.assert_close(div, torch.full((4,), A.trace().item(), dtype=torch.float64))


# ---------------------------------------------------------------- differentiability


def test_gradients_with_checkpointing_equal_without(net):
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    grid = V.log_sigma_grid(SIGMA_MIN, SIGMA_MAX, 2)
    params = list(net.parameters())
    plain = V.pf_ode_nll(net, x, grid, "rk4", checkpoint=False)
    g_plain = torch.autograd.grad(plain.sum(), params)
    ckpt = V.pf_ode_nll(net, x, grid, "rk4", checkpoint=True)
    g_ckpt = torch.autograd.grad(ckpt.sum(), params)
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)
    for a, b in zip(g_plain, g_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max() + 1e-12))
    assert any(float(a.abs().max()) > 0 for a in g_plain)
    # also through .backward() (what a training loop would call)
    net.zero_grad()
    V.pf_ode_nll(net, x, grid, "heun", checkpoint=True).sum().backward()
    assert all(p.grad is not None and torch.all(torch.isfinite(p.grad)) for p in params)
    net.zero_grad()


def test_checkpointing_needs_a_module():
    eps_fn, x, _, _ = gaussian_case()
    with pytest.raises(TypeError):
        V.pf_ode_nll(eps_fn, x, V.log_sigma_grid(SIGMA_MIN, SIGMA_MAX, 2), checkpoint=True)
    with pytest.raises(ValueError):
        V.pf_ode_nll(eps_fn, x, V.log_sigma_grid(SIGMA_MIN, SIGMA_MAX, 2), solver="rk45")


@pytest.mark.parametrize("dequantize", [True, False])
def test_likelihood_measurement_under_vmap_equals_per_image_loop(net, dequantize):
    m = V.LikelihoodMeasurement(SETTINGS, 17, seed=0, solver="heun", n_steps=2, dequantize=dequantize)
    images = (torch.randint(0, 17, (2, *SHAPE), generator=torch.Generator().manual_seed(4)) / 8.0 - 1).float()
    d = m.draws(2, SHAPE, 0)
    assert d["t"].shape == (2, 3) and d["u"].shape == (2, *SHAPE)
    if dequantize:
        assert float(d["u"].abs().max()) <= 1 / 16 and float(d["u"].abs().max()) > 0
    # vmap(grad) over the batch == autograd per image, in float64 (a float64 copy of the net, float64 draws) where the
    # two differ only by float64 rounding
    net64 = Float64Model(net)
    names = [n for n, _ in net64.named_parameters()][:4] + [n for n, _ in net64.named_parameters()][-2:]
    params = dict(net64.named_parameters())
    layout = ParamLayout(names, [tuple(params[n].shape) for n in names])
    with float64_default():
        m64 = V.LikelihoodMeasurement(SETTINGS, 17, seed=0, solver="heun", n_steps=2, dequantize=dequantize)
        d64 = m64.draws(2, SHAPE, 0)
        batched = K.per_example_gradients(net64, layout, images.double(), d64, m64)
        for q in range(2):
            value = m64.objective(net64, images[q].double(), {k: v[q] for k, v in d64.items()})
            flat = torch.cat([g.flatten() for g in torch.autograd.grad(value, [params[n] for n in names])])
            assert batched.dtype == flat.dtype == torch.float64
            torch.testing.assert_close(batched[q], flat, rtol=0, atol=float64_gradient_atol(net64, flat))
    # the batch function (ground truth) gives the same values
    cfg = {"solver": "heun", "n_steps": 2, "dequantize": dequantize, "batch_size": 2}
    gt = V.measure_likelihood(net, images.numpy(), {**TINY_MODEL}, cfg, 17, seed=0)
    for q in range(2):
        value = m.objective(net, images[q], {k: v[q] for k, v in d.items()})
        assert gt["nats"][q] == pytest.approx(value.item(), rel=1e-5)
    np.testing.assert_allclose(gt["bpd"], gt["nats"] / (D * math.log(2)) + 3.0)


def test_dequantization_noise_is_fixed_and_prefix_stable():
    a = V.dequantization_noise(3, SHAPE, 17, seed=1, stream=0)
    b = V.dequantization_noise(2, SHAPE, 17, seed=1, stream=0, start=1)
    torch.testing.assert_close(a[1:], b)
    assert float(a.abs().max()) <= 1 / 16
    assert not torch.equal(a, V.dequantization_noise(3, SHAPE, 17, seed=1, stream=1))


# ---------------------------------------------------------------- model, DSM, training


def test_dsm_loss_is_sigma2_weighted_score_matching(net):
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(4, *SHAPE, generator=g) * 2 - 1
    eps = torch.randn(4, *SHAPE, generator=g)
    std = torch.tensor([0.01, 0.1, 1.0, 9.0])
    loss = V.dsm_loss(net, x0, std, eps)
    x_t = x0 + std.view(-1, 1, 1, 1) * eps
    target = -(x_t - x0) / std.view(-1, 1, 1, 1) ** 2  # grad log p_0t(x_t | x0)
    dsm = std.pow(2) * (net.score(x_t, std) - target).pow(2).flatten(1).sum(1) / D
    torch.testing.assert_close(loss, dsm, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weighting", ["sigma2", "likelihood"])
def test_training_noise_levels(weighting):
    settings = {**SETTINGS, "weighting": weighting}
    std = V.training_stds(20000, settings, torch.Generator().manual_seed(0)).double()
    assert float(std.min()) >= SIGMA_MIN * (1 - 1e-6) and float(std.max()) <= SIGMA_MAX * (1 + 1e-6)
    if weighting == "sigma2":  # t uniform
        assert float(V.time_of_std(std).mean()) == pytest.approx(0.5, abs=0.01)
    else:  # ln sigma uniform
        lo, hi = math.log(SIGMA_MIN), math.log(SIGMA_MAX)
        assert float(std.log().mean()) == pytest.approx((lo + hi) / 2, abs=0.05)
    with pytest.raises(ValueError):
        V.training_stds(2, {**SETTINGS, "weighting": "bogus"}, torch.Generator())


def test_train_vesde_is_deterministic_and_round_trips(smoke_config, tmp_path):
    config = copy.deepcopy(smoke_config)
    config["model"] = {**TINY_MODEL, "family": "vesde", "vesde": {"weighting": "likelihood"}}
    config["train"] = {**config["train"], "steps": 3, "batch_size": 4, "warmup_fraction": 0.0}
    config["compute"] = {"device": "cpu", "threads": 1}
    images = (np.random.default_rng(0).integers(0, 17, (10, *SHAPE)) / 8.0 - 1).astype(np.float32)
    members = np.arange(10)
    a = V.train_vesde(config, images, members, 0, model_out=tmp_path / "a.pt")
    b = V.train_vesde(config, images, members, 0)
    c = V.train_vesde(config, images, members, 1)
    for (k, va), (_, vb), (_, _vc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(va, vb), k
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))
    loaded, payload = V.load_model(tmp_path / "a.pt", config["model"])
    assert payload["kind"] == "vesde-unet" and payload["config"]["family"] == "vesde"
    for va, vl in zip(a.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(va, vl)
    from workflow_scripts.core.common import ArtefactError

    with pytest.raises(ArtefactError, match="model config"):
        V.load_model(tmp_path / "a.pt", {**config["model"], "layers_per_block": 2})
    x = V.sample_vesde(loaded, 2, SHAPE, V.vesde_settings(config["model"]), n_steps=3, seed=0)
    assert x.shape == (2, *SHAPE) and torch.all(torch.isfinite(x))


def test_likelihood_defaults_shared_with_measure_settings():
    from workflow_scripts.families.likelihood import MEASURE_DEFAULTS, measure_settings

    assert MEASURE_DEFAULTS["likelihood"] == V.LIKELIHOOD_DEFAULTS
    assert measure_settings({}, "vesde")["measurements"] == ["likelihood"]


def test_measure_queries_for_the_vesde_family(net, smoke_config):
    from workflow_scripts.core.contracts import target_names
    from workflow_scripts.families.likelihood import measure_queries

    config = copy.deepcopy(smoke_config)
    config["model"] = {**TINY_MODEL, "family": "vesde"}
    config["measure"].pop("measurements")  # the smoke overlay's are DDPM targets; absent = the family's default
    config["measure"]["likelihood"] = {"solver": "euler", "n_steps": 2, "batch_size": 4}
    assert target_names(config) == ["likelihood"]
    images = (torch.randint(0, 17, (3, *SHAPE), generator=torch.Generator().manual_seed(6)) / 8.0 - 1).numpy()
    out = measure_queries(net, {"generated": images[:2], "heldout": images}, config)
    assert sorted(out) == ["generated__likelihood", "heldout__likelihood"]
    direct = V.measure_likelihood(
        net, images, config["model"], config["measure"]["likelihood"], 17, config["seeds"]["measure"], stream=1
    )
    np.testing.assert_allclose(out["heldout__likelihood"], direct["nats"])
