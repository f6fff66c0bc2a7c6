"""Unit tests of workflow_scripts.families.likelihood (measurements of the DDPM family) against independent
computations: ELBO terms by an explicit numpy loop over every timestep (Gaussian KLs written out, scipy CDFs),
trajectory log-prob by a per-step Gaussian loop and by the noise diffusers' DDPM sampler actually drew,
and every measurement under torch.func.vmap (the scorers' query gradients) against a per-image loop."""

import copy
import math

import numpy as np
import pytest
import torch
from fakes import TINY_MODEL, Float64Model, float64_default, float64_gradient_atol
from scipy.stats import norm

from workflow_scripts.core import contracts
from workflow_scripts.core import measurement as K
from workflow_scripts.core.curvature import ParamLayout
from workflow_scripts.dag.config import ConfigError, validate_config
from workflow_scripts.families import ddpm as diffusion
from workflow_scripts.families import likelihood as L

torch.set_num_threads(1)

DIFFUSION = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}
SMALL_DIFFUSION = {"num_train_timesteps": 20, "beta_start": 0.001, "beta_end": 0.2}
SHAPE = (1, 8, 8)
D = 64
LEVELS = 17


def hand_schedule(T, start, end):
    betas = np.array([start + (end - start) * s / (T - 1) for s in range(T)], dtype=np.float64)
    alphas = 1 - betas
    a_bar = np.cumprod(alphas)
    return betas, alphas, a_bar


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return diffusion.build_model(TINY_MODEL, SHAPE).eval()


@pytest.fixture(scope="module")
def images():
    g = np.random.default_rng(0)
    return (g.integers(0, LEVELS, size=(3, *SHAPE)) / (LEVELS - 1) * 2 - 1).astype(np.float32)


def predict_of(model):
    return lambda x, t: model(x, t).sample


# ---------------------------------------------------------------- schedule, weights, L_T


def test_elbo_weights_positive_finite_and_match_ho():
    sched = L.schedule(DIFFUSION)
    w = sched.elbo_weights().numpy()
    assert w[0] == 0.0
    assert np.all(np.isfinite(w)) and np.all(w[1:] > 0)
    betas, alphas, a_bar = hand_schedule(1000, 1e-4, 0.02)
    a_prev = np.concatenate([[1.0], a_bar[:-1]])
    sigma2 = betas * (1 - a_prev) / (1 - a_bar)
    ho = betas[1:] ** 2 / (2 * sigma2[1:] * alphas[1:] * (1 - a_bar[1:]))
    np.testing.assert_allclose(w[1:], ho, rtol=1e-4)
    # simplified form beta / (2 alpha (1 - a_bar_{t-1}))
    np.testing.assert_allclose(w[1:], betas[1:] / (2 * alphas[1:] * (1 - a_prev[1:])), rtol=1e-4)
    assert w[1] == pytest.approx(0.5997, rel=1e-3) and w[-1] == pytest.approx(0.0102, rel=1e-2)
    # the decoder's clipped std (Ho's posterior_log_variance_clipped)
    assert sched.decoder_std() == pytest.approx(math.sqrt(sigma2[1]), rel=1e-4)


def test_prior_term_is_negligible_for_default_schedule():
    a_last = float(L.schedule(DIFFUSION).a_bar[-1])
    for value in (-1.0, 0.0, 1.0):
        x0 = torch.full(SHAPE, value)
        lt = L.prior_kl(x0, a_last).item()
        expected = 0.5 * D * (a_last * value**2 + (1 - a_last) - 1 - math.log(1 - a_last))
        assert lt == pytest.approx(expected, rel=1e-6)
        assert 0 <= lt < 2e-3  # ~0: a_bar_T = 4e-5


# ---------------------------------------------------------------- discretised Gaussian decoder


def test_log_ndtr_matches_torch_and_has_finite_gradients():
    z = torch.cat(
        [torch.linspace(-1000, 1000, 4001, dtype=torch.float64), torch.linspace(-6, 6, 241, dtype=torch.float64)]
    ).requires_grad_()
    ours, ref = L.log_ndtr(z), torch.special.log_ndtr(z)
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-12)
    (g,) = torch.autograd.grad(ours.sum(), z)
    (g_ref,) = torch.autograd.grad(ref.sum(), z)
    assert torch.all(torch.isfinite(g))
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)


def test_discretized_gaussian_matches_scipy():
    h = 1 / 16
    x = torch.tensor([-1.0, -1 + 2 * h, 0.0, 0.3, 1 - 2 * h, 1.0], dtype=torch.float64)
    mean = torch.tensor([-0.98, -0.9, 0.02, 0.31, 0.9, 1.1], dtype=torch.float64)
    for std in (0.0074, 0.05, 0.5):
        got = L.discretized_gaussian_log_likelihood(x, mean, std, LEVELS).numpy()
        xs, ms = x.numpy(), mean.numpy()
        hi = np.where(xs > 1 - h, 1.0, norm.cdf((xs + h - ms) / std))
        lo = np.where(xs < -1 + h, 0.0, norm.cdf((xs - h - ms) / std))
        np.testing.assert_allclose(got, np.log(hi - lo), rtol=1e-7, atol=1e-12)


def test_discretized_gaussian_tails_finite_with_finite_gradients():
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    mean = torch.tensor([5.0, -3.0, 4.0, -7.0], dtype=torch.float64, requires_grad=True)
    out = L.discretized_gaussian_log_likelihood(x, mean, 0.0074, LEVELS)
    assert torch.all(torch.isfinite(out)) and torch.all(out < -1e4)
    # far left tail of an interior bin: P ~ Phi(z_hi) (Phi(z_lo) is smaller by a factor exp(-8000))
    assert out[2].item() == pytest.approx(norm.logcdf((0.5 + 1 / 16 - 4.0) / 0.0074), rel=1e-6)
    # edge bins: one-sided
    assert out[0].item() == pytest.approx(norm.logcdf((-1 + 1 / 16 - 5.0) / 0.0074), rel=1e-6)
    assert out[3].item() == pytest.approx(norm.logsf((1 - 1 / 16 + 7.0) / 0.0074), rel=1e-6)
    (g,) = torch.autograd.grad(out.sum(), mean)
    assert torch.all(torch.isfinite(g))


# ---------------------------------------------------------------- ELBO vs an explicit loop over every t


def test_elbo_all_timesteps_vs_numpy_loop(model, images):
    """scheme 'all' on a 20-step schedule: every KL term written out as the KL of two Gaussians
    (posterior mean of Ho eq. 7 vs model mean of eq. 11), the decoder with scipy, L_T by its formula."""
    m = L.ElboMeasurement(SMALL_DIFFUSION, LEVELS, seed=3, stream=0, scheme="all", n_noise=2, decoder_draws=2)
    d = m.draws(len(images), SHAPE, 0)
    terms = L.evaluate(model, images, m)
    betas, alphas, a_bar = hand_schedule(20, 0.001, 0.2)
    a_prev = np.concatenate([[1.0], a_bar[:-1]])
    T = 20
    for q, x0_np in enumerate(images.astype(np.float64)):
        eps_all = d["eps"][q].double().numpy()
        kl_total = 0.0
        row = 0
        for t in range(1, T):
            for _ in range(2):
                eps = eps_all[row]
                x_t = np.sqrt(a_bar[t]) * x0_np + np.sqrt(1 - a_bar[t]) * eps
                with torch.no_grad():
                    eps_hat = model(torch.from_numpy(x_t[None]).float(), torch.tensor([t])).sample[0].double().numpy()
                post_mean = (
                    np.sqrt(a_prev[t]) * betas[t] / (1 - a_bar[t]) * x0_np
                    + np.sqrt(alphas[t]) * (1 - a_prev[t]) / (1 - a_bar[t]) * x_t
                )
                model_mean = (x_t - betas[t] / np.sqrt(1 - a_bar[t]) * eps_hat) / np.sqrt(alphas[t])
                var = betas[t] * (1 - a_prev[t]) / (1 - a_bar[t])
                kl_total += 0.5 * np.sum((post_mean - model_mean) ** 2) / var / 2  # two eps per t
                row += 1
        # decoder: two draws, discretised Gaussian with the clipped std
        std = np.sqrt(betas[1] * (1 - a_bar[0]) / (1 - a_bar[1]))
        nll0 = 0.0
        for j in range(2):
            eps = eps_all[row + j]
            x1 = np.sqrt(a_bar[0]) * x0_np + np.sqrt(1 - a_bar[0]) * eps
            with torch.no_grad():
                eps_hat = model(torch.from_numpy(x1[None]).float(), torch.tensor([0])).sample[0].double().numpy()
            mean = (x1 - betas[0] / np.sqrt(1 - a_bar[0]) * eps_hat) / np.sqrt(alphas[0])
            h = 1 / 16
            hi = np.where(x0_np > 1 - h, 1.0, norm.cdf((x0_np + h - mean) / std))
            lo = np.where(x0_np < -1 + h, 0.0, norm.cdf((x0_np - h - mean) / std))
            nll0 += -np.sum(np.log(hi - lo)) / 2
        lt = 0.5 * np.sum(a_bar[-1] * x0_np**2 + (1 - a_bar[-1]) - 1 - np.log(1 - a_bar[-1]))
        assert terms["kl"][q] == pytest.approx(kl_total, rel=2e-4)
        assert terms["l0"][q] == pytest.approx(nll0, rel=2e-4, abs=1e-3)
        assert terms["lt"][q] == pytest.approx(lt, rel=1e-4)
        assert terms["value"][q] == pytest.approx(kl_total + nll0 + lt, rel=2e-4)


def test_measure_elbo_units_and_determinism(model, images):
    cfg = {"scheme": "importance", "n_timesteps": 16, "n_noise": 1, "decoder_draws": 1}
    a = L.measure_elbo(model, images, DIFFUSION, cfg, LEVELS, seed=1, stream=0)
    b = L.measure_elbo(model, images, DIFFUSION, cfg, LEVELS, seed=1, stream=0)
    for k in ("nats", "bpd", "kl", "l0", "lt"):
        assert a[k].shape == (len(images),) and np.array_equal(a[k], b[k])
    np.testing.assert_allclose(a["nats"], a["kl"] + a["l0"] + a["lt"], rtol=1e-12)
    np.testing.assert_allclose(a["bpd"], a["nats"] / (D * math.log(2)), rtol=1e-12)
    c = L.measure_elbo(model, images, DIFFUSION, cfg, LEVELS, seed=2, stream=0)
    assert not np.array_equal(a["nats"], c["nats"])


@pytest.mark.parametrize("scheme", ["importance", "uniform"])
def test_elbo_timestep_draws_unbiased(scheme):
    """sum_k weight_k f(t_k) estimates sum_{i>=1} w_i f(i): exact for f = 1 under importance sampling,
    unbiased over seeds for a non-constant f (stratified draws)."""
    sched = L.schedule(DIFFUSION)
    w = sched.elbo_weights().numpy()
    f = np.sqrt(np.arange(1000) + 1.0)
    exact = np.sum(w[1:] * f[1:])
    estimates = []
    for seed in range(60):
        t, weight = L.elbo_timestep_draws(sched, 32, scheme, seed, 0)
        assert t.min() >= 1 and t.max() <= 999 and len(t) == 32
        estimates.append(float(np.sum(weight.numpy() * f[t.numpy()])))
        if scheme == "importance":
            assert float(weight.sum()) == pytest.approx(w[1:].sum(), rel=1e-10)
    assert np.mean(estimates) == pytest.approx(exact, rel=5e-3)
    t1, w1 = L.elbo_timestep_draws(sched, 32, scheme, 7, 0)
    t2, w2 = L.elbo_timestep_draws(sched, 32, scheme, 7, 0)
    assert torch.equal(t1, t2) and torch.equal(w1, w2)


def test_elbo_draws_prefix_stable(images):
    m = L.ElboMeasurement(DIFFUSION, LEVELS, seed=0, scheme="importance", n_timesteps=8, n_noise=1)
    few = m.draws(1, SHAPE, 1)
    many = m.draws(3, SHAPE, 0)
    assert torch.equal(few["eps"][0], many["eps"][1]) and torch.equal(few["t"][0], many["t"][1])


# ---------------------------------------------------------------- per-timestep loss


def test_timestep_losses_vs_simple_loss(model, images):
    out = L.measure_timestep_losses(model, images, DIFFUSION, [0, 500, 999], n_noise=3, seed=4, stream=1)
    assert out.shape == (len(images), 3)
    a_bar = diffusion.alphas_cumprod(DIFFUSION)
    for j, t in enumerate([0, 500, 999]):
        m = L.TimestepLossMeasurement(t, 3, DIFFUSION, seed=4, stream=1)
        d = m.draws(len(images), SHAPE, 0)
        for q in range(len(images)):
            with torch.no_grad():
                direct = (
                    diffusion.simple_loss(
                        model, torch.from_numpy(images[q]).expand(3, *SHAPE), d["t"][q], d["eps"][q], a_bar
                    )
                    .mean()
                    .item()
                )
            assert out[q, j] == pytest.approx(direct, rel=1e-5)
            assert bool((d["t"][q] == t).all())
    with pytest.raises(ValueError):
        L.TimestepLossMeasurement(1000, 1, DIFFUSION, seed=0)


# ---------------------------------------------------------------- trajectory log-prob


def ddim_timesteps(steps):
    from workflow_scripts.families.ddpm import make_sampling_scheduler

    return make_sampling_scheduler(DIFFUSION, {"scheduler": "ddim", "num_inference_steps": steps}).timesteps.numpy()


def test_trajectory_nll_vs_per_step_gaussian_loop(model):
    """A random 'trajectory' over DDIM's 5-step schedule: every transition's Gaussian log-density with the
    eps-form mean of Ho eq. 11 on the strided chain, written out in numpy."""
    timesteps = ddim_timesteps(5)
    assert timesteps.tolist() == [800, 600, 400, 200, 0]
    g = torch.Generator().manual_seed(0)
    traj = torch.randn(2, 6, *SHAPE, generator=g).numpy()
    got = L.measure_trajectory_nll(model, traj, timesteps, DIFFUSION)
    _, _, a_bar = hand_schedule(1000, 1e-4, 0.02)
    for q in range(2):
        logp = -0.5 * np.sum(traj[q, 0].astype(np.float64) ** 2) - 0.5 * D * np.log(2 * np.pi)
        variances = []
        for k, t in enumerate(timesteps):
            a_t = a_bar[t]
            a_next = a_bar[timesteps[k + 1]] if k + 1 < len(timesteps) else 1.0
            alpha, beta = a_t / a_next, 1 - a_t / a_next
            var = beta * (1 - a_next) / (1 - a_t)
            var = var if var > 0 else variances[-1]
            variances.append(var)
            x = traj[q, k].astype(np.float64)
            with torch.no_grad():
                eps = model(torch.from_numpy(traj[q, k][None]), torch.tensor([int(t)])).sample[0].double().numpy()
            mean = (x - beta / np.sqrt(1 - a_t) * eps) / np.sqrt(alpha)
            logp += -0.5 * np.sum((traj[q, k + 1] - mean) ** 2) / var - 0.5 * D * np.log(2 * np.pi * var)
        assert got["nats"][q] == pytest.approx(-logp, rel=1e-4)
    np.testing.assert_allclose(got["bpd"], got["nats"] / (D * math.log(2)))


@pytest.mark.parametrize("clip", [False, True])
def test_trajectory_nll_equals_density_of_diffusers_ddpm_draws(model, clip):
    """Sample with diffusers' DDPMScheduler (fixed_small, 4 strided steps) and record the Gaussian noise it drew:
    -ln p = -ln N(x_T) + sum over noisy steps of [D/2 ln(2 pi var) + |z|^2 / 2] + the last, deterministic step
    (mean hit exactly, the clipped variance) D/2 ln(2 pi var_prev)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=clip,
        variance_type="fixed_small",
    )
    sched.set_timesteps(4)
    gen, replay = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(9)) * (0.3 if clip else 1.0)
    states, expected = [x], 0.5 * (x.double().pow(2).flatten(1).sum(1) + D * math.log(2 * math.pi))
    last_var = None
    for t in sched.timesteps:
        with torch.no_grad():
            eps = model(x, t.expand(2)).sample
        x = sched.step(eps, t, x, generator=gen).prev_sample
        if t > 0:
            z = torch.randn(x.shape, generator=replay).double()
            last_var = float(sched._get_variance(t))
            expected = expected + 0.5 * (D * math.log(2 * math.pi * last_var) + z.pow(2).flatten(1).sum(1))
        else:
            expected = expected + 0.5 * D * math.log(2 * math.pi * last_var)
        states.append(x)
    traj = torch.stack(states, 1).numpy()
    got = L.measure_trajectory_nll(model, traj, sched.timesteps.numpy(), DIFFUSION, clip_x0=clip)
    np.testing.assert_allclose(got["nats"], expected.numpy(), rtol=2e-4)


def test_trajectory_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="states"):
        L.TrajectoryMeasurement(np.zeros((1, 3, *SHAPE)), [20, 10, 0], DIFFUSION)
    with pytest.raises(ValueError, match="decreasing"):
        L.trajectory_coefficients(DIFFUSION, [0, 10])


# ---------------------------------------------------------------- under vmap == per-image loop


def _measurements(images):
    traj = torch.randn(len(images), 4, *SHAPE, generator=torch.Generator().manual_seed(1)).numpy()
    return [
        L.ElboMeasurement(DIFFUSION, LEVELS, seed=0, scheme="importance", n_timesteps=6, n_noise=1, decoder_draws=2),
        L.TimestepLossMeasurement(250, 3, DIFFUSION, seed=0),
        L.TrajectoryMeasurement(traj, ddim_timesteps(3), DIFFUSION),
        L.TrajectoryMeasurement(traj, ddim_timesteps(3), DIFFUSION, clip_x0=True),
    ]


@pytest.mark.parametrize("index", range(4))
def test_measurements_under_vmap_equal_per_image_loop(model, images, index):
    m = _measurements(images)[index]
    # values: vmap-ped evaluate == one image at a time
    vec = L.evaluate(model, images, m, vectorized=True)["value"]
    loop = L.evaluate(model, images, m, vectorized=False)["value"]
    np.testing.assert_allclose(vec, loop, rtol=1e-5)
    x = torch.from_numpy(images)
    d = m.draws(len(images), SHAPE, 0)
    with torch.no_grad():
        for q in range(len(images)):
            assert m.objective(predict_of(model), x[q], {k: v[q] for k, v in d.items()}).item() == pytest.approx(
                vec[q], rel=1e-5
            )
    # gradients: the K-FAC scorer's vmap(grad) per-example gradients == autograd per image, in float64 (a float64 copy
    # of the model, float64 draws) where the two orders differ only by float64 rounding
    model = Float64Model(model)
    names = [n for n, _ in model.named_parameters()][:6] + [n for n, _ in model.named_parameters()][-4:]
    params = dict(model.named_parameters())
    layout = ParamLayout(names, [tuple(params[n].shape) for n in names])
    with float64_default():
        m = _measurements(images)[index]
        d = m.draws(len(images), SHAPE, 0)
        batched = K.per_example_gradients(model, layout, x, d, m)
        for q in range(len(images)):
            value = m.objective(predict_of(model), x[q], {k: v[q] for k, v in d.items()})
            flat = torch.cat([g.flatten() for g in torch.autograd.grad(value, [params[n] for n in names])])
            assert batched.dtype == flat.dtype == torch.float64
            torch.testing.assert_close(batched[q], flat, rtol=0, atol=float64_gradient_atol(model, flat))


def test_kfac_gradients_accept_elbo_measurement(model, images):
    """iter_gradients batches by rows per image (draws['t'].shape[1]) and returns one row per image."""
    m = L.ElboMeasurement(DIFFUSION, LEVELS, seed=0, n_timesteps=4, n_noise=1)
    names = [n for n, _ in model.named_parameters()][:3]
    params = dict(model.named_parameters())
    layout = ParamLayout(names, [tuple(params[n].shape) for n in names])
    g = K.gradients(model, layout, images, m, batch_rows=10, device="cpu")
    assert g.shape == (len(images), layout.n_params) and torch.all(torch.isfinite(g))


# ---------------------------------------------------------------- configuration


def test_measure_settings_defaults_keep_current_behaviour(base_config, smoke_config):
    minimal = {k: base_config["measure"][k] for k in ("n_timesteps", "n_noise", "batch_size")}
    assert L.measure_settings(minimal)["measurements"] == ["loss"]  # absent keys: the loss only
    for config in (base_config, smoke_config):
        s = L.measure_settings(config["measure"])
        assert s["measurements"] == config["measure"]["measurements"]
        assert L.model_family(config["model"]) == "ddpm"
        assert s["n_timesteps"] == config["measure"]["n_timesteps"]
    s = L.measure_settings({"elbo": {"scheme": "all"}})
    assert s["elbo"] == {**L.MEASURE_DEFAULTS["elbo"], "scheme": "all"}


def test_schema_accepts_new_keys_and_rejects_bad_values(base_config):
    config = copy.deepcopy(base_config)
    config["measure"].update(
        {
            "measurements": ["loss", "elbo", "timestep_loss", "trajectory"],
            "elbo": {"scheme": "uniform", "n_timesteps": 100, "n_noise": 1, "decoder_draws": 1},
            "timestep_loss": {"timesteps": [0, 999], "n_noise": 4},
            "trajectory": {"clip_x0": True},
        }
    )
    config["model"]["family"] = "ddpm"
    validate_config(config)
    vesde = copy.deepcopy(base_config)
    vesde["model"].update({"family": "vesde", "vesde": {"sigma": 25.0, "t_min": 1e-5, "weighting": "likelihood"}})
    for method in ("kfac_elbo", "kfac_trajectory", "trak_elbo"):  # DDPM targets: a VE-SDE config must not ask for them
        vesde["scores"]["methods"].pop(method)
    vesde["measure"].update(
        {
            "measurements": ["likelihood"],
            "likelihood": {"solver": "heun", "n_steps": 16, "checkpoint": False, "dequantize": False},
        }
    )
    validate_config(vesde)
    bad = [
        ("model", {"family": "vae"}),
        ("measure", {"measurements": ["bogus"]}),
        ("measure", {"elbo": {"scheme": "random"}}),
        ("measure", {"likelihood": {"solver": "rk45"}}),
        ("measure", {"timestep_loss": {"timesteps": [1000]}}),
    ]
    for section, patch in bad:
        c = copy.deepcopy(base_config)
        c[section].update(patch)
        with pytest.raises(ConfigError):
            validate_config(c)


def test_measurements_must_fit_the_model_family(base_config):
    c = copy.deepcopy(base_config)
    c["measure"]["measurements"] = ["likelihood"]
    with pytest.raises(ConfigError, match="likelihood"):
        validate_config(c)
    c = copy.deepcopy(base_config)
    c["model"]["family"] = "vesde"
    c["measure"]["measurements"] = ["elbo"]
    with pytest.raises(ConfigError, match="elbo"):
        validate_config(c)
    c = copy.deepcopy(base_config)
    c["measure"]["timestep_loss"] = {"timesteps": [5, 1500]}
    with pytest.raises(ConfigError, match="timestep"):
        validate_config(c)


# ---------------------------------------------------------------- all measurements of the query sets


def test_measure_queries_and_load_targets(model, images, smoke_config, tmp_path):
    from workflow_scripts.core.common import save_npz
    from workflow_scripts.families.ddpm import measure_loss

    config = copy.deepcopy(smoke_config)
    config["model"] = dict(TINY_MODEL)
    config["measure"].update(
        {
            "n_timesteps": 4,
            "n_noise": 1,
            "measurements": ["loss", "elbo", "timestep_loss", "trajectory"],
            "elbo": {"n_timesteps": 5, "n_noise": 1},
            "timestep_loss": {"timesteps": [3, 700], "n_noise": 2},
        }
    )
    validate_config({**smoke_config, "measure": config["measure"]})
    assert contracts.target_names(config) == ["loss", "elbo", "timestep_loss_t3", "timestep_loss_t700", "trajectory"]
    timesteps = ddim_timesteps(3)
    traj = torch.randn(2, 4, *SHAPE, generator=torch.Generator().manual_seed(2)).numpy()
    queries = {"generated": traj[:, -1].copy(), "heldout": images}
    out = L.measure_queries(model, queries, config, samples={"trajectories": traj, "timesteps": timesteps})
    assert sorted(out) == sorted(
        [
            "generated",
            "heldout",
            "generated__elbo",
            "heldout__elbo",
            "generated__timestep_loss_t3",
            "generated__timestep_loss_t700",
            "heldout__timestep_loss_t3",
            "heldout__timestep_loss_t700",
            "generated__trajectory",
        ]
    )
    seed = config["seeds"]["measure"]
    # the loss keeps today's key, streams and values
    np.testing.assert_array_equal(
        out["heldout"], measure_loss(model, images, config["diffusion"], config["measure"], seed, 1, "cpu")
    )
    # the batch functions with measure.batch_size rows, as measure_queries calls them: the very same float32 work, so
    # equal bit for bit (at their default 500 rows the batches differ and so do the last bits)
    rows, settings = config["measure"]["batch_size"], L.measure_settings(config["measure"])
    elbo = L.measure_elbo(model, images, config["diffusion"], settings["elbo"], LEVELS, seed, 1, "cpu", rows)
    np.testing.assert_array_equal(out["heldout__elbo"], elbo["nats"])
    ts = L.measure_timestep_losses(model, images, config["diffusion"], [3, 700], 2, seed, 1, "cpu", rows)
    np.testing.assert_array_equal(out["heldout__timestep_loss_t700"], ts[:, 1])
    np.testing.assert_array_equal(
        out["generated__trajectory"],
        L.measure_trajectory_nll(
            model, traj, timesteps, config["diffusion"], settings["trajectory"]["clip_x0"], "cpu", rows
        )["nats"],
    )
    with pytest.raises(ValueError, match="samples"):
        L.measure_queries(model, queries, config)
    # measurement files of 2 subsets x 1 seed -> targets per query set
    paths = []
    for j in range(2):
        paths.append(tmp_path / f"m{j}.npz")
        save_npz(paths[-1], subset=np.array(j), replicate=np.array(0), **{k: v + j for k, v in out.items()})
    targets = L.load_measurement_targets([str(p) for p in paths], 2, 1, "elbo")
    assert set(targets) == {"generated", "heldout"} and targets["heldout"].shape == (2, 1, 3)
    np.testing.assert_allclose(targets["heldout"][1, 0], out["heldout__elbo"] + 1)
    assert set(L.load_measurement_targets([str(p) for p in paths], 2, 1, "trajectory")) == {"generated"}
    from workflow_scripts.families.likelihood import load_targets

    old = load_targets([str(p) for p in paths], 2, 1)  # today's loader still reads the loss
    new = L.load_measurement_targets([str(p) for p in paths], 2, 1, "loss")
    for name in ("generated", "heldout"):
        np.testing.assert_array_equal(old[name], new[name])
