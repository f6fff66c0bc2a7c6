"""K-FAC / EK-FAC factors in float64: a rank-deficient Kronecker factor (fewer data rows than layer inputs) at the
smallest damping of the grid (1e-7 x the mean eigenvalue), against a dense float64 reference built by hand.

The case: a 2-layer MLP, 35 inputs -> 16 tanh -> 5 outputs, MSELoss(mean), 24 rows: the first layer's input factor
A_1 = mean [x, 1][x, 1]^T (36 x 36) has rank 24. Its 12 null directions are exact zeros in float64; accumulated in
float32 they hold rounding noise ~eps32 x ||A_1|| ~ 1e-7 x its mean eigenvalue, i.e. as large as the damping, and the
eigenvectors of its smallest true eigenvalues tilt by as much: the former float32 factors give scores off by 0.4.
"""

import copy

import pytest
import torch
from torch import nn

from workflow_scripts.core import curvature as C
from workflow_scripts.core.common import ArtefactError, load_torch, save_torch

torch.set_num_threads(1)
N_ROWS, D_IN, HIDDEN, D_OUT, N_QUERY = 24, 35, 16, 5, 4
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]
DAMPING = 1e-7  # the smallest relative damping of params.yaml's kfac.lambda_grid
# The float64 fit still runs the model in float32: its layer inputs and output gradients carry ~6e-8 relative
# rounding, which enters only the full-rank factors (measured score error 2e-7 to 4e-7 for K-FAC, 6e-7 to 9e-7 for
# EK-FAC, seeds 0-2); 1e-5 leaves room for that and fails any float32 accumulation of the rank-deficient factor
# (error ~eps32 / damping ~ 1: measured 0.35-0.97 for K-FAC, 0.30-0.63 for EK-FAC with the former float32 code).
TOLERANCE = 1e-5


def _case(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, D_OUT))
    x, y = torch.randn(N_ROWS, D_IN), torch.randn(N_ROWS, D_OUT)
    xq, yq = torch.randn(N_QUERY, D_IN), torch.randn(N_QUERY, D_OUT)
    return net, x, y, xq, yq


def _row_gradients(net, x, y) -> torch.Tensor:
    """Per-row gradients of ||f(x) - y||^2 / D in float64 (weight, bias of each layer: the layout's order)."""
    net = copy.deepcopy(net).double()
    params = dict(net.named_parameters())
    rows = []
    for xi, yi in zip(x.double(), y.double()):
        loss = (net(xi[None]) - yi[None]).pow(2).mean()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, [params[n] for n in NAMES])]))
    return torch.stack(rows)


def _hand_factors(net, x, y, fisher_type: str):
    """float64 K-FAC factors (joint weight and bias, K-FAC-expand) by their definition for MSELoss(mean) over N rows
    and D outputs: A_l = 1/N sum_n a_n a_n^T (a_n = [layer input, 1]); G_l = 1/N sum_n B_n^T S_n B_n with B_n the
    Jacobian of the D outputs w.r.t. the layer's outputs and S_n = 2/D I (type-2: the loss Hessian) or
    4/D r_n r_n^T (empirical, r_n = f(x_n) - y_n; curvlinops' scale). Also the per-row layer gradients B_n^T s a_n^T
    of the columns s of S_n^(1/2), for the EK-FAC correction."""
    net, x, y = copy.deepcopy(net).double().requires_grad_(False), x.double(), y.double()
    first, last = net[0], net[2]
    n, d = len(x), D_OUT
    h = torch.tanh(first(x))
    a = [torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1), torch.cat([h, torch.ones(n, 1, dtype=x.dtype)], 1)]
    eye = torch.eye(d, dtype=x.dtype).expand(n, d, d)
    b = [eye @ last.weight * (1 - h**2)[:, None, :], eye]  # (n, D, d_out_l): rows of B_n
    if fisher_type == "type-2":
        s = (2.0 / d) ** 0.5 * eye  # (n, D, columns)
    else:
        s = (2.0 / d**0.5 * (last(h) - y))[:, :, None]
    out_grads = [bl.transpose(1, 2) @ s for bl in b]  # (n, d_out_l, columns)
    factors_a = [al.T @ al / n for al in a]
    factors_g = [(og @ og.transpose(1, 2)).sum(0) / n for og in out_grads]
    row_grads = [torch.einsum("noc,ni->ncoi", og, al) for og, al in zip(out_grads, a)]  # (n, columns, d_out, d_in')
    return factors_a, factors_g, row_grads


def _joint(flat: torch.Tensor, layout: C.ParamLayout) -> list[torch.Tensor]:
    """Flat gradients -> per layer the (rows, d_out, d_in + 1) matrices [W | b]."""
    out = []
    for w, bias in ((NAMES[0], NAMES[1]), (NAMES[2], NAMES[3])):
        bb = flat[:, layout.slice(bias)]
        out.append(torch.cat([flat[:, layout.slice(w)].reshape(len(flat), bb.shape[1], -1), bb[:, :, None]], 2))
    return out


def _dense_scores(blocks: list[torch.Tensor], query, train, layout, relative: float) -> torch.Tensor:
    """S = 1/N q^T (K + lambda I)^-1 t with K = blockdiag(blocks) acting on row-major [W | b]: a dense float64 solve."""
    k = torch.block_diag(*blocks)
    lam = relative * torch.trace(k) / k.shape[0]
    q = torch.cat([m.flatten(1) for m in _joint(query, layout)], 1)
    t = torch.cat([m.flatten(1) for m in _joint(train, layout)], 1)
    solved = torch.linalg.solve(k + lam * torch.eye(k.shape[0], dtype=torch.float64), q.T)
    return solved.T @ t.T / len(train)


def _fit_scores(net, x, y, query, train, settings, relative):
    cur = C.kfac_from_data(net, NAMES, [(x, y)], len(x), settings, seed=0)
    return cur.precondition(query, relative) @ train.T / len(train), cur


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("seed", [0, 1])
def test_kfac_float64_factors_match_dense_reference_when_rank_deficient(seed, monkeypatch):
    from curvlinops import KFACLinearOperator

    net, x, y, xq, yq = _case(seed)
    layout = C.ParamLayout.of(net, NAMES)
    train, query = _row_gradients(net, x, y), _row_gradients(net, xq, yq)
    factors_a, factors_g, _ = _hand_factors(net, x, y, "type-2")
    assert torch.linalg.matrix_rank(factors_a[0]) == N_ROWS < D_IN + 1  # the rank-deficient factor
    reference = _dense_scores([torch.kron(g, a) for a, g in zip(factors_a, factors_g)], query, train, layout, DAMPING)

    settings = {"fisher_type": "type-2", "ekfac": False}
    scores, cur = _fit_scores(net, x, y, query, train, settings, DAMPING)
    for block, a in zip(cur.blocks, factors_a):  # same definition and scale as the hand-built factors
        fitted = block.a_vecs @ torch.diag(block.a_vals) @ block.a_vecs.T
        assert _rel(fitted, a) < 1e-6
    assert _rel(scores, reference) < TOLERANCE

    # the former accumulation (curvlinops in the model's float32) fails the same check by orders of magnitude
    monkeypatch.setattr(C, "_fast_kfac_class", lambda: KFACLinearOperator)
    former, _ = _fit_scores(net, x, y, query, train, settings, DAMPING)
    assert _rel(former, reference) > 1e-2


@pytest.mark.parametrize("products", ["model", "float64"])
def test_ekfac_float64_corrections_match_dense_reference_when_rank_deficient(products, monkeypatch):
    """EK-FAC (empirical Fisher: deterministic, and factors without repeated eigenvalues outside A_1's null space,
    so the eigenbasis is unique where it matters): corrected eigenvalues and scores against float64 by hand, with
    the correction's per-row products in the model's float32 (the default: sums of squares, so a null direction's
    rounding enters squared, ~eps32^2; measured error 0.7e-6-1.0e-6, seeds 0-2) and in float64 (0.6e-6-0.9e-6)."""
    from curvlinops import KFACLinearOperator

    monkeypatch.setattr(C, "_CORRECTION_PRODUCTS", products)
    net, x, y, xq, yq = _case(0)
    layout = C.ParamLayout.of(net, NAMES)
    train, query = _row_gradients(net, x, y), _row_gradients(net, xq, yq)
    factors_a, factors_g, row_grads = _hand_factors(net, x, y, "empirical")
    blocks, corrections = [], []
    for a, g, rg in zip(factors_a, factors_g, row_grads):
        _, qa = torch.linalg.eigh(a)
        _, qg = torch.linalg.eigh(g)
        corrected = (qg.T @ rg @ qa).square().sum((0, 1)) / N_ROWS  # (d_out, d_in'): 2nd moments in the eigenbasis
        basis = torch.kron(qg, qa)
        blocks.append(basis @ torch.diag(corrected.flatten()) @ basis.T)
        corrections.append(corrected)
    reference = _dense_scores(blocks, query, train, layout, DAMPING)

    scores, cur = _fit_scores(net, x, y, query, train, {"fisher_type": "empirical", "ekfac": True}, DAMPING)
    assert cur.is_ekfac and all(b.corrected.dtype == torch.float64 for b in cur.blocks)
    for block, corrected in zip(cur.blocks, corrections):  # same values up to the order within equal eigenvalues
        torch.testing.assert_close(
            block.corrected.flatten().sort().values, corrected.flatten().sort().values, rtol=1e-5, atol=1e-12
        )
    assert _rel(scores, reference) < TOLERANCE

    # float32 factors alone (corrections still float64) tilt the eigenbasis of A_1's smallest eigenvalues into its
    # null space: corrected eigenvalues there land near the damping and the scores are far off
    monkeypatch.setattr(C, "_fast_kfac_class", lambda: KFACLinearOperator)
    former, _ = _fit_scores(net, x, y, query, train, {"fisher_type": "empirical", "ekfac": True}, DAMPING)
    assert _rel(former, reference) > 1e-2


def test_float32_era_curvature_file_is_refused_with_what_to_do(tmp_path):
    """A curvature file of the former float32 accumulation (version 1) is not reused: loading it names the cause
    and the fix (the curvature stage refits when loading fails)."""
    net, x, y, _, _ = _case(0)
    cur = C.kfac_from_data(net, NAMES, [(x, y)], len(x), {"fisher_type": "type-2"}, seed=0, config={"k": 1})
    path = tmp_path / "curvature.pt"
    cur.save(path)
    assert C.load_curvature(path, {"k": 1}).layout.names == NAMES
    save_torch({**load_torch(path), "version": 1}, path)
    with pytest.raises(ArtefactError, match="version 1: factors accumulated in float32.*rerun the curvature rule"):
        C.load_curvature(path, {"k": 1})
