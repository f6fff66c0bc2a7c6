"""Unit tests of workflow_scripts.projection: the seeded Johnson-Lindenstrauss sketches (dense and sparse)."""

import math

import numpy as np
import pytest
import torch
from fakes import float64_default

from workflow_scripts.core.projection import (
    CHUNK,
    Projector,
    SparseProjector,
    build_projector,
    projection_block,
    sjlt_block,
    sjlt_ranges,
)

torch.set_num_threads(1)
EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def rounding_bound(x: torch.Tensor, r: torch.Tensor, terms: float, eps: float) -> torch.Tensor:
    """terms x eps x (|x| @ |r|): how far two evaluations of x @ r (sums of `terms` products each, any order) can be
    apart in a precision of machine epsilon eps (Higham's gamma_n = n u / (1 - n u) per evaluation, eps = 2u)."""
    return terms * eps * (x.double().abs() @ r.double().abs())


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
    # ... so the same features, up to summation order (one matmul vs a sum of block matmuls): in float64 (matrix and
    # gradients) within the worst-case rounding of n_params-term sums, ~1e-10 |feature|; a block missing, another
    # block's seed or scaling is >= 1e-1 |feature| away
    grads = torch.randn(3, n_params, generator=torch.Generator().manual_seed(0))
    with float64_default():
        in_memory64 = Projector(n_params, dim, kind, seed=3, memory_mb=100)
        a64, b64 = in_memory64(grads.double()), Projector(n_params, dim, kind, seed=3, memory_mb=0.001)(grads.double())
    assert a64.dtype == b64.dtype == torch.float64
    bound = rounding_bound(grads, in_memory64.matrix / dim**0.5, n_params, EPS64)
    assert bool(((a64 - b64).abs() <= bound).all())
    # and the float32 streamed features equal the float64 product with that matrix within the probabilistic rounding
    # bound of a float32 sum, sqrt(n_params) eps32 sum |g_k R_kj| (~6e-3 |feature|; measured 1/300 of it): the
    # partial second block alone is ~0.1 |feature|
    a, b = in_memory(grads), streamed(grads)
    assert a.shape == b.shape == (3, dim) and b.dtype == torch.float32
    exact = grads.double() @ in_memory.matrix.double() / dim**0.5
    bound = rounding_bound(grads, in_memory.matrix / dim**0.5, n_params**0.5, EPS32)
    assert bool(((a - exact).abs() <= bound).all()) and bool(((b - exact).abs() <= bound).all())


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
    # float32 sums of 300 products (and the rounding of 2x + y): (300 + 2) eps32 x magnitude, ~5e-4 |feature|; an
    # offset or a nonlinearity is O(|feature|)
    bound = rounding_bound(2 * x.abs() + y.abs(), project.matrix / 32**0.5, 300 + 2, EPS32)
    assert bool(((project(2 * x + y) - (2 * project(x) + project(y))).abs() <= bound).all())
    assert np.allclose(project(torch.zeros(1, 300)).numpy(), 0)


# ---------------------------------------------------------------- sparse JL (sjlt)

NONZEROS = [1, 2, 4, 8]


def sjlt_dense(n_params: int, dim: int, seed: int, nonzeros: int) -> torch.Tensor:
    """R (n_params x dim) written out entry by entry from the blocks, in float64."""
    r = torch.zeros(n_params, dim, dtype=torch.float64)
    for c, start in enumerate(range(0, n_params, CHUNK)):
        rows = min(CHUNK, n_params - start)
        index, value = sjlt_block(seed, c, rows, dim, nonzeros)
        for i in range(rows):
            for j in range(nonzeros):
                r[start + i, index[i, j]] += value[i, j].item()
    return r


@pytest.mark.parametrize("n_params,dim,nonzeros", [(7, 6, 3), (9, 5, 2), (5, 4, 1), (6, 3, 3)])
def test_sjlt_equals_explicit_dense_matrix(n_params, dim, nonzeros):
    r = sjlt_dense(n_params, dim, seed=4, nonzeros=nonzeros)
    # structure: s nonzeros per row, one in each output range, all +-1/sqrt(s)
    ranges = sjlt_ranges(dim, nonzeros)
    assert ranges[0][0] == 0 and ranges[-1][1] == dim and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for row in r:
        assert [int(row[lo:hi].ne(0).sum()) for lo, hi in ranges] == [1] * nonzeros
        torch.testing.assert_close(row[row.ne(0)].abs(), torch.full((nonzeros,), nonzeros**-0.5, dtype=torch.float64))
    project = SparseProjector(n_params, dim, seed=4, nonzeros=nonzeros, memory_mb=10)
    assert project.matrix.layout == torch.sparse_csr
    torch.testing.assert_close(project.matrix.to_dense().T.double(), r, rtol=0, atol=0)
    x = torch.randn(3, n_params, generator=torch.Generator().manual_seed(0))
    # a float32 sum of n_params products (+ its rounding to float32): (n_params + 1) eps32 x magnitude, ~1e-6 |feature|
    bound = rounding_bound(x, r, n_params + 1, EPS32)
    assert bool(((project(x).double() - x.double() @ r).abs() <= bound).all())


@pytest.mark.parametrize("nonzeros", NONZEROS)
def test_sjlt_unbiased_with_the_predicted_variance(nonzeros):
    """Over many seeds on fixed vectors: E <Rx, Ry> = <x, y> and, as s divides dim,
    Var <Rx, Ry> = (|x|^2 |y|^2 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / dim, the same for every s and
    below the Gaussian sketch's (|x|^2 |y|^2 + <x, y>^2) / dim."""
    n_params, dim, seeds = 1000, 64, 400
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_params, generator=g, dtype=torch.float64)
    y = x + 0.7 * torch.randn(n_params, generator=g, dtype=torch.float64)
    x, y = x / x.norm(), y / y.norm()
    inner = float(x @ y)
    assert 0.5 < inner < 0.9
    both = torch.stack([x, y]).float()
    estimates = torch.tensor(
        [
            float(p[0].double() @ p[1].double())
            for p in (SparseProjector(n_params, dim, seed, nonzeros, 10)(both) for seed in range(seeds))
        ]
    )
    variance = (1 + inner**2 - 2 * float((x**2 * y**2).sum())) / dim
    assert variance < (1 + inner**2) / dim
    assert abs(estimates.mean().item() - inner) < 4.5 * math.sqrt(variance / seeds)
    assert 0.75 < estimates.var().item() / variance < 1.3


@pytest.mark.parametrize("nonzeros", NONZEROS)
def test_sjlt_inner_products_within_jl_bound_over_seeds(nonzeros):
    """The Gaussian JL bound (union over every seed and pair) holds for the sparse sketch on dense vectors."""
    n_params, dim, m, seeds = 3000, 1024, 6, 25
    g = torch.Generator().manual_seed(0)
    base = torch.randn(m, n_params, generator=g)
    x = torch.cat([base, base + 0.5 * torch.randn(m, n_params, generator=g)])
    x = (x / x.norm(dim=1, keepdim=True)).double()
    n = len(x)
    eps = jl_epsilon(dim, seeds * n * n)
    assert eps < 0.3  # the bound is informative for this dim
    gram = x @ x.T
    errors, norm_errors = [], []
    for seed in range(seeds):
        px = SparseProjector(n_params, dim, seed, nonzeros, 10)(x.float()).double()
        errors.append((px @ px.T - gram).abs().max().item())
        norm_errors.append((px.pow(2).sum(1) - 1).abs())
    assert max(errors) <= eps
    # typical relative error of a norm ~ sqrt(2 / d), as for a dense sketch
    assert torch.cat(norm_errors).mean() < 1.5 * math.sqrt(2 / dim)


def test_sjlt_streamed_equals_in_memory():
    n_params, dim, nonzeros = CHUNK + 1234, 32, 4  # two blocks, the second partial
    in_memory = SparseProjector(n_params, dim, 3, nonzeros, memory_mb=100)
    streamed = SparseProjector(n_params, dim, 3, nonzeros, memory_mb=0.001)
    assert in_memory.matrix is not None and streamed.matrix is None and len(streamed.bounds) == 2
    # the very same nonzeros, block by block ...
    blocks = [torch.cat([streamed._block(c).to_dense() for c in range(2)], dim=1)]
    torch.testing.assert_close(blocks[0], in_memory.matrix.to_dense(), rtol=0, atol=0)
    # ... so the same features up to summation order: in float64 (the +-1/sqrt(s) values are exact in both) within
    # the worst-case rounding of n_params-term sums; a block missing or another block's draws is >= 1e-1 |feature| away
    grads = torch.randn(3, n_params, generator=torch.Generator().manual_seed(0))
    r = in_memory.matrix.to_dense().T
    a64, b64 = in_memory(grads.double()), streamed(grads.double())
    assert a64.dtype == b64.dtype == torch.float64
    assert bool(((a64 - b64).abs() <= rounding_bound(grads, r, n_params, EPS64)).all())
    # and in float32 the float64 product with R, within sqrt(n_params) eps32 x magnitude (the probabilistic bound)
    a, b = in_memory(grads), streamed(grads)
    assert a.shape == b.shape == (3, dim) and a.dtype == b.dtype == torch.float32
    exact = grads.double() @ r.double()
    bound = rounding_bound(grads, r, n_params**0.5, EPS32)
    assert bool(((a - exact).abs() <= bound).all()) and bool(((b - exact).abs() <= bound).all())


def test_sjlt_is_a_pure_function_of_seed_size_and_nonzeros():
    x = torch.randn(2, 500, generator=torch.Generator().manual_seed(2))
    a = SparseProjector(500, 16, 1, 2, 10)(x)
    assert torch.equal(a, SparseProjector(500, 16, 1, 2, 10)(x))
    assert not torch.equal(a, SparseProjector(500, 16, 2, 2, 10)(x))  # another seed
    assert not torch.equal(a, SparseProjector(500, 16, 1, 4, 10)(x))  # another s
    # block c depends on (seed, c, its rows, dim, s) only: the first full block of two sizes agrees
    small, large = SparseProjector(CHUNK + 10, 16, 1, 2, 100), SparseProjector(CHUNK + 500, 16, 1, 2, 100)
    for p, q in zip(small.block(0), large.block(0)):
        assert torch.equal(p, q)
    assert not torch.equal(small.block(0)[0][:10], small.block(1)[0])  # blocks are independent
    # and it does not reuse the dense kinds' random stream
    assert not torch.equal(
        sjlt_block(1, 0, 100, 16, 1)[0].ravel(), projection_block("rademacher", 1, 0, 100, 16, "cpu").argmax(1)
    )


def test_sjlt_projection_is_linear_and_keeps_dtype():
    project = SparseProjector(300, 32, 0, 4, 10)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 300, generator=g), torch.randn(2, 300, generator=g)
    r = project.matrix.to_dense().T
    # float32 sums of (at most) 300 products and the rounding of 2x + y: (300 + 2) eps32 x magnitude
    bound = rounding_bound(2 * x.abs() + y.abs(), r, 300 + 2, EPS32)
    assert bool(((project(2 * x + y) - (2 * project(x) + project(y))).abs() <= bound).all())
    assert np.allclose(project(torch.zeros(1, 300)).numpy(), 0)
    out64 = project(x.double())
    assert out64.dtype == torch.float64
    # the float32 result is the float64 one within a float32 sum's rounding: (300 + 1) eps32 x magnitude
    assert bool(((project(x).double() - out64).abs() <= rounding_bound(x, r, 300 + 1, EPS32)).all())


def test_sjlt_shape_and_argument_errors():
    project = SparseProjector(10, 4, 0, 2, 100)
    assert project(torch.zeros(3, 10)).shape == (3, 4)
    with pytest.raises(ValueError, match=r"expected \(batch, 10\)"):
        project(torch.zeros(2, 11))
    with pytest.raises(ValueError, match="expected"):
        project(torch.zeros(10))
    for bad in (0, 5, 1.5, True, None):
        with pytest.raises(ValueError, match="nonzeros"):
            SparseProjector(10, 4, 0, bad, 100)
    with pytest.raises(ValueError, match="n_params >= 1"):
        SparseProjector(0, 4, 0, 1, 100)
    with pytest.raises(ValueError, match="sjlt_nonzeros"):
        build_projector(10, 4, "sjlt", 0, 100)
    with pytest.raises(ValueError, match="unknown projection 'sparse'"):
        build_projector(10, 4, "sparse", 0, 100, nonzeros=1)
    with pytest.raises(ValueError, match="SparseProjector"):
        Projector(10, 4, "sjlt", 0, 100)
    assert isinstance(build_projector(10, 4, "sjlt", 0, 100, nonzeros=1), SparseProjector)
    assert isinstance(build_projector(10, 4, "gaussian", 0, 100), Projector)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_sjlt_on_cuda_equals_cpu():
    x = torch.randn(4, CHUNK + 100, generator=torch.Generator().manual_seed(0))
    cpu = SparseProjector(CHUNK + 100, 64, 0, 4, 100)(x)
    for memory_mb in (100, 0.001):
        cuda = SparseProjector(CHUNK + 100, 64, 0, 4, memory_mb, device="cuda")(x.cuda())
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-5 * cpu.abs().max().item())
