"""K-FAC influence: curvature scaling, exactness, EK-FAC, the curvlinops trap, influence vs retraining,
int8 queries, curvature files. Models are tiny so the whole file runs in well under a minute on one CPU thread."""

import numpy as np
import pytest
import torch
from fakes import TINY_MODEL, DenseCurvature
from scipy.stats import pearsonr, spearmanr
from torch import nn

from workflow_scripts.core import curvature as C
from workflow_scripts.core import measurement
from workflow_scripts.core.common import ArtefactError, save_torch
from workflow_scripts.engines import kfac as K
from workflow_scripts.families.ddpm import alphas_cumprod, build_model
from workflow_scripts.stages import curvature

torch.set_num_threads(1)
DIFFUSION = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}
TINY_UNET = {**TINY_MODEL, "block_out_channels": [8, 8]}
SEED = 5
EPS32 = torch.finfo(torch.float32).eps


class LinearDenoiser(nn.Module):
    """eps_theta(x_t, t) = W u(x_t, t) (+ b): linear in theta, so the training loss is quadratic and GGN = Hessian."""

    def __init__(self, image_shape, bias: bool):
        super().__init__()
        self.image_shape = tuple(image_shape)
        d = int(np.prod(image_shape))
        self.n_features = d + 4 + (0 if bias else 1)
        self.linear = nn.Linear(self.n_features, d, bias=bias)

    def features(self, x_t, t):
        s = t.to(x_t.dtype)[:, None] / 1000.0
        parts = [x_t.flatten(1), s, s**2, torch.sin(3 * s), torch.cos(3 * s)]
        if self.linear.bias is None:
            parts.append(torch.ones_like(s))
        return torch.cat(parts, dim=1)

    def forward(self, x_t, t):
        return self.linear(self.features(x_t, t)).view(-1, *self.image_shape)


class TinyDenoiser(nn.Module):
    """Conv -> GroupNorm -> + time embedding -> tanh -> conv: weight sharing, a norm layer, a Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.temb = nn.Linear(2, 3)
        self.conv2 = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x_t, t):
        s = t.float()[:, None] / 1000.0
        h = self.norm(self.conv1(x_t)) + self.temb(torch.cat([torch.sin(s), torch.cos(s)], 1))[:, :, None, None]
        return self.conv2(torch.tanh(h))


def _images(n, shape=(1, 2, 2), seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, *shape)).astype(np.float32)


def _loss_rows(model, images, k, stream=C.CURVATURE_STREAM):
    """x_t, t, eps of every (example, draw) row, exactly as the curvature's data loader draws them."""
    t, eps = C.random_draws(len(images), k, images.shape[1:], 1000, SEED, stream)
    a = alphas_cumprod(DIFFUSION)[t.flatten()].view(-1, 1, 1, 1)
    x0 = torch.from_numpy(images).repeat_interleave(k, 0)
    eps = eps.flatten(0, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t.flatten(), eps


def _autograd_hessian(model, images, k, layout):
    """Hessian of L = mean_i mean_k ||eps - eps_theta||^2 / D w.r.t. the layout's parameters (autograd, float64)."""
    x_t, t, eps = _loss_rows(model, images, k)
    base = {n: p.detach().double() for n, p in model.named_parameters()}
    model = model.double()
    flat0 = torch.cat([base[n].flatten() for n in layout.names])

    def loss(flat):
        params = dict(base)
        for n, shape in zip(layout.names, layout.shapes):
            params[n] = flat[layout.slice(n)].view(shape)
        pred = torch.func.functional_call(model, params, (x_t.double(), t))
        return (eps.double() - pred).pow(2).flatten(1).mean(1).mean()

    hess = torch.autograd.functional.hessian(loss, flat0)
    model.float()
    return hess


# ---------------------------------------------------------------------------------------------------------------
# (a) scaling and exactness
# ---------------------------------------------------------------------------------------------------------------
def test_ggn_scaling_matches_autograd_hessian_of_our_loss():
    """curvlinops GGN over our (example, draw) rows with MSELoss(mean) == Hessian of the mean simple loss
    (linear denoiser: GGN = Hessian); K-FAC type-2 (joint weight/bias) is exact for one linear layer."""
    from curvlinops import GGNLinearOperator

    torch.manual_seed(0)
    model = LinearDenoiser((1, 2, 2), bias=True)
    images, k = _images(5), 3
    layout = C.ParamLayout.of(model)
    hess = _autograd_hessian(model, images, k, layout)
    wrapper = C.PackedDenoiser(model, images.shape[1:])
    data = C.DrawBatches(torch.from_numpy(images), k, alphas_cumprod(DIFFUSION), SEED, C.CURVATURE_STREAM, batch_rows=4)
    params = [p for _, p in wrapper.named_parameters()]
    ggn = GGNLinearOperator(wrapper, nn.MSELoss(), params, list(data), check_deterministic=False) @ torch.eye(
        layout.n_params
    )
    torch.testing.assert_close(ggn.double(), hess, rtol=1e-4, atol=1e-7)
    # the factor 2 and 1/D: H = 2/(N K D) sum_rows [u;1][u;1]^T (x) I_D, u the denoiser's features
    x_t, t, _ = _loss_rows(model, images, k)
    # u in float64 from the same x_t as the autograd Hessian (float32 features were 1 ulp from its sin/cos: 0.5 x the
    # tolerance); both are then float64 sums of N K products, ~1e-15 apart, and a wrong factor 2 or 1/D is O(1)
    u = torch.cat([model.features(x_t.double(), t), torch.ones(len(t), 1, dtype=torch.float64)], 1)
    expected = torch.kron(torch.eye(4, dtype=torch.float64), u.T @ u) * 2 / (len(t) * 4)  # index (o, j), j = 8: bias
    perm = [o * 9 + j for o in range(4) for j in range(8)] + [o * 9 + 8 for o in range(4)]  # -> (weight, bias) order
    torch.testing.assert_close(hess, expected[perm][:, perm], rtol=1e-6, atol=1e-9)
    kfac = curvature.fit_curvature(
        model, images, {"fisher_type": "type-2", "draws": k, "batch_size": 4}, DIFFUSION, SEED
    )
    torch.testing.assert_close(kfac.dense(), hess, rtol=1e-4, atol=1e-7)
    # separate weight and bias blocks drop the weight-bias cross terms: no longer exact (the check can fail)
    sep = curvature.fit_curvature(
        model, images, {"fisher_type": "type-2", "draws": k, "separate_weight_and_bias": True}, DIFFUSION, SEED
    )
    assert (sep.dense() - hess).abs().max() > 1e-2 * hess.abs().max()


def _deep_linear(n_data):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(3, 2))
    x, y = torch.randn(n_data, 3), torch.randn(n_data, 2)
    return net, [(x, y)]


def _block_mask(layout):
    mask = torch.zeros(layout.n_params, layout.n_params, dtype=torch.bool)
    for i in range(3):
        a, b = layout.offsets[2 * i], layout.offsets[2 * i + 2]
        mask[a:b, a:b] = True
    return mask


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("n_data", [1, 5])
def test_kfac_exact_for_deep_linear_network(kfac_approx, n_data):
    """Type-2 K-FAC == exact GGN block diagonal for a deep linear network with MSE (one datum, and several:
    the output-gradient factor does not depend on the input); the empirical K-FAC == EF for one datum."""
    from curvlinops import EFLinearOperator, GGNLinearOperator

    net, data = _deep_linear(n_data)
    names = [n for n, _ in net.named_parameters()]
    layout = C.ParamLayout.of(net, names)
    params = list(net.parameters())
    mask = _block_mask(layout)
    ggn = GGNLinearOperator(net, nn.MSELoss(), params, data, check_deterministic=False) @ torch.eye(layout.n_params)
    assert ggn[~mask].abs().max() > 1e-3  # off-diagonal blocks exist: K-FAC is exact only block-wise
    kfac = C.kfac_from_data(net, names, data, n_data, {"fisher_type": "type-2", "kfac_approx": kfac_approx}, seed=0)
    torch.testing.assert_close(kfac.dense().float(), ggn * mask, rtol=1e-4, atol=1e-6)
    if n_data == 1:
        ef = EFLinearOperator(net, nn.MSELoss(), params, data, check_deterministic=False) @ torch.eye(layout.n_params)
        emp = C.kfac_from_data(net, names, data, 1, {"fisher_type": "empirical", "kfac_approx": kfac_approx}, seed=0)
        torch.testing.assert_close(emp.dense().float(), ef * mask, rtol=1e-4, atol=1e-6)
        # MC-Fisher: unbiased for the GGN; with many sampled targets close to it
        mc = C.kfac_from_data(
            net, names, data, 1, {"fisher_type": "mc", "fisher_mc_samples": 4000, "kfac_approx": kfac_approx}, seed=0
        )
        rel = (mc.dense().float() - ggn * mask).norm() / (ggn * mask).norm()
        assert rel < 0.08


# ---------------------------------------------------------------------------------------------------------------
# (c) the curvlinops 3.0.1 check_deterministic trap
# ---------------------------------------------------------------------------------------------------------------
def test_factors_not_doubled_by_check_deterministic():
    from curvlinops import KFACLinearOperator

    torch.manual_seed(0)
    model = LinearDenoiser((1, 2, 2), bias=True)
    images, k = _images(4), 2
    settings = {"fisher_type": "type-2", "draws": k}
    checked = curvature.fit_curvature(model, images, settings, DIFFUSION, SEED, check_deterministic=True)
    fresh = curvature.fit_curvature(model, images, settings, DIFFUSION, SEED, check_deterministic=False)
    torch.testing.assert_close(checked.eigenvalues(), fresh.eigenvalues(), rtol=1e-5, atol=1e-10)
    hess = _autograd_hessian(model, images, k, C.ParamLayout.of(model))
    torch.testing.assert_close(checked.dense(), hess, rtol=1e-4, atol=1e-7)
    # the trap itself (documents why _compute_factors_once exists): naive recompute doubles the factors
    wrapper = C.PackedDenoiser(model, images.shape[1:])
    data = C.DrawBatches(torch.from_numpy(images), k, alphas_cumprod(DIFFUSION), SEED, C.CURVATURE_STREAM, 256)
    naive = KFACLinearOperator(
        wrapper,
        nn.MSELoss(),
        list(wrapper.parameters()),
        data,
        fisher_type="type-2",
        num_per_example_loss_terms=1,
        num_data=data.num_rows,
        check_deterministic=True,
    )
    naive.compute_kronecker_factors()
    g = naive._gradient_covariances["model.linear"]
    torch.testing.assert_close(g.trace().double(), 2 * fresh.blocks[0].g_vals.sum(), rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# (f) EK-FAC
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fisher_type, kfac_approx", [("type-2", "expand"), ("empirical", "reduce")])
def test_ekfac_eigenvalues_are_ggn_diagonal_in_kfac_basis(fisher_type, kfac_approx):
    from curvlinops import EFLinearOperator, GGNLinearOperator

    torch.manual_seed(2)
    model = TinyDenoiser()
    images, k = _images(3, (1, 4, 4), seed=3), 2
    layout = C.ParamLayout.of(model)
    assert "norm.weight" not in layout.names and "conv1.weight" in layout.names
    cur = curvature.fit_curvature(
        model,
        images,
        {"fisher_type": fisher_type, "kfac_approx": kfac_approx, "ekfac": True, "draws": k},
        DIFFUSION,
        SEED,
    )
    assert cur.is_ekfac
    wrapper = C.PackedDenoiser(model, images.shape[1:])
    data = list(C.DrawBatches(torch.from_numpy(images), k, alphas_cumprod(DIFFUSION), SEED, C.CURVATURE_STREAM, 256))
    named = dict(wrapper.named_parameters())
    params = [named["model." + n] for n in layout.names]
    op = GGNLinearOperator if fisher_type == "type-2" else EFLinearOperator
    dense = (op(wrapper, nn.MSELoss(), params, data, check_deterministic=False) @ torch.eye(layout.n_params)).double()
    basis = cur.to_eigenbasis(torch.eye(layout.n_params, dtype=torch.float64))  # columns: eigenvectors
    diag = torch.diagonal(basis.T @ dense @ basis)
    torch.testing.assert_close(cur.eigenvalues(), diag, rtol=1e-3, atol=1e-6 * diag.max().item())
    # and they differ from the plain K-FAC eigenvalues (which EK-FAC corrects)
    assert (cur.kfac_view().eigenvalues() - diag).abs().max() > 1e-2 * diag.max()


# ---------------------------------------------------------------------------------------------------------------
# (b) influence == retraining to the closed-form optimum, up to the first-order error
# ---------------------------------------------------------------------------------------------------------------
def _lstsq_rows(model, images, draws):
    d = draws
    x0 = torch.from_numpy(images)[:, None]
    x_t = d["signal"].view(*d["signal"].shape, 1, 1, 1) * x0 + d["noise"].view(*d["noise"].shape, 1, 1, 1) * d["eps"]
    n, k = d["t"].shape
    u = model.features(x_t.flatten(0, 1), d["t"].flatten()).double().view(n, k, -1)
    return u, d["eps"].flatten(2).double()


def test_influence_matches_retraining_for_linear_denoiser():
    torch.manual_seed(0)
    shape, n, k, n_query = (1, 2, 2), 200, 8, 6
    model = LinearDenoiser(shape, bias=False)
    images, queries = _images(n, shape, seed=4), _images(n_query, shape, seed=5)
    cfg = {
        "kfac": {"gradient_draws": k, "query_draws": 16, "batch_size": 64, "quantization": "float32"},
        "diffusion": DIFFUSION,
        "seeds": {"gradients": SEED},
    }
    train_m, query_m = K.loss_measurement(cfg, "train"), K.loss_measurement(cfg, "query")
    u, eps = _lstsq_rows(model, images, train_m.draws(n, shape))
    uq, epsq = _lstsq_rows(model, queries, query_m.draws(n_query, shape))
    uu, ue = torch.einsum("nki,nkj->nij", u, u), torch.einsum("nki,nkj->nij", u, eps)

    def optimum(keep):
        return torch.linalg.solve(uu[keep].sum(0), ue[keep].sum(0)).T  # W (D, d_u), normal equations

    def query_loss(w):
        return (epsq - uq @ w.T).pow(2).mean((1, 2))  # (n_query,)

    everyone = torch.ones(n, dtype=torch.bool)
    w_star = optimum(everyone)
    base = query_loss(w_star)
    actual = torch.stack(
        [query_loss(optimum(everyone.clone().index_fill_(0, torch.tensor([j]), False))) - base for j in range(n)], dim=1
    ).numpy()
    with torch.no_grad():
        model.linear.weight.copy_(w_star.float())
    layout = C.ParamLayout.of(model)
    d_out = int(np.prod(shape))
    hessian = torch.kron(torch.eye(d_out, dtype=torch.float64), uu.sum(0)) * 2 / (n * k * d_out)
    exact = DenseCurvature(hessian, layout)
    grads = {"q": measurement.gradients(model, layout, queries, query_m, 64, "cpu")}
    predicted = K.influence_scores(model, exact, images, grads, train_m, [0.0], 64, "cpu", "float32")[0][1]["q"]
    rel = np.linalg.norm(predicted - actual) / np.linalg.norm(actual)
    assert rel < 0.1, rel
    assert spearmanr(predicted.ravel(), actual.ravel())[0] > 0.99
    assert min(spearmanr(p, a)[0] for p, a in zip(predicted, actual)) > 0.98
    # K-FAC type-2 on the same rows is exact here (one layer, constant output Hessian) ...
    kfac = curvature.fit_curvature(
        model, images, {"fisher_type": "type-2", "draws": k}, DIFFUSION, SEED, stream=C.TRAIN_GRADIENT_STREAM
    )
    torch.testing.assert_close(kfac.dense(), hessian, rtol=1e-4, atol=1e-9)
    # ... and the MC-Fisher K-FAC with its own draws and a small damping ranks the same
    mc = curvature.fit_curvature(model, images, {"fisher_type": "mc", "draws": k}, DIFFUSION, SEED)
    approx = K.influence_scores(model, mc, images, grads, train_m, [1e-3], 64, "cpu", "int8")[0][1]["q"]
    assert spearmanr(approx.ravel(), actual.ravel())[0] > 0.95
    assert np.linalg.norm(approx - actual) / np.linalg.norm(actual) < 0.3


# ---------------------------------------------------------------------------------------------------------------
# (d) int8 queries
# ---------------------------------------------------------------------------------------------------------------
def test_int8_round_trip_error_bounded_per_tensor():
    layout = C.ParamLayout(["a", "b", "c"], [(3, 4), (5,), (2, 2, 2)])
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(7, layout.n_params, generator=gen, dtype=torch.float64)
    rows[:, layout.slice("b")] *= 1e-4  # very different ranges per tensor
    rows[0, layout.slice("c")] = 3.0  # a constant tensor
    q = K.quantize_per_tensor(rows, layout)
    back = q.dequantize().double()
    for name in layout.names:
        part, err = rows[:, layout.slice(name)], (back - rows)[:, layout.slice(name)].abs().max(1).values
        spread = part.max(1).values - part.min(1).values
        assert bool((err <= spread / 255).all()), name  # the stated bound ...
        assert bool((err <= spread / 510 * (1 + 1e-5) + 1e-7 * part.abs().max(1).values).all()), (
            name
        )  # ... rounding: half a step
    torch.testing.assert_close(back[0, layout.slice("c")], rows[0, layout.slice("c")])
    g = torch.randn(4, layout.n_params, generator=gen)
    # two float32 orders of the same sums: (largest tensor + tensors + 2) eps32 x the magnitude of both evaluations'
    # terms (scale * code * g and low * g per tensor; dequantised * g), Higham's worst case; a tensor's scale, offset
    # or low mixed up is O(1) away
    terms = q.dequantize().double().abs() @ g.double().abs().T
    for j, (a, b) in enumerate(zip(layout.offsets[:-1], layout.offsets[1:])):
        gj = g[:, a:b].double().abs()
        terms += q.scale[:, j : j + 1].double() * (q.codes[:, a:b].double() @ gj.T) + q.low[
            :, j : j + 1
        ].double().abs() * gj.sum(1)
    length = int(np.diff(layout.offsets).max()) + len(layout.names) + 2
    assert bool(((q.matmul_t(g) - q.dequantize() @ g.T).abs() <= length * EPS32 * terms).all())


@pytest.fixture(scope="module")
def tiny_unet_case():
    torch.manual_seed(0)
    model = build_model(TINY_UNET, (1, 8, 8))
    from workflow_scripts.core.data import load_digits_images

    images = load_digits_images()[0][:24]
    cur = curvature.fit_curvature(model, images[:16], {"draws": 4, "batch_size": 64}, DIFFUSION, SEED)
    return model, images[:16], {"generated": images[16:19], "heldout": images[19:24]}, cur


def _cfg(**kfac):
    return {
        "kfac": {"gradient_draws": 4, "query_draws": 8, "batch_size": 64, **kfac},
        "diffusion": DIFFUSION,
        "seeds": {"gradients": SEED, "measure": 4},
        "measure": {"n_timesteps": 5, "n_noise": 2},
    }


def test_int8_and_float32_query_scores_agree(tiny_unet_case):
    model, train, queries, cur = tiny_unet_case
    lambdas = [1e-3, 1e-1]
    s8 = K.kfac_scores(model, cur, train, queries, _cfg(quantization="int8"), lambdas)
    s32 = K.kfac_scores(model, cur, train, queries, _cfg(quantization="float32"), lambdas)
    for (l8, a), (l32, b) in zip(s8, s32):
        assert l8 == l32
        for name in queries:
            assert a[name].shape == (len(queries[name]), len(train)) and a[name].dtype == np.float32
            for row8, row32 in zip(a[name], b[name]):
                assert pearsonr(row8, row32)[0] > 0.99


# ---------------------------------------------------------------------------------------------------------------
# UNet: parameters covered, variants, lambda sweep without recomputing gradients
# ---------------------------------------------------------------------------------------------------------------
def test_curvature_covers_linear_and_conv_layers_not_norms(base_config):
    model = build_model(base_config["model"], (1, 8, 8))
    names = C.curvature_param_names(model)
    modules = dict(model.named_modules())
    expected = [
        n for n, p in model.named_parameters() if isinstance(modules[n.rsplit(".", 1)[0]], (nn.Linear, nn.Conv2d))
    ]
    assert sorted(names) == sorted(expected)
    assert any(".to_q." in n for n in names) and any("time_embedding" in n for n in names)
    assert not any(isinstance(modules[n.rsplit(".", 1)[0]], nn.GroupNorm) for n in names)
    norms = [n for n, p in model.named_parameters() if isinstance(modules[n.rsplit(".", 1)[0]], nn.GroupNorm)]
    assert norms and len(names) + len(norms) == len(list(model.parameters()))


def test_unet_variants_fit(tiny_unet_case):
    model, train, _, expand = tiny_unet_case
    reduce = curvature.fit_curvature(
        model,
        train[:8],
        {"draws": 2, "kfac_approx": "reduce", "fisher_type": "empirical", "ekfac": True},
        DIFFUSION,
        SEED,
    )
    for cur in (expand, reduce, reduce.kfac_view()):
        eig = cur.eigenvalues()
        assert eig.shape == (cur.layout.n_params,) and bool(torch.isfinite(eig).all()) and bool((eig >= 0).all())
    assert reduce.is_ekfac and not expand.is_ekfac
    v = torch.randn(2, expand.layout.n_params, dtype=torch.float64)
    torch.testing.assert_close(expand.from_eigenbasis(expand.to_eigenbasis(v)), v)  # orthonormal basis


@pytest.mark.parametrize("separate", [False, True])
def test_fast_factors_equal_curvlinops_factors(tiny_unet_case, separate, monkeypatch):
    """The fit's faster covariance hooks (unfold + chunked float64 symmetric rank-k update) give curvlinops' factors
    (computed by curvlinops on float64 copies)."""
    model, train, _, _ = tiny_unet_case
    monkeypatch.setattr(C, "_CHUNK_BYTES", 4096)  # a few rows per float64 chunk: the chunks must add up
    settings = {"draws": 2, "fisher_type": "empirical", "separate_weight_and_bias": separate}
    fast = curvature.fit_curvature(model, train[:6], settings, DIFFUSION, SEED)
    stock = curvature.fit_curvature(model, train[:6], {**settings, "fast_factors": False}, DIFFUSION, SEED)
    assert len(fast.blocks) == len(stock.blocks) == len(C.curvature_modules(model)) * (2 if separate else 1)
    for a, b in zip(fast.blocks, stock.blocks):
        assert (a.module, a.weight, a.bias) == (b.module, b.weight, b.bias)
        # both accumulate float64 sums of the same float32 products: they differ by summation order only (~1e-15),
        # far below a float32 accumulation's ~1e-7
        torch.testing.assert_close(a.a_vals, b.a_vals, rtol=1e-10, atol=1e-12 * float(b.a_vals.max()))
        torch.testing.assert_close(a.g_vals, b.g_vals, rtol=1e-10, atol=1e-12 * float(b.g_vals.max()))
        # eigenvectors are defined up to sign / rotation within repeated eigenvalues: compare the factors
        for vecs, vals in (("a_vecs", "a_vals"), ("g_vecs", "g_vals")):
            fa = getattr(a, vecs) @ torch.diag(getattr(a, vals)) @ getattr(a, vecs).T
            fb = getattr(b, vecs) @ torch.diag(getattr(b, vals)) @ getattr(b, vecs).T
            torch.testing.assert_close(fa, fb, rtol=1e-10, atol=1e-12 * float(fb.abs().max()))


@pytest.mark.parametrize("products", ["float64", "model"])
@pytest.mark.parametrize("order", ["auto", "rotate_first", "form_first"])
@pytest.mark.parametrize("separate, fisher_type", [(False, "mc"), (True, "empirical")])
def test_fast_ekfac_correction_equals_curvlinops(tiny_unet_case, separate, fisher_type, order, products, monkeypatch):
    """The faster eigenvalue correction gives curvlinops' corrected eigenvalues (same K-FAC factors, same basis),
    whichever order it multiplies in: rotating each row's weight gradient, or rotating both sides first; with its
    products in float64 (the algorithm, to summation order) and in the model's float32 (the default)."""
    model, train, _, _ = tiny_unet_case
    monkeypatch.setattr(C, "_EKFAC_ORDER", order)
    monkeypatch.setattr(C, "_CORRECTION_PRODUCTS", products)
    monkeypatch.setattr(C, "_fast_kfac_class", C._float64_kfac_class)  # identical factors -> identical basis
    monkeypatch.setattr(C, "_CHUNK_BYTES", 4096)  # one row per float64 chunk of per-row gradients
    settings = {"draws": 2, "fisher_type": fisher_type, "separate_weight_and_bias": separate, "ekfac": True}
    fast = curvature.fit_curvature(model, train[:6], settings, DIFFUSION, SEED)
    stock = curvature.fit_curvature(model, train[:6], {**settings, "fast_factors": False}, DIFFUSION, SEED)
    for a, b in zip(fast.blocks, stock.blocks):
        torch.testing.assert_close(a.g_vecs, b.g_vecs, rtol=0, atol=0)
        if products == "float64":  # float64 sums of float64 products in another order: ~1e-15
            torch.testing.assert_close(a.corrected, b.corrected, rtol=1e-9, atol=1e-12 * float(b.corrected.max()))
        else:
            # float32 products: each rotated coordinate carries ~sqrt(d) eps32 ~ 1e-6 relative rounding (rtol 1e-5;
            # measured <= 3e-7), a near-zero one ~eps32^2 of the layer's largest (atol; e.g. the bias before a
            # GroupNorm, whose gradient is zero but for rounding); a wrong basis or scale is O(1) off
            scale = max(float(c.corrected.max()) for c in stock.blocks if c.module == b.module)
            torch.testing.assert_close(a.corrected, b.corrected, rtol=1e-5, atol=1e-9 * scale)


def test_ekfac_order_takes_the_cheaper_product():
    # 4x4 conv level (16 positions, 32 -> 32 channels, 288 inputs): rotating both sides first is ~2x cheaper;
    # 8x8 (64 positions): forming the row gradient first is; a linear layer over 8 tokens: rotating first
    assert C._rotate_first(32, 16, 288) and not C._rotate_first(32, 64, 288) and C._rotate_first(32, 8, 33)


def test_lambda_sweep_reuses_gradients(tiny_unet_case, monkeypatch):
    model, train, queries, cur = tiny_unet_case
    calls = []
    original = measurement.per_example_gradients
    monkeypatch.setattr(measurement, "per_example_gradients", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    one = K.kfac_scores(model, cur, train, queries, _cfg(query_draws="measure"), [1e-2])
    n_one = len(calls)
    calls.clear()
    three = K.kfac_scores(model, cur, train, queries, _cfg(query_draws="measure"), [1e-4, 1e-2, 1.0])
    assert len(calls) == n_one  # gradient batches computed once for every lambda
    np.testing.assert_allclose(three[1][1]["heldout"], one[0][1]["heldout"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(three[0][1]["heldout"], three[2][1]["heldout"])
    # damping large: scores -> (1/N) g_q . g_i / lambda_abs, i.e. proportional to the gradient dot product
    big = K.kfac_scores(model, cur, train, queries, _cfg(query_draws="measure", quantization="float32"), [1e6])[0][1]
    layout = cur.layout
    gq = measurement.gradients(
        model,
        layout,
        queries["heldout"],
        K.loss_measurement(_cfg(query_draws="measure"), "query", stream_index=1),
        64,
        "cpu",
    )
    gt = measurement.gradients(model, layout, train, K.loss_measurement(_cfg(), "train"), 64, "cpu")
    dot = (gq.double() @ gt.double().T).numpy() / len(train) / cur.absolute_damping(1e6)
    np.testing.assert_allclose(big["heldout"], dot, rtol=2e-3, atol=1e-6 * np.abs(dot).max())


# ---------------------------------------------------------------------------------------------------------------
# (e) curvature files
# ---------------------------------------------------------------------------------------------------------------
def test_curvature_file_round_trip_and_refuses_other_config(tmp_path):
    torch.manual_seed(0)
    model = LinearDenoiser((1, 2, 2), bias=True)
    images = _images(6)
    settings = {"draws": 3, "ekfac": True}
    extra = {"checkpoint": "abc"}
    cur = curvature.fit_curvature(model, images, settings, DIFFUSION, SEED, extra_config=extra)
    path = tmp_path / "curvature.pt"
    cur.save(path)
    expected = C.curvature_config(settings, DIFFUSION, SEED, images, extra)
    back = C.load_curvature(path, expected)
    torch.testing.assert_close(back.eigenvalues(), cur.eigenvalues(), rtol=0, atol=0)
    torch.testing.assert_close(back.dense(), cur.dense(), rtol=0, atol=0)
    assert back.is_ekfac and back.layout.names == cur.layout.names
    for changed in ({**settings, "draws": 4}, {**settings, "ekfac": False}, {**settings, "fisher_type": "empirical"}):
        with pytest.raises(ArtefactError, match="different configuration"):
            C.load_curvature(path, C.curvature_config(changed, DIFFUSION, SEED, images, extra))
    with pytest.raises(ArtefactError, match="seed"):
        C.load_curvature(path, C.curvature_config(settings, DIFFUSION, SEED + 1, images, extra))
    with pytest.raises(ArtefactError, match="images"):
        C.load_curvature(path, C.curvature_config(settings, DIFFUSION, SEED, images[::-1].copy(), extra))
    with pytest.raises(ArtefactError, match="checkpoint"):
        C.load_curvature(path, C.curvature_config(settings, DIFFUSION, SEED, images, {"checkpoint": "xyz"}))
    save_torch({"kind": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ArtefactError, match="not a version"):
        C.load_curvature(tmp_path / "other.pt")


@pytest.mark.parametrize("quantization", ["int8", "float32"])
def test_query_batches_give_the_same_scores(tiny_unet_case, monkeypatch, quantization):
    """kfac.query_batch (CIFAR scale: query gradients have n_params entries) holds at most that many queries' gradients
    at once, at one pass of training gradients per batch; the scores are those of all queries at once (each query
    uses its own draws: measure draws of query `offset + i`)."""
    model, train, queries, cur = tiny_unet_case
    passes = []
    original = K.score_pass
    monkeypatch.setattr(  # one pass of training gradients per query group: record the group's query rows
        K,
        "score_pass",
        lambda *a, **kw: passes.append({k: len(v) for k, v in a[4][0][0].items()}) or original(*a, **kw),
    )
    whole = K.kfac_scores(
        model, cur, train, queries, _cfg(query_draws="measure", quantization=quantization), [1e-3, 1e-1]
    )
    assert passes == [{"generated": 3, "heldout": 5}]
    passes.clear()
    batched = K.kfac_scores(
        model, cur, train, queries, _cfg(query_draws="measure", quantization=quantization, query_batch=2), [1e-3, 1e-1]
    )
    assert passes == [{"generated": 2}, {"generated": 1}, {"heldout": 2}, {"heldout": 2}, {"heldout": 1}]
    bounds = _order_bounds(model, cur, train, queries, _cfg(query_draws="measure"), [1e-3, 1e-1], quantization)
    for (la, a), (lb, b), bound in zip(whole, batched, bounds):
        assert la == lb
        for name in queries:
            assert a[name].shape == b[name].shape
            # float32 order (+ int8 code flips) only: another query's draws or row are O(|score|) >= 0.1 magnitude away
            assert (np.abs(b[name] - a[name]) <= bound[name]).all(), (
                name,
                (np.abs(b[name] - a[name]) / bound[name]).max(),
            )


def _order_bounds(model, curvature, train, queries, cfg, lambdas, quantization):
    """Per lambda, {query set: (n_query, n_train)}: how far the same K-FAC scores evaluated in another float32 order
    (other query batch sizes) may be. Float part: L eps32 sum_k |v_qk g_ik| / n_train (v_q the preconditioned query
    gradient, g_i the training gradient), the worst-case rounding bound of a sum of L terms, L = the largest parameter
    tensor + the number of tensors (the score's longest reduction); measured differences are <= 3 eps32 x magnitude.
    int8 adds 4 code steps: a query gradient that differs in its last bits (batch 1 vs 5: ~4e-7 relative) moves a
    few preconditioned entries across a rounding boundary (expected <1 per query, seen <= 2), each changing the score
    by at most scale_qj max_k |g_ik| / n_train for its tensor j. Measured: <3% of the bound; a query with another
    query's draws, or another query's row, is >100x the bound, one quantisation scale shared by a batch's rows ~2x."""
    from workflow_scripts.core.contracts import QUERY_SETS

    layout = curvature.layout
    sizes = np.diff(layout.offsets)
    length = int(sizes.max()) + len(sizes)
    g = K.gradients(model, layout, train, K.loss_measurement(cfg, "train"), 64, "cpu").double().abs()
    g_max = torch.stack([g[:, a:b].max(1).values for a, b in zip(layout.offsets[:-1], layout.offsets[1:])], 1)
    grads = {
        name: K.gradients(
            model, layout, images, K.loss_measurement(cfg, "query", stream_index=QUERY_SETS.index(name)), 64, "cpu"
        )
        for name, images in queries.items()
    }
    out = []
    for lam in lambdas:
        bounds = {}
        for name, q in grads.items():
            v = curvature.precondition(q, lam)
            bound = length * np.finfo(np.float32).eps * (v.abs() @ g.T) / len(train)
            if quantization == "int8":
                step = K.quantize_per_tensor(v, layout).scale.double()  # (n_query, n_tensors)
                bound = bound + 4 * (step[:, None, :] * g_max[None]).amax(2) / len(train)
            bounds[name] = bound.numpy()
        out.append(bounds)
    return out
