"""Seeded random projection of gradient vectors (TRAK's Johnson-Lindenstrauss sketch).

The projection matrix R (n_params x dim) is a pure function of (kind, seed, n_params, dim): block c
of CHUNK rows is drawn from its own generator (seed, c). So a projector that holds R in memory and
one that regenerates blocks on the fly (when R exceeds the memory budget) give identical features.
Entries have variance 1/dim, so inner products are preserved in expectation.
"""
from __future__ import annotations

import torch

from .common import generator

CHUNK = 1 << 16


def fill_block(out: torch.Tensor, kind: str, seed: int, chunk: int) -> torch.Tensor:
    """Fill `out` (rows x dim, on CPU) in place with block `chunk` of the UNSCALED matrix (entries of variance 1)."""
    g = generator(seed, chunk)
    if kind == "gaussian":
        torch.randn(out.shape, generator=g, out=out)
    elif kind == "rademacher":
        out.copy_(torch.randint(0, 2, out.shape, generator=g)).mul_(2).sub_(1)
    else:
        raise ValueError(f"unknown projection {kind!r}")
    return out


def projection_block(kind: str, seed: int, chunk: int, rows: int, dim: int, device) -> torch.Tensor:
    return fill_block(torch.empty(rows, dim), kind, seed, chunk).div_(dim**0.5).to(device)


class Projector:
    def __init__(self, n_params: int, dim: int, kind: str, seed: int, memory_mb: float, device="cpu"):
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
