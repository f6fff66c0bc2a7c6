"""TRAK / D-TRAK: S = phi(x)^T (Phi^T Phi + lambda I)^{-1} phi(z_i) on projected gradient features.

TRAK uses the loss as output function, D-TRAK another output function (e.g. the mean squared
noise prediction); the algebra is the same. One eigendecomposition of the d x d kernel
Phi^T Phi = V diag(s2) V^T gives every lambda at once:
phi(x)^T (Phi^T Phi + lambda I)^{-1} phi(z_i) = (phi(x)^T V / (s2 + lambda)) . (V^T phi(z_i)).
lambda is relative to the mean eigenvalue of Phi^T Phi (trace / d), so one grid fits every model and
projection size.

Memory: the training features are never held in RAM. Phi^T Phi is accumulated over row chunks of the
(memory-mapped) store, and every quantity per training example (scores, norms, leverages) is computed
chunk by chunk, so the solver holds d x d + n_query x d + the (n_query x n_train) scores, whatever n_train
is (CIFAR-10: 50,000 training examples; tests/unit/scorers/test_scorer_memory.py).

The timestep budget K is the store's (method key `timesteps`, default gradients.timesteps), so K = 10
and K = 100 are separate methods reading separate stores.

`ensemble: K` averages the scores of K full models trained with different seeds (scorers/base.py, ensembles).

`query_measurement` (default loss; elbo, timestep_loss_t<t>, trajectory) makes phi(x) the projected gradient of
that likelihood measurement instead (store role 'query', scorers/base.py query_features); Phi stays the loss store.
"""

from __future__ import annotations

import numpy as np

from workflow_scripts.scorers.base import (
    ENSEMBLE,
    LAMBDA_GRID,
    OUTPUT_FUNCTION,
    QUERY_MEASUREMENT,
    TIMESTEPS,
    LossFeatureScorer,
    expected_store,
    method_schema,
    query_features,
    row_chunks,
)


def kernel_eigh(features) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (clipped at 0) and eigenvectors of sum_i J_i^T J_i over the rows of (n, ..., d) features."""
    d = features.shape[-1]
    gram = np.zeros((d, d))
    for _, chunk in row_chunks(features):
        flat = chunk.reshape(-1, d)
        gram += flat.T @ flat
    eigenvalues, vectors = np.linalg.eigh(gram)
    return np.clip(eigenvalues, 0.0, None), vectors


class KernelSolver:
    """Scores and related quantities of (Phi^T Phi + lambda I)^{-1} for many lambdas from one eigendecomposition,
    streaming the training features (n_train, d) in row chunks."""

    def __init__(self, train_features: np.ndarray):
        if train_features.ndim != 2:
            raise ValueError(f"training features must be (n, d), got shape {train_features.shape}")
        self.phi = train_features  # read chunk by chunk, never copied whole
        self.s2, self.v = kernel_eigh(train_features)
        self.scale = float(self.s2.sum() / train_features.shape[1])  # mean eigenvalue of Phi^T Phi

    def absolute(self, relative_lambda: float) -> float:
        return relative_lambda * self.scale

    def _inverse_eigenvalues(self, relative_lambda: float) -> np.ndarray:
        return 1.0 / (self.s2 + self.absolute(relative_lambda))

    def _coordinates(self):
        """(rows, V^T phi(z_i) of those rows) chunk by chunk."""
        for rows, chunk in row_chunks(self.phi):
            yield rows, chunk @ self.v

    def scores(self, query_features: np.ndarray, relative_lambda: float) -> np.ndarray:
        """(n_query, n_train) phi(x)^T (Phi^T Phi + lambda I)^{-1} phi(z_i)."""
        weighted = (np.asarray(query_features, dtype=np.float64) @ self.v) * self._inverse_eigenvalues(relative_lambda)
        out = np.empty((len(weighted), len(self.phi)))
        for rows, coords in self._coordinates():
            out[:, rows] = weighted @ coords.T
        return out

    def per_example(self, fn) -> np.ndarray:
        """(n_train,) fn(V^T phi(z_i) rows of a chunk) for every training example."""
        out = np.empty(len(self.phi))
        for rows, coords in self._coordinates():
            out[rows] = fn(coords)
        return out

    def preconditioned_train_norms(self, relative_lambda: float) -> np.ndarray:
        """||(Phi^T Phi + lambda I)^{-1} phi(z_i)|| for every i (relative influence)."""
        inverse = self._inverse_eigenvalues(relative_lambda)
        return np.sqrt(self.per_example(lambda c: ((c * inverse) ** 2).sum(1)))

    def train_norms(self) -> np.ndarray:
        """||phi(z_i)|| for every i (renormalised influence)."""
        return np.concatenate([np.linalg.norm(chunk, axis=1) for _, chunk in row_chunks(self.phi)])

    def leverages(self, relative_lambda: float) -> np.ndarray:
        """h_i = phi(z_i)^T (Phi^T Phi + lambda I)^{-1} phi(z_i) (DAS's leave-one-out correction 1 / (1 - h_i))."""
        inverse = self._inverse_eigenvalues(relative_lambda)
        return self.per_example(lambda c: (c**2 * inverse).sum(1))

    def preconditioned_train(self, relative_lambda: float) -> np.ndarray:
        """(n_train, d) (Phi^T Phi + lambda I)^{-1} phi(z_i) (for checks on small problems: holds n_train x d)."""
        inverse = self._inverse_eigenvalues(relative_lambda)
        return np.concatenate([(coords * inverse) @ self.v.T for _, coords in self._coordinates()])


def compute(method_cfg: dict, inputs, lambdas) -> list:
    expect = expected_store(method_cfg)
    solver = KernelSolver(inputs.features("final", "train", expect))
    queries = {name: query_features(method_cfg, inputs, name, expect) for name in inputs.query_sets}
    return [(lam, {name: solver.scores(q, lam).astype(np.float32) for name, q in queries.items()}) for lam in lambdas]


class Trak(LossFeatureScorer):
    family = "trak"
    takes_ensemble = True
    schemas = (
        method_schema(
            "trak",
            ["output_function"],
            output_function=OUTPUT_FUNCTION,
            timesteps=TIMESTEPS,
            lambda_grid=LAMBDA_GRID,
            ensemble=ENSEMBLE,
            query_measurement=QUERY_MEASUREMENT,
        ),
    )

    def compute(self, method_cfg, inputs, lambdas):
        return compute(method_cfg, inputs, lambdas)
