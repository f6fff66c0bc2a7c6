"""Attribution by unlearning (scorers/unlearning.py, engines/unlearning.py) against references derived here: on a
float64 denoiser that is linear in its parameters the loss is quadratic in them, so one step's score is exactly
eta g_i^T P^-1 g_q + 1/2 delta^T H_i delta; the diagonal Fisher against a per-example autograd loop; the EK-FAC step
against a dense solve; which parameters move; and the sign on a tiny problem. Runs in seconds on one thread."""

import copy

import numpy as np
import pytest
import torch
from fakes import TINY_MODEL, tiny_latent_denoiser
from torch import nn

from workflow_scripts.core.curvature import Block, KFACCurvature, ParamLayout, random_draws
from workflow_scripts.dag.config import ConfigError, validate_config
from workflow_scripts.dag.paths import method_model_inputs
from workflow_scripts.engines import unlearning as U
from workflow_scripts.families.ddpm import alphas_cumprod, build_model
from workflow_scripts.scorers import get_scorer

torch.set_num_threads(1)
DIFFUSION = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}
A_BAR = alphas_cumprod(DIFFUSION)
SEED, SHAPE, D = 3, (1, 2, 2), 4
EPS32, EPS64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)


class LinearDenoiser(nn.Module):
    """eps_theta(x_t, t) = to_k(x) + (1 + t / T) mlp(x), float64: linear in its parameters, so the simple loss is
    exactly quadratic in them. `to_k` is its "attention" parameter subset, `mlp` the rest."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.to_k, self.mlp = nn.Linear(D, D).double(), nn.Linear(D, D).double()

    def forward(self, x_t, t):
        x = x_t.double().flatten(1)
        return (self.to_k(x) + (1 + t.double() / 1000)[:, None] * self.mlp(x)).view(x_t.shape)


def _images(n, seed):
    return np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32)


def _loss_of_flat(theta, x0, t, eps):
    """The simple loss of ONE image over its draws, as a function of the flat parameters [to_k.W, to_k.b, mlp.W,
    mlp.b] of LinearDenoiser, written out here (the reference does not go through the measurement code)."""
    w1, b1 = theta[:16].view(D, D), theta[16:20]
    w2, b2 = theta[20:36].view(D, D), theta[36:40]
    a = A_BAR.double()[t]
    # the draws as the loss measurement holds them: float32 signal / noise scales, a float32 x_t
    x_t = a.sqrt().float().view(-1, 1, 1, 1) * x0[None] + (1 - a).sqrt().float().view(-1, 1, 1, 1) * eps
    x = x_t.double().flatten(1)
    prediction = x @ w1.T + b1 + (1 + t.double() / 1000)[:, None] * (x @ w2.T + b2)
    return (eps.flatten(1) - prediction).pow(2).mean(1).mean()


def _flat(model):
    return torch.cat(
        [p.detach().flatten() for p in (model.to_k.weight, model.to_k.bias, model.mlp.weight, model.mlp.bias)]
    )


def _draws(n, k, stream):
    return random_draws(n, k, SHAPE, len(A_BAR), SEED, stream)


def _grad(theta, x0, t, eps):
    theta = theta.clone().requires_grad_(True)
    return torch.autograd.grad(_loss_of_flat(theta, x0, t, eps), theta)[0]


def _run(model, params, train, query, etas, damping=1e-3, query_draws=8, loss_draws=3):
    layout = U.subset_layout(model, params)
    fisher = U.diagonal_fisher(model, layout, train, U.seeded_measurement(A_BAR, 1, SEED, U.FISHER_STREAM), 64, "cpu")
    step = U.DiagonalStep(fisher, len(train), damping)
    qm = {"q": U.seeded_measurement(A_BAR, query_draws, SEED, U.QUERY_STREAM)}
    lm = U.seeded_measurement(A_BAR, loss_draws, SEED, U.LOSS_STREAM)
    return U.unlearning_scores(model, layout, step, train, {"q": query}, qm, lm, etas, 64, "cpu"), fisher


def test_one_step_score_is_the_quadratic_closed_form():
    """On a loss quadratic in the parameters, S = eta g_i^T P^-1 g_q + 1/2 delta^T H_i delta with P = N (F + damping
    mean F): the reference derives g_q, F, g_i and H_i with autograd from the loss written out above. Tolerance: the
    scores are stored as float32 (rounding 6e-8 relative) over a float64 computation; it still catches a missing or
    doubled N, the step's sign, other draws before and after the step, and a dropped second-order term (checked below
    to be > 1e-3 of the first-order one at the largest eta)."""
    model = LinearDenoiser()
    train, query = _images(5, 0), _images(2, 1)
    etas, damping = [0.5, 20.0], 1e-3
    results, _ = _run(model, "all", train, query, etas, damping)
    theta = _flat(model)
    tf, ef = _draws(len(train), 1, U.FISHER_STREAM)
    fisher = torch.stack([_grad(theta, torch.from_numpy(train[i]), tf[i], ef[i]) ** 2 for i in range(len(train))]).mean(
        0
    )
    p = len(train) * (fisher + damping * fisher.mean())
    tq, eq = _draws(len(query), 8, U.QUERY_STREAM)
    tl, el = _draws(len(train), 3, U.LOSS_STREAM)
    second_order = []
    for (eta, matrices), expected_eta in zip(results, etas):
        assert eta == expected_eta
        for q in range(len(query)):
            delta = eta * _grad(theta, torch.from_numpy(query[q]), tq[q], eq[q]) / p
            for i in range(len(train)):
                x0 = torch.from_numpy(train[i])
                g_i = _grad(theta, x0, tl[i], el[i])
                h_i = torch.autograd.functional.hessian(lambda th: _loss_of_flat(th, x0, tl[i], el[i]), theta)
                first, second = float(g_i @ delta), float(0.5 * delta @ h_i @ delta)
                expected = first + second
                second_order.append(abs(second) / abs(first))
                assert matrices["q"][q, i] == pytest.approx(expected, rel=4 * EPS32, abs=1e3 * EPS64 * abs(first))
    assert max(second_order) > 1e-3  # the test can tell a first-order approximation from the step's actual effect


def test_diagonal_fisher_equals_a_per_example_loop():
    """F = mean_i g_i^2 at one seeded draw per image; float64 throughout, so the tolerance is float64 rounding over
    the model's few sums (1e3 eps64); a square of the mean gradient, a sum instead of a mean or another draw would be
    O(F) away."""
    model = LinearDenoiser(1)
    train = _images(7, 2)
    layout = U.subset_layout(model, "all")
    fisher = U.diagonal_fisher(model, layout, train, U.seeded_measurement(A_BAR, 1, SEED, U.FISHER_STREAM), 3, "cpu")
    t, eps = _draws(len(train), 1, U.FISHER_STREAM)
    theta = _flat(model)
    expected = torch.stack([_grad(theta, torch.from_numpy(train[i]), t[i], eps[i]) ** 2 for i in range(7)]).mean(0)
    assert fisher.dtype == torch.float64 and fisher.shape == (40,)
    torch.testing.assert_close(fisher, expected, rtol=1e3 * EPS64, atol=1e3 * EPS64 * float(expected.max()))


def _random_ekfac(layout, seed=0):
    """A KFACCurvature over LinearDenoiser's two layers (weight + bias in one block) with random orthonormal
    Kronecker eigenbases and random positive EK-FAC eigenvalues."""
    g = torch.Generator().manual_seed(seed)

    def basis(n):
        return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]

    blocks = [
        Block(
            m,
            f"{m}.weight",
            f"{m}.bias",
            D,
            D,
            basis(D + 1),
            torch.rand(D + 1, generator=g, dtype=torch.float64),
            basis(D),
            torch.rand(D, generator=g, dtype=torch.float64),
            torch.rand(D, D + 1, generator=g, dtype=torch.float64) + 0.01,
        )  # fmt: skip
        for m in ("to_k", "mlp")
    ]
    return KFACCurvature(blocks, layout, {})


def test_ekfac_step_is_a_dense_solve_on_the_subset():
    """AbU+: P^-1 g = (1/N) ((G + lambda I)_SS)^-1 g_S, G the EK-FAC curvature as a dense matrix, S the subset (one
    whole block: the attention layer to_k), lambda relative to G's mean eigenvalue. float64 solves of a 20 x 20 system
    with condition number < 1e4: 1e6 eps64 relative; a wrong block, a missing 1/N or the undamped G would be far off."""
    model = LinearDenoiser()
    full = ParamLayout.of(model)
    curvature = _random_ekfac(full)
    layout = U.subset_layout(model, "attention")
    assert layout.names == ["to_k.weight", "to_k.bias"]
    n_train, damping = 9, 0.05
    step = U.CurvatureStep(curvature, layout, n_train, damping)
    g = torch.randn(3, layout.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    dense = curvature.dense()[:20, :20] + damping * curvature.mean_eigenvalue() * torch.eye(20, dtype=torch.float64)
    expected = torch.linalg.solve(dense, g.T).T / n_train
    torch.testing.assert_close(step(g), expected, rtol=1e6 * EPS64, atol=1e6 * EPS64 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="only part of the curvature block to_k"):
        U.CurvatureStep(curvature, ParamLayout.of(model, ["to_k.weight"]), n_train, damping)


def test_only_the_subset_moves_and_the_model_is_untouched():
    """The step moves the parameters of its subset only: shifted_parameters names exactly them, the scores equal
    those of a model copy with only to_k moved by hand, and the model's own parameters are bit-identical after
    scoring. Float64 model, scores stored as float32: 4 eps32 relative. Moving mlp too would change the scores by
    O(1) relative."""
    model = LinearDenoiser()
    before = copy.deepcopy(model.state_dict())
    train, query = _images(4, 5), _images(1, 6)
    (results,), _ = _run(model, "attention", train, query, [5.0])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # bit-identical: the step never writes into the model
    layout = U.subset_layout(model, "attention")
    delta = torch.arange(layout.n_params, dtype=torch.float64)
    shifted = U.shifted_parameters(model, layout, delta)
    assert sorted(shifted) == ["to_k.bias", "to_k.weight"]
    assert torch.equal(shifted["to_k.bias"], model.to_k.bias.detach() + delta[16:])
    # by hand: the same step on a copy, its mlp untouched
    fisher = U.diagonal_fisher(model, layout, train, U.seeded_measurement(A_BAR, 1, SEED, U.FISHER_STREAM), 64, "cpu")
    direction = U.DiagonalStep(fisher, len(train), 1e-3)(
        U.gradients(model, layout, query, U.seeded_measurement(A_BAR, 8, SEED, U.QUERY_STREAM), 64, "cpu")
    )[0]
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.to_k.weight += 5.0 * direction[:16].view(D, D)
        moved.to_k.bias += 5.0 * direction[16:]
    lm = U.seeded_measurement(A_BAR, 3, SEED, U.LOSS_STREAM)
    expected = (U.values(moved, train, lm, 64, "cpu") - U.values(model, train, lm, 64, "cpu")).numpy()
    np.testing.assert_allclose(results[1]["q"][0], expected, rtol=4 * EPS32, atol=1e3 * EPS64 * np.abs(expected).max())


def test_latent_moves_only_lora_adapters():
    """The latent family: the subsets are LoRA adapters only (cross_attention_kv: those of attn2.to_k / to_v), the
    base UNet (buffers) is bit-identical after scoring, and each image's caption reaches the losses (scores of the
    same images under other captions differ). A DDPM UNet has no cross-attention: a clear error naming params."""
    model = tiny_latent_denoiser()
    kv = U.subset_layout(model, "cross_attention_kv").names
    assert kv and all(".attn2.to_k.lora_" in n or ".attn2.to_v.lora_" in n for n in kv)
    assert all(".lora_" in n for n in U.subset_layout(model, "all").names)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    layout = U.subset_layout(model, "cross_attention_kv")
    train = np.random.default_rng(0).normal(size=(3, 2, 4, 4)).astype(np.float32)
    query = train[:1].copy()
    fisher = U.diagonal_fisher(
        model, layout, train, U.seeded_measurement(A_BAR, 1, SEED, U.FISHER_STREAM), 8, "cpu", np.array([0, 1, 2])
    )
    step = U.DiagonalStep(fisher, 3, 1e-3)
    qm = {"q": U.seeded_measurement(A_BAR, 2, SEED, U.QUERY_STREAM)}
    lm = U.seeded_measurement(A_BAR, 2, SEED, U.LOSS_STREAM)

    def scores(train_cond):
        cond = {"train": train_cond, "q": np.array([0])}
        return U.unlearning_scores(model, layout, step, train, {"q": query}, qm, lm, [10.0], 8, "cpu", cond)[0][1]["q"]

    a, b = scores(np.array([0, 1, 2])), scores(np.array([2, 0, 1]))
    assert np.isfinite(a).all() and np.abs(a).max() > 0 and not np.allclose(a, b)
    for name, tensor in model.named_buffers():
        assert torch.equal(tensor, buffers[name]), name
    with pytest.raises(ValueError, match="params 'cross_attention_kv' selects no parameter"):
        U.subset_layout(build_model(TINY_MODEL, (1, 8, 8)), "cross_attention_kv")


def _fitted(model, train, steps=400):
    """The model fitted to the training images by Adam on their simple loss (fresh draws every step): at a fit the
    training gradients share no common part, as at a trained model."""
    x = torch.from_numpy(train)[:, None].double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        t = torch.randint(0, 1000, (len(train), 32), generator=g)
        eps = torch.randn(len(train), 32, *SHAPE, generator=g, dtype=torch.float64)
        a = A_BAR.double()[t].view(*t.shape, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * eps
        loss = (model(x_t.flatten(0, 1), t.flatten()) - eps.flatten(0, 1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_a_query_that_is_a_training_image_scores_it_highest():
    """Sign: unlearning a query that IS a training image of a fitted model raises that image's loss (to first order
    g_q^T P^-1 g_q > 0 up to the draws), more than the others' on average, and most in nearly every case. Not a
    theorem for every row: a cross term g_j^T P^-1 g_q can exceed the self term (measured: 22 of 24 rows have the self
    image on top over these 6 problems, 4 orthonormal images each). A flipped sign fails all three checks. A small
    step (first order: the second-order term raises every image's loss alike)."""
    on_top = 0
    for seed in range(6):
        basis = np.linalg.qr(np.random.default_rng(seed).normal(size=(D, D)))[0]
        train = (3 * basis).reshape(D, *SHAPE).astype(np.float32)
        model = _fitted(LinearDenoiser(2), train)
        (results,), _ = _run(model, "all", train, train.copy(), [1e-3], query_draws=64, loss_draws=64)
        scores = results[1]["q"]
        own = np.diag(scores)
        assert (own > 0).all() and (own > (scores.sum(1) - own) / (D - 1)).all(), seed
        on_top += int((scores.argmax(1) == np.arange(D)).sum())
    assert on_top >= 20


def test_declaration(base_config, smoke_config):
    """The family's configuration: abu reads the model only, abu_ekfac also its curvature variant; a bad entry is
    refused naming the field; the step sizes are the method's grid, not scores.lambda_grid."""
    scorer = get_scorer("unlearning")
    assert method_model_inputs(base_config, "abu") == {"model": "results/digits/models/full/model.pt"}
    assert method_model_inputs(base_config, "abu_ekfac")["curvature"] == "results/digits/curvature/mc-expand-ekfac.pt"
    assert scorer.lambdas(base_config["scores"]["methods"]["abu"], base_config) == [1.0e-4, 1.0e-3, 1.0e-2]
    for entry, field in (
        ({"family": "unlearning"}, "fisher"),
        ({"family": "unlearning", "fisher": "diagonal", "params": "nope"}, "params"),
        ({"family": "unlearning", "fisher": "diagonal", "ekfac": True}, "ekfac"),
    ):
        bad = copy.deepcopy(smoke_config)
        bad["scores"]["methods"]["abu"] = entry
        with pytest.raises(ConfigError, match=rf"scores\.methods\.abu.*{field}"):
            validate_config(bad)


def test_a_params_list_sweeps_each_subset_as_its_own_run():
    """params: [all, attention] gives every (step size, subset) candidate, each the scores of a run of that subset
    alone: the same arithmetic in the same order (the losses at theta shared), so equal to the bit; it catches one
    subset's step moving another's parameters, a Fisher of the wrong subset, or candidates labelled with the wrong
    subset."""
    model = LinearDenoiser()
    train, query = _images(5, 0), _images(2, 1)
    etas = [0.5, 20.0]
    layouts = {name: U.subset_layout(model, name) for name in ("all", "attention")}

    def step_for(layout):
        measurement = U.seeded_measurement(A_BAR, 1, SEED, U.FISHER_STREAM)
        return U.DiagonalStep(U.diagonal_fisher(model, layout, train, measurement, 64, "cpu"), len(train), 1e-3)

    qm = {"q": U.seeded_measurement(A_BAR, 8, SEED, U.QUERY_STREAM)}
    lm = U.seeded_measurement(A_BAR, 3, SEED, U.LOSS_STREAM)
    swept = U.subset_sweep(model, layouts, step_for, train, {"q": query}, qm, lm, etas, 64, "cpu")
    assert [(eta, name) for eta, _, name in swept] == [
        (0.5, "all"),
        (20.0, "all"),
        (0.5, "attention"),
        (20.0, "attention"),
    ]
    for name in layouts:
        alone, _ = _run(model, name, train, query, etas)
        mine = [(eta, matrices) for eta, matrices, subset in swept if subset == name]
        for (eta, expected), (got_eta, got) in zip(alone, mine, strict=True):
            assert got_eta == eta
            np.testing.assert_array_equal(got["q"], expected["q"])
    assert np.abs(swept[0][1]["q"] - swept[2][1]["q"]).max() > 1e-3 * np.abs(swept[0][1]["q"]).max()


def test_a_params_list_is_validated_entry_by_entry(smoke_config):
    """params may be a list of distinct subsets; an unknown or repeated entry is refused naming the field."""
    good = copy.deepcopy(smoke_config)
    good["scores"]["methods"]["abu"] = {"family": "unlearning", "fisher": "diagonal", "params": ["all", "attention"]}
    validate_config(good)
    assert get_scorer("unlearning").settings(good["scores"]["methods"]["abu"], good)["params"] == ["all", "attention"]
    for params in (["all", "nope"], ["all", "all"], []):
        bad = copy.deepcopy(smoke_config)
        bad["scores"]["methods"]["abu"] = {"family": "unlearning", "fisher": "diagonal", "params": params}
        with pytest.raises(ConfigError, match=r"scores\.methods\.abu.*params"):
            validate_config(bad)
