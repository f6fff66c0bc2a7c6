"""TRAK / D-TRAK: S = phi(x)^T (Phi^T Phi + lambda I)^{-1} phi(z_i) on projected gradient features.

TRAK uses the loss as output function, D-TRAK another output function (e.g. the mean squared
noise prediction); the algebra is the same. One SVD Phi = U diag(s) V^T gives every lambda at once:
Phi (Phi^T Phi + lambda I)^{-1} phi(x) = U diag(s / (s^2 + lambda)) V^T phi(x), because the
null space of Phi is orthogonal to every row of Phi. lambda is relative to the mean eigenvalue
of Phi^T Phi (trace / d), so one grid fits every model and projection size.

The timestep budget K is the store's (method key `timesteps`, default gradients.timesteps), so K = 10
and K = 100 are separate methods reading separate stores.
"""
from __future__ import annotations

import numpy as np

from .base import expected_store


class KernelSolver:
    """Scores and related quantities of (Phi^T Phi + lambda I)^{-1} for many lambdas from one SVD."""

    def __init__(self, train_features: np.ndarray):
        phi = np.asarray(train_features, dtype=np.float64)
        self.u, self.s, self.vt = np.linalg.svd(phi, full_matrices=False)
        self.scale = float((self.s**2).sum() / phi.shape[1])  # mean eigenvalue of Phi^T Phi

    def absolute(self, relative_lambda: float) -> float:
        return relative_lambda * self.scale

    def scores(self, query_features: np.ndarray, relative_lambda: float) -> np.ndarray:
        """(n_query, n_train) phi(x)^T (Phi^T Phi + lambda I)^{-1} phi(z_i)."""
        lam = self.absolute(relative_lambda)
        projected = np.asarray(query_features, dtype=np.float64) @ self.vt.T  # (q, r)
        return (projected * (self.s / (self.s**2 + lam))) @ self.u.T

    def preconditioned_train_norms(self, relative_lambda: float) -> np.ndarray:
        """||(Phi^T Phi + lambda I)^{-1} phi(z_i)|| for every i (relative influence)."""
        lam = self.absolute(relative_lambda)
        return np.sqrt(((self.u * (self.s / (self.s**2 + lam))) ** 2).sum(1))

    def train_norms(self) -> np.ndarray:
        """||phi(z_i)|| for every i (renormalised influence)."""
        return np.sqrt(((self.u * self.s) ** 2).sum(1))

    def leverages(self, relative_lambda: float) -> np.ndarray:
        """h_i = phi(z_i)^T (Phi^T Phi + lambda I)^{-1} phi(z_i) (DAS's leave-one-out correction 1 / (1 - h_i))."""
        lam = self.absolute(relative_lambda)
        return (self.u**2 * (self.s**2 / (self.s**2 + lam))).sum(1)


def compute(method_cfg: dict, inputs, lambdas) -> list:
    expect = expected_store(method_cfg)
    solver = KernelSolver(inputs.features("final", "train", expect))
    queries = {name: inputs.features("final", name, expect) for name in inputs.query_sets}
    return [(lam, {name: solver.scores(q, lam).astype(np.float32) for name, q in queries.items()}) for lam in lambdas]
