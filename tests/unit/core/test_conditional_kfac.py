"""K-FAC influence of a conditional model (the latent family's LatentDenoiser: forward(x_t, t, cond), only LoRA
parameters): the condition reaches the per-example gradient engine, the curvature's data rows and the scores, and the
curvature of the LoRA layers matches a dense GGN of the same loss where K-FAC is exact. Built without a pipeline
directory (fakes.tiny_latent_denoiser); the file runs in well under a minute on one CPU thread."""

import numpy as np
import pytest
import torch
from fakes import tiny_latent_denoiser

from workflow_scripts.core import curvature as C
from workflow_scripts.core import measurement
from workflow_scripts.core.common import save_npz
from workflow_scripts.core.data import load_conditions
from workflow_scripts.engines import kfac as K
from workflow_scripts.families.ddpm import alphas_cumprod
from workflow_scripts.stages import curvature

torch.set_num_threads(1)
DIFFUSION = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}
SEED = 5
EPS32 = torch.finfo(torch.float32).eps
SHAPE = (2, 4, 4)  # the tiny latents


def _latents(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32)


def _train_measurement(k):
    return K.loss_measurement(
        {"kfac": {"gradient_draws": k}, "diffusion": DIFFUSION, "seeds": {"gradients": SEED}}, "train"
    )


@pytest.fixture(scope="module")
def model():
    return tiny_latent_denoiser()


def _float32_gradient_atol(model, gradient) -> float:
    """How far two float32 evaluations of one per-example gradient (vmap over a batch vs autograd of one example) may
    be apart: n eps32 max|g| with n the model's weights and buffers, the rounding of a float32 sum as long as the whole
    model (longer than any reduction of its forward and backward passes) over terms of the gradient's scale."""
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return n * EPS32 * float(gradient.abs().max())


def _autograd_gradient(model, x0, draws, cond):
    """grad of the simple loss of ONE example (its K draws, its condition) w.r.t. the model's parameters."""
    a = draws["signal"].view(-1, 1, 1, 1) * x0[None] + draws["noise"].view(-1, 1, 1, 1) * draws["eps"]
    prediction = model(a, draws["t"], torch.full_like(draws["t"], int(cond)))
    loss = (draws["weight"] * (draws["eps"] - prediction).pow(2).flatten(1).mean(1)).sum()
    params = [p for _, p in model.named_parameters()]
    return loss, torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


# ---------------------------------------------------------------------------------------------------------------
# the per-example gradient engine
# ---------------------------------------------------------------------------------------------------------------
def test_per_example_gradients_equal_autograd_and_cover_only_lora(model):
    """vmap(grad) batches of the engine == autograd of the same loss one example at a time, per caption index; the
    tolerance is float32 rounding only (_float32_gradient_atol, ~6e-3 max|g|; measured <= 2e-6 max|g|) and still
    catches a condition dropped or taken from another example, another example's draws or rows mixed up: each of
    those moves the gradient by O(max|g|) (another caption: 0.64-0.93 max|g| here)."""
    names = [n for n, _ in model.named_parameters()]
    layout = C.ParamLayout.of(model)
    assert layout.names == names and names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not any(".lora_" not in n for n in C.curvature_param_names(model))
    assert sum(b.numel() for b in model.buffers()) > 10 * layout.n_params  # the frozen base: buffers, no gradients
    images, cond, k = _latents(5), np.array([0, 3, 1, 2, 1]), 3
    m = _train_measurement(k)
    batched = measurement.gradients(model, layout, images, m, batch_rows=2 * k, device="cpu", cond=cond)  # 3 batches
    assert batched.shape == (5, layout.n_params) and batched.dtype == torch.float32
    draws = m.draws(len(images), SHAPE, 0)
    for i in range(len(images)):
        _, expected = _autograd_gradient(
            model, torch.from_numpy(images[i]), {k: v[i] for k, v in draws.items()}, cond[i]
        )
        assert expected.abs().max() > 0
        torch.testing.assert_close(batched[i], expected, rtol=0, atol=_float32_gradient_atol(model, expected))
    # the image's draws come from its index in the set (offset), whatever the batch; a conditional model needs cond
    tail = measurement.gradients(model, layout, images[3:], m, 64, "cpu", offset=3, cond=cond[3:])
    torch.testing.assert_close(tail, batched[3:], rtol=0, atol=_float32_gradient_atol(model, batched))
    with pytest.raises(ValueError, match="conditional model needs"):
        measurement.gradients(model, layout, images, m, 64, "cpu")
    with pytest.raises(ValueError, match="one integer per image"):
        measurement.gradients(model, layout, images, m, 64, "cpu", cond=cond[:2])


def test_condition_changes_loss_and_gradients(model):
    """Same image, same draws, other caption index: another loss and another gradient (the condition is used)."""
    layout = C.ParamLayout.of(model)
    image = _latents(1, seed=1)
    m = _train_measurement(4)
    draws = {k: v[0] for k, v in m.draws(1, SHAPE, 0).items()}
    n_conditions = len(model.embeddings)  # the captions and the empty caption
    losses, grads = [], []
    for c in range(n_conditions):
        loss, g = _autograd_gradient(model, torch.from_numpy(image[0]), draws, c)
        engine = measurement.gradients(model, layout, image, m, 64, "cpu", cond=np.array([c]))[0]
        torch.testing.assert_close(engine, g, rtol=0, atol=_float32_gradient_atol(model, g))
        losses.append(loss.item())
        grads.append(engine)
    scale = max(float(g.abs().max()) for g in grads)
    for a in range(n_conditions):
        for b in range(a + 1, n_conditions):
            assert abs(losses[a] - losses[b]) > 1e-3 * abs(losses[a])
            assert (grads[a] - grads[b]).abs().max() > 0.1 * scale


# ---------------------------------------------------------------------------------------------------------------
# the curvature of the LoRA layers against a dense GGN
# ---------------------------------------------------------------------------------------------------------------
def _dense_ggn(model, images, cond, k, stream=C.CURVATURE_STREAM):
    """G = 2 / (R D) sum_rows J^T J over the LoRA parameters (float64 sum of float32 Jacobians), J the Jacobian of
    eps_theta(x_t, t, cond) of each (example, draw) row: the rows of DrawBatches, built here without it."""
    t, eps = C.random_draws(len(images), k, SHAPE, 1000, SEED, stream)
    a = alphas_cumprod(DIFFUSION)[t.flatten()].view(-1, 1, 1, 1)
    x_t = a.sqrt() * torch.from_numpy(images).repeat_interleave(k, 0) + (1 - a).sqrt() * eps.flatten(0, 1)
    c = torch.from_numpy(np.asarray(cond)).repeat_interleave(k, 0)
    params = {n: p.detach() for n, p in model.named_parameters()}
    layout = C.ParamLayout.of(model)
    ggn = torch.zeros(layout.n_params, layout.n_params, dtype=torch.float64)
    for r in range(len(x_t)):

        def output(p, r=r):
            return torch.func.functional_call(
                model, p, (x_t[r : r + 1], t.flatten()[r : r + 1], c[r : r + 1])
            ).flatten()

        jac = torch.func.jacrev(output)(params)
        j = torch.cat([jac[n].flatten(1) for n in layout.names], 1).double()  # (D, P)
        ggn += j.T @ j
    d = int(np.prod(SHAPE))
    return ggn * 2 / (len(x_t) * d), layout


def _block_mask(curv):
    mask = torch.zeros(curv.layout.n_params, curv.layout.n_params, dtype=torch.bool)
    for b in curv.blocks:
        s = curv.layout.slice(b.weight)  # LoRA Linears have no bias: one block per lora_A / lora_B
        mask[s, s] = True
    return mask


@pytest.fixture(scope="module")
def one_position_case():
    """LoRA on the cross-attention value projections only, captions of one token: every LoRA layer sees ONE position
    per row, so for a single (example, draw) row type-2 K-FAC IS the GGN's per-layer diagonal blocks (as for the
    deep linear network with one datum in tests/unit/scorers/test_kfac.py)."""
    model = tiny_latent_denoiser(seed=1, caption_length=1, targets=["attn2.to_v"])
    images, cond = _latents(1, seed=2), np.array([2])
    dense, layout = _dense_ggn(model, images, cond, k=1)
    return model, images, cond, dense, layout


def test_type2_kfac_equals_dense_ggn_blocks_of_lora_layers(one_position_case):
    """Two float32 evaluations of the same products (curvlinops' factors, jacrev's Jacobians): measured 2e-7 max|G|
    apart; 1e-4 max|G| leaves margin, and a wrong condition, draw, factor 2 / D or block is O(max|G|) away (the
    off-block entries are 0.3 max|G|, another caption moves the blocks by 1.3 max|G|)."""
    model, images, cond, dense, layout = one_position_case
    assert len(layout.names) == 8 and all("attn2.to_v.lora_" in n for n in layout.names)  # 4 attentions x (A, B)
    kfac = curvature.fit_curvature(
        model, images, {"fisher_type": "type-2", "draws": 1}, DIFFUSION, SEED, cond=cond, check_deterministic=True
    )
    assert kfac.layout.names == layout.names
    mask = _block_mask(kfac)
    assert dense[~mask].abs().max() > 1e-2 * dense.abs().max()  # K-FAC is exact only block-wise
    atol = 1e-4 * float(dense.abs().max())
    torch.testing.assert_close(kfac.dense(), dense * mask, rtol=1e-4, atol=atol)
    # the condition is in the rows: another caption gives another curvature
    other = curvature.fit_curvature(
        model, images, {"fisher_type": "type-2", "draws": 1}, DIFFUSION, SEED, cond=cond - 1
    )
    assert (other.dense() - kfac.dense()).abs().max() > 100 * atol


def test_mc_expand_default_fit_approaches_dense_ggn_blocks(one_position_case):
    """The workflow's default fit (MC-Fisher, expand) is unbiased for the type-2 K-FAC, i.e. here for the GGN's
    blocks; with S sampled targets its relative error is ~1/sqrt(S) = 0.022 (measured 0.02); 0.1 is ~5 of those,
    while another caption or the type-2 blocks of another row are O(1) away."""
    model, images, cond, dense, _ = one_position_case
    assert (C.DEFAULTS["fisher_type"], C.DEFAULTS["kfac_approx"]) == ("mc", "expand")
    mc = curvature.fit_curvature(model, images, {"draws": 1, "fisher_mc_samples": 2000}, DIFFUSION, SEED, cond=cond)
    blocks = dense * _block_mask(mc)
    rel = float((mc.dense() - blocks).norm() / blocks.norm())
    assert rel < 0.1, rel


def test_ekfac_eigenvalues_are_dense_ggn_diagonal_in_kfac_basis(model):
    """Default LoRA targets (self- and cross-attention, several positions per row: K-FAC itself is not exact): the
    EK-FAC eigenvalues are the diagonal of the dense GGN of the LoRA parameters in the K-FAC eigenbasis, as for the
    unconditional TinyDenoiser in tests/unit/scorers/test_kfac.py -- with the conditions of the rows."""
    images, cond, k = _latents(2, seed=3), np.array([1, 3]), 2
    dense, layout = _dense_ggn(model, images, cond, k)
    cur = curvature.fit_curvature(
        model, images, {"fisher_type": "type-2", "ekfac": True, "draws": k}, DIFFUSION, SEED, cond=cond
    )
    assert cur.is_ekfac and cur.layout.names == layout.names
    assert cur.config["conditions"] == C.conditions_digest(cond)
    basis = cur.to_eigenbasis(torch.eye(layout.n_params, dtype=torch.float64))  # columns: eigenvectors
    diag = torch.diagonal(basis.T @ dense @ basis)
    torch.testing.assert_close(cur.eigenvalues(), diag, rtol=1e-3, atol=1e-6 * diag.max().item())
    assert (cur.kfac_view().eigenvalues() - diag).abs().max() > 1e-2 * diag.max()
    with pytest.raises(ValueError, match="conditional model needs"):
        curvature.fit_curvature(model, images, {"draws": k}, DIFFUSION, SEED)


# ---------------------------------------------------------------------------------------------------------------
# the rows, the conditions of the splits, the scores
# ---------------------------------------------------------------------------------------------------------------
def test_draw_batches_pack_the_condition_per_draw(model):
    images, cond, k = _latents(3), np.array([2, 0, 1]), 2
    a_bar = alphas_cumprod(DIFFUSION)
    plain = list(C.DrawBatches(torch.from_numpy(images), k, a_bar, SEED, C.CURVATURE_STREAM, 4))
    rows = list(C.DrawBatches(torch.from_numpy(images), k, a_bar, SEED, C.CURVATURE_STREAM, 4, torch.from_numpy(cond)))
    assert len(rows) == len(plain) == 2
    packed = torch.cat([x for x, _ in rows])
    torch.testing.assert_close(packed[:, :-1], torch.cat([x for x, _ in plain]), rtol=0, atol=0)  # same x_t and t
    assert packed[:, -1].tolist() == [2, 2, 0, 0, 1, 1]
    wrapper = C.PackedDenoiser(model, SHAPE)
    x, _ = rows[0]
    d = int(np.prod(SHAPE))
    with torch.no_grad():
        expected = model(x[:, :d].view(-1, *SHAPE), x[:, d].long(), x[:, d + 1].long()).flatten(1)
        torch.testing.assert_close(wrapper(x), expected, rtol=0, atol=0)
        with pytest.raises(ValueError, match="columns"):
            wrapper(plain[0][0])  # rows without the condition
    with pytest.raises(ValueError, match="needs its condition"):
        C.denoise(model, x[:, :d].view(-1, *SHAPE), x[:, d].long())


def test_load_conditions(tmp_path):
    dataset, samples = tmp_path / "latents.npz", tmp_path / "generated.npz"
    save_npz(dataset, train_images=_latents(3), train_labels=np.array([0, 2, 1]), heldout_labels=np.array([1, 1]))
    save_npz(samples, images=_latents(2), labels=np.array([2, 0]))
    got = load_conditions(dataset, samples)
    assert sorted(got) == ["extra", "generated", "heldout", "train"] and got["extra"] is None  # no extra file
    got.pop("extra")
    assert (
        got["train"].tolist() == [0, 2, 1] and got["heldout"].tolist() == [1, 1] and got["generated"].tolist() == [2, 0]
    )
    assert all(v.dtype == np.int64 for v in got.values())
    assert load_conditions(dataset, None)["generated"] is None


def test_kfac_scores_use_each_splits_conditions(model):
    """The engine's scores: the training and every query set's gradients with their own conditions; changing the
    generated queries' captions changes their scores only."""
    train, cond = _latents(4, seed=4), np.array([0, 1, 2, 0])
    queries = {"generated": _latents(2, seed=5), "heldout": _latents(2, seed=6)}
    cur = curvature.fit_curvature(model, train, {"draws": 2}, DIFFUSION, SEED, cond=cond)
    cfg = {
        "kfac": {"gradient_draws": 2, "query_draws": 2, "batch_size": 8, "quantization": "float32"},
        "diffusion": DIFFUSION,
        "seeds": {"gradients": SEED},
    }
    conditions = {"train": cond, "generated": np.array([1, 2]), "heldout": np.array([2, 0])}
    ((_, scores),) = K.kfac_scores(model, cur, train, queries, cfg, [1e-2], conditions=conditions)
    ((_, moved),) = K.kfac_scores(
        model, cur, train, queries, cfg, [1e-2], conditions={**conditions, "generated": np.array([0, 0])}
    )
    np.testing.assert_array_equal(moved["heldout"], scores["heldout"])
    assert np.abs(moved["generated"] - scores["generated"]).max() > 0.1 * np.abs(scores["generated"]).max()
    # the scores are the preconditioned dot products of the engine's gradients with those conditions
    layout = cur.layout
    g_train = measurement.gradients(model, layout, train, K.loss_measurement(cfg, "train"), 8, "cpu", cond=cond)
    g_query = measurement.gradients(
        model,
        layout,
        queries["heldout"],
        K.loss_measurement(cfg, "query", stream_index=1),
        8,
        "cpu",
        cond=conditions["heldout"],
    )
    expected = (cur.precondition(g_query, 1e-2) @ g_train.double().T).numpy() / len(train)
    np.testing.assert_allclose(scores["heldout"], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(ValueError, match="conditional model needs"):
        K.kfac_scores(model, cur, train, queries, cfg, [1e-2])
