"""Unit tests of workflow_scripts.projection: the seeded Johnson-Lindenstrauss sketch."""
import math

import numpy as np
import pytest
import torch

from workflow_scripts.projection import CHUNK, Projector, projection_block

torch.set_num_threads(1)


def jl_epsilon(dim: int, n_events: int, delta: float = 1e-3) -> float:
    """Smallest eps with union bound n_events * 2 exp(-dim (eps^2/2 - eps^3/3) / 2) <= delta.

    That is the JL concentration P(| ||Px||^2/||x||^2 - 1 | > eps) <= 2 exp(-d (eps^2/2 - eps^3/3) / 2),
    valid for Gaussian and (Achlioptas) Rademacher projections with entry variance 1/d.
    """
    need = 2 * math.log(2 * n_events / delta) / dim
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if mid**2 / 2 - mid**3 / 3 >= need:
            hi = mid
        else:
            lo = mid
    return hi


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_inner_products_preserved_within_jl_bound(kind):
    n_params, dim, m = 3000, 1024, 8
    g = torch.Generator().manual_seed(0)
    base = torch.randn(m, n_params, generator=g)
    # correlated pairs so that the inner products are not all ~0
    x = torch.cat([base, base + 0.5 * torch.randn(m, n_params, generator=g)])
    x = x / x.norm(dim=1, keepdim=True)  # unit vectors
    n = len(x)
    # norms: n events; inner products by polarisation via ||P(x+y)||^2, ||P(x-y)||^2: n(n-1) events
    eps = jl_epsilon(dim, n * n)
    assert eps < 0.3  # the bound is informative for this dim

    px = Projector(n_params, dim, kind, seed=1, memory_mb=1000)(x).double()
    x = x.double()
    norm_ratio = px.pow(2).sum(1) / x.pow(2).sum(1)
    assert torch.all((norm_ratio - 1).abs() <= eps), norm_ratio
    gram, pgram = x @ x.T, px @ px.T
    # for unit vectors |<Px,Py> - <x,y>| <= eps
    assert (pgram - gram).abs().max() <= eps
    # and on average much better than the worst-case bound: relative error ~ sqrt(2/d) per norm
    assert (norm_ratio - 1).abs().mean() < 3 * math.sqrt(2 / dim)
    # correlated pairs stay correlated
    assert torch.all(pgram.diagonal(m)[:m] > 0.5)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_projection_entries(kind):
    dim = 64
    block = projection_block(kind, seed=0, chunk=0, rows=2000, dim=dim, device="cpu")
    assert block.shape == (2000, dim) and block.dtype == torch.float32
    if kind == "rademacher":
        values = torch.unique(block)
        torch.testing.assert_close(values, torch.tensor([-1.0, 1.0]) / math.sqrt(dim))
        assert abs(block.gt(0).float().mean().item() - 0.5) < 0.02
    else:
        # the mean of 2000 * dim entries of std 1/sqrt(dim): within 5 standard errors of 0
        assert abs(block.mean().item()) < 5 / math.sqrt(dim) / math.sqrt(block.numel())
    # entry variance 1/dim (so E ||Px||^2 = ||x||^2)
    assert block.pow(2).mean().item() * dim == pytest.approx(1.0, rel=0.03)


def test_unknown_kind():
    with pytest.raises(ValueError, match="sparse"):
        Projector(10, 4, "sparse", 0, 100)


def test_wrong_gradient_width():
    project = Projector(10, 4, "gaussian", 0, 100)
    with pytest.raises(ValueError, match="expected 10"):
        project(torch.zeros(2, 11))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_streamed_equals_in_memory(kind):
    n_params, dim = CHUNK + 1234, 8  # two blocks, the second partial
    in_memory = Projector(n_params, dim, kind, seed=3, memory_mb=100)
    streamed = Projector(n_params, dim, kind, seed=3, memory_mb=0.001)
    assert in_memory.matrix is not None and streamed.matrix is None
    assert len(streamed.bounds) == 2
    # the very same matrix, block by block ...
    regenerated = torch.cat([streamed._block(c) for c in range(len(streamed.bounds))])
    assert torch.equal(regenerated, in_memory.matrix / dim**0.5)  # the stored matrix is unscaled
    # ... so the same features, up to float32 summation order (one matmul vs a sum of block matmuls)
    grads = torch.randn(3, n_params, generator=torch.Generator().manual_seed(0))
    a, b = in_memory(grads), streamed(grads)
    assert a.shape == b.shape == (3, dim)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    # and both equal the float64 product with that matrix
    exact = (grads.double() @ in_memory.matrix.double() / dim**0.5).float()
    torch.testing.assert_close(b, exact, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_same_seed_same_matrix_different_seed_different():
    a = Projector(500, 16, "gaussian", seed=1, memory_mb=100).matrix
    b = Projector(500, 16, "gaussian", seed=1, memory_mb=100).matrix
    c = Projector(500, 16, "gaussian", seed=2, memory_mb=100).matrix
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    r1 = Projector(500, 16, "rademacher", seed=1, memory_mb=100).matrix
    r2 = Projector(500, 16, "rademacher", seed=2, memory_mb=100).matrix
    assert torch.equal(r1, Projector(500, 16, "rademacher", seed=1, memory_mb=100).matrix)
    assert not torch.equal(r1, r2)


def test_blocks_are_independent():
    # block c is drawn from generator (seed, c): two blocks of one matrix differ
    b0 = projection_block("gaussian", 0, 0, 100, 8, "cpu")
    b1 = projection_block("gaussian", 0, 1, 100, 8, "cpu")
    assert not torch.equal(b0, b1)


def test_projection_is_linear():
    project = Projector(300, 32, "rademacher", seed=0, memory_mb=100)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 300, generator=g), torch.randn(2, 300, generator=g)
    torch.testing.assert_close(project(2 * x + y), 2 * project(x) + project(y), rtol=1e-5, atol=1e-5)
    assert np.allclose(project(torch.zeros(1, 300)).numpy(), 0)
