"""Seeded random projection of gradient vectors (TRAK's Johnson-Lindenstrauss sketch).

Kinds (gradients.projection):
- gaussian, rademacher: a dense matrix R (n_params x dim) with i.i.d. entries of variance 1/dim.
- sjlt: a sparse Johnson-Lindenstrauss transform (Kane & Nelson's block construction; s = 1 is
  CountSketch / feature hashing). The dim output coordinates are split into s contiguous ranges
  [j dim // s, (j + 1) dim // s); every input coordinate i has exactly one nonzero in each range, at a
  uniformly random position h_j(i), with value sigma_j(i) / sqrt(s), sigma_j(i) = +-1 at random.
  s = gradients.sjlt_nonzeros. Its columns are no longer independent, but E[R R^T] = I and, when s
  divides dim, Var <R^T x, R^T y> = (|x|^2 |y|^2 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / dim, never more
  than a Gaussian sketch's (|x|^2 |y|^2 + <x, y>^2) / dim. A larger s spreads each coordinate over s
  outputs, which shortens the tails for vectors dominated by a few large coordinates. R costs
  n_params x s indices instead of n_params x dim floats, and applying it is one sparse (CSR) product,
  O(batch x n_params x s) instead of O(batch x n_params x dim).

In all kinds, inner products are preserved in expectation, and R is a pure function of (kind, seed,
n_params, dim[, s]): block c of CHUNK rows is drawn from its own generator ((seed, c) for the dense
kinds, (seed, SJLT_STREAM, c) for sjlt). So a projector that holds R in memory and one that
regenerates blocks on the fly (when R exceeds the memory budget) give identical features (up to
float32 summation order).
"""

from __future__ import annotations

import numbers
import warnings

import torch

from workflow_scripts.core.common import generator

CHUNK = 1 << 16
DENSE = ("gaussian", "rademacher")
SPARSE = ("sjlt",)
KINDS = DENSE + SPARSE
SJLT_STREAM = 201  # sub-stream of seeds.projection for the sparse sketch's blocks


def fill_block(out: torch.Tensor, kind: str, seed: int, chunk: int) -> torch.Tensor:
    """Fill `out` (rows x dim, on CPU) in place with block `chunk` of the UNSCALED matrix (entries of variance 1)."""
    g = generator(seed, chunk)
    if kind == "gaussian":
        torch.randn(out.shape, generator=g, out=out)
    elif kind == "rademacher":
        out.copy_(torch.randint(0, 2, out.shape, generator=g)).mul_(2).sub_(1)
    else:
        raise ValueError(f"unknown dense projection {kind!r} (expected one of {DENSE})")
    return out


def projection_block(kind: str, seed: int, chunk: int, rows: int, dim: int, device) -> torch.Tensor:
    return fill_block(torch.empty(rows, dim), kind, seed, chunk).div_(dim**0.5).to(device)


class Projector:
    """A dense projection (gaussian, rademacher): (batch, n_params) -> (batch, dim)."""

    def __init__(self, n_params: int, dim: int, kind: str, seed: int, memory_mb: float, device="cpu"):
        if kind not in DENSE:
            raise ValueError(f"unknown dense projection {kind!r} (expected one of {DENSE}; sparse: SparseProjector)")
        self.n_params, self.dim, self.kind, self.seed, self.device = n_params, dim, kind, seed, device
        self.bounds = [(start, min(start + CHUNK, n_params)) for start in range(0, n_params, CHUNK)]
        self.matrix = None
        if n_params * dim * 4 / 2**20 <= memory_mb:
            # Filled in place, block by block, and left unscaled (the 1/sqrt(dim) goes on the small
            # output): one matrix-sized allocation instead of blocks + their concatenation.
            matrix = torch.empty(n_params, dim)
            for c, (start, stop) in enumerate(self.bounds):
                fill_block(matrix[start:stop], kind, seed, c)
            self.matrix = matrix.to(device)

    def _block(self, c: int) -> torch.Tensor:
        start, stop = self.bounds[c]
        return projection_block(self.kind, self.seed, c, stop - start, self.dim, self.device)

    def __call__(self, gradients: torch.Tensor) -> torch.Tensor:
        """(batch, n_params) -> (batch, dim)."""
        if gradients.shape[1] != self.n_params:
            raise ValueError(f"expected {self.n_params} gradient entries, got {gradients.shape[1]}")
        if self.matrix is not None:
            return (gradients @ self.matrix).div_(self.dim**0.5)
        out = torch.zeros(gradients.shape[0], self.dim, device=gradients.device, dtype=gradients.dtype)
        for c, (start, stop) in enumerate(self.bounds):
            out += gradients[:, start:stop] @ self._block(c)
        return out


# ---------------------------------------------------------------- sparse JL (sjlt)


def sjlt_ranges(dim: int, nonzeros: int) -> list[tuple[int, int]]:
    """The s contiguous output ranges [j dim // s, (j + 1) dim // s) that get one nonzero each."""
    return [(j * dim // nonzeros, (j + 1) * dim // nonzeros) for j in range(nonzeros)]


def sjlt_block(seed: int, chunk: int, rows: int, dim: int, nonzeros: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block `chunk` of the sparse sketch: (index, value), both (rows, s), on CPU.

    Row i of the block has its nonzeros at columns index[i] (index[i, j] in range j) with values
    value[i] = +-1 / sqrt(s)."""
    _check_nonzeros(dim, nonzeros)
    g = generator(seed, SJLT_STREAM, chunk)
    index = torch.stack([torch.randint(low, high, (rows,), generator=g) for low, high in sjlt_ranges(dim, nonzeros)], 1)
    value = torch.randint(0, 2, (rows, nonzeros), generator=g, dtype=torch.float32).mul_(2).sub_(1)
    return index, value.div_(nonzeros**0.5)


def sjlt_transposed(index: torch.Tensor, value: torch.Tensor, dim: int) -> torch.Tensor:
    """R^T as a (dim x rows) CSR tensor from sjlt_block's (index, value).

    Output coordinate k's row lists the inputs i with index[i, j] = k in increasing order. The s
    ranges are disjoint and in increasing order, so no input appears twice in a row, and sorting each
    column j of index (stably) and concatenating the columns sorts all nonzeros by output."""
    rows, nonzeros = index.shape
    crow = torch.zeros(dim + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(index.reshape(-1), minlength=dim), 0, out=crow[1:])
    keys = index.T.to(torch.int32 if dim < 2**31 else torch.int64).contiguous()  # int32 sorts ~2x faster
    columns = value.T.contiguous()
    inputs, values = [], []
    for j in range(nonzeros):
        order = torch.sort(keys[j], stable=True).indices
        inputs.append(order)
        values.append(columns[j].index_select(0, order))
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, torch.cat(inputs), torch.cat(values), (dim, rows), check_invariants=False)


def _check_nonzeros(dim: int, nonzeros) -> None:
    if isinstance(nonzeros, bool) or not isinstance(nonzeros, numbers.Integral) or not 1 <= nonzeros <= dim:
        raise ValueError(f"sjlt needs an integer number of nonzeros per input in [1, dim = {dim}], got {nonzeros!r}")


def _sparse_apply(transposed: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """(batch, rows) gradients times R (R^T the (dim x rows) CSR tensor) -> (batch, dim)."""
    if transposed.dtype != gradients.dtype:
        transposed = transposed.to(gradients.dtype)
    return (transposed @ gradients.T).T.contiguous()


class SparseProjector:
    """The sparse JL sketch (kind sjlt): (batch, n_params) -> (batch, dim), see the module doc.

    Held in memory as one CSR matrix R^T (n_params x s int64 column indices + float32 values) when
    that fits in memory_mb, else regenerated block by block on every call."""

    kind = "sjlt"

    def __init__(self, n_params: int, dim: int, seed: int, nonzeros: int, memory_mb: float, device="cpu"):
        if n_params < 1 or dim < 1:
            raise ValueError(f"a projection needs n_params >= 1 and dim >= 1, got {n_params} x {dim}")
        _check_nonzeros(dim, nonzeros)
        self.n_params, self.dim, self.seed, self.nonzeros, self.device = n_params, dim, seed, nonzeros, device
        self.bounds = [(start, min(start + CHUNK, n_params)) for start in range(0, n_params, CHUNK)]
        self.matrix = None  # R^T, (dim x n_params) CSR
        if (n_params * nonzeros * 12 + (dim + 1) * 8) / 2**20 <= memory_mb:
            blocks = [self.block(c) for c in range(len(self.bounds))]
            index, value = torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])
            self.matrix = sjlt_transposed(index, value, dim).to(device)

    def block(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, value) of block c (rows bounds[c]), on CPU."""
        start, stop = self.bounds[c]
        return sjlt_block(self.seed, c, stop - start, self.dim, self.nonzeros)

    def _block(self, c: int) -> torch.Tensor:
        return sjlt_transposed(*self.block(c), self.dim).to(self.device)

    def __call__(self, gradients: torch.Tensor) -> torch.Tensor:
        """(batch, n_params) -> (batch, dim)."""
        if gradients.dim() != 2 or gradients.shape[1] != self.n_params:
            raise ValueError(f"expected (batch, {self.n_params}) gradients, got {tuple(gradients.shape)}")
        if self.matrix is not None:
            return _sparse_apply(self.matrix, gradients)
        out = torch.zeros(gradients.shape[0], self.dim, device=gradients.device, dtype=gradients.dtype)
        for c, (start, stop) in enumerate(self.bounds):
            out += _sparse_apply(self._block(c), gradients[:, start:stop])
        return out


def build_projector(
    n_params: int, dim: int, kind: str, seed: int, memory_mb: float, device="cpu", nonzeros: int | None = None
):
    """The projector of a kind: Projector (gaussian, rademacher) or SparseProjector (sjlt, needs nonzeros)."""
    if kind in SPARSE:
        if nonzeros is None:
            raise ValueError("the sjlt projection needs its number of nonzeros per input (gradients.sjlt_nonzeros)")
        return SparseProjector(n_params, dim, seed, nonzeros, memory_mb, device)
    if kind in DENSE:
        return Projector(n_params, dim, kind, seed, memory_mb, device)
    raise ValueError(f"unknown projection {kind!r} (expected one of {KINDS})")
