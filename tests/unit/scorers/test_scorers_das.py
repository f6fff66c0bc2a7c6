"""DAS (scorers/das.py): the Sherman-Morrison / Woodbury leave-one-out step against refitting without
each example on tiny ridge least-squares problems, and both score forms against dense formulas."""

import numpy as np
import pytest

from workflow_scripts.core.common import ArtefactError
from workflow_scripts.scorers import das, get_scorer
from workflow_scripts.scorers.trak import KernelSolver


def ridge(X: np.ndarray, Y: np.ndarray, lam: float) -> np.ndarray:
    """argmin sum_i ||Y_i - X_i theta||^2 + lam ||theta||^2 for stacked rows X (m, d), Y (m,)."""
    return np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ Y)


def _problem(n, d, r=None, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.geomspace(1.0, 0.05, d)  # anisotropic, as gradients are
    shape = (n, d) if r is None else (n, r, d)
    X = rng.normal(size=shape) * scales
    Y = rng.normal(size=shape[:-1]) + X @ rng.normal(size=d)  # some signal, plus noise
    Xq = rng.normal(size=(4, *shape[1:])) * scales
    return X, Y, Xq


# ---------------------------------------------------------------- scalar output (Sherman-Morrison)


@pytest.mark.parametrize("n, d", [(9, 5), (6, 11)])  # N > d and N < d
@pytest.mark.parametrize("relative_lambda", [1e-2, 0.3, 5.0])
def test_sherman_morrison_step_equals_refit_without_example(n, d, relative_lambda):
    X, y, Xq = _problem(n, d)
    solver = KernelSolver(X)
    lam = solver.absolute(relative_lambda)
    beta = ridge(X, y, lam)
    e = y - X @ beta  # signed residuals at the optimum
    refits = np.stack([ridge(np.delete(X, i, 0), np.delete(y, i), lam) - beta for i in range(n)])
    predicted = das.scalar_parameter_changes(solver, e, relative_lambda, leverage=True)
    np.testing.assert_allclose(predicted, refits, rtol=1e-7, atol=1e-10 * np.abs(refits).max())
    # the score is the (negated) predicted change of the query output phi_q^T beta
    output_change = Xq @ refits.T  # (q, n): phi_q^T (beta_{-i} - beta)
    scores = das.scalar_scores(solver, Xq, e, relative_lambda, leverage=True)
    np.testing.assert_allclose(scores, -output_change, rtol=1e-6, atol=1e-10 * np.abs(output_change).max())


def test_scalar_leverage_matches_dense_hat_diagonal():
    X, _, _ = _problem(8, 6, seed=3)
    solver = KernelSolver(X)
    lam = solver.absolute(0.2)
    hat = X @ np.linalg.solve(X.T @ X + lam * np.eye(6), X.T)
    np.testing.assert_allclose(solver.leverages(0.2), np.diag(hat), rtol=1e-10)
    assert np.all(solver.leverages(0.2) < 1)


@pytest.mark.parametrize("leverage", [False, True])
def test_scalar_scores_dense_formula(leverage):
    X, _, Xq = _problem(7, 9, seed=4)
    r = np.random.default_rng(5).uniform(0.1, 1.0, size=7)  # residual magnitudes as the reference uses
    solver = KernelSolver(X)
    lam = solver.absolute(0.1)
    A = X.T @ X + lam * np.eye(9)
    h = np.einsum("id,di->i", X, np.linalg.solve(A, X.T))
    expected = Xq @ np.linalg.solve(A, X.T) * (r / (1 - h) if leverage else r)[None]
    np.testing.assert_allclose(das.scalar_scores(solver, Xq, r, 0.1, leverage), expected, rtol=1e-8)


# ---------------------------------------------------------------- vector output (Woodbury)


@pytest.mark.parametrize("n, r, d", [(7, 3, 6), (4, 2, 12), (5, 1, 4)])
@pytest.mark.parametrize("relative_lambda", [1e-2, 0.5])
def test_woodbury_step_equals_refit_without_example(n, r, d, relative_lambda):
    J, Y, Jq = _problem(n, d, r)
    solver = das.VectorKernelSolver(J)
    lam = solver.absolute(relative_lambda)
    flat = J.reshape(n * r, d)
    theta = ridge(flat, Y.reshape(-1), lam)
    E = Y - J @ theta  # (n, r) residual vectors
    refits = np.stack(
        [ridge(np.delete(J, i, 0).reshape(-1, d), np.delete(Y, i, 0).reshape(-1), lam) - theta for i in range(n)]
    )
    np.testing.assert_allclose(
        solver.parameter_changes(E, relative_lambda), refits, rtol=1e-6, atol=1e-10 * np.abs(refits).max()
    )
    # DAS: squared norm of the predicted change of the query's (vector) output
    expected = np.array([[np.sum((Jq[q] @ refits[i]) ** 2) for i in range(n)] for q in range(len(Jq))])
    got = solver.scores(Jq, E, relative_lambda)
    assert got.shape == (len(Jq), n) and np.all(got >= 0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12 * expected.max())


def test_vector_without_leverage_is_first_order_step():
    J, Y, Jq = _problem(6, 8, 2, seed=7)
    E = np.random.default_rng(8).normal(size=(6, 2))
    solver = das.VectorKernelSolver(J)
    lam = solver.absolute(0.3)
    flat = J.reshape(-1, 8)
    A = flat.T @ flat + lam * np.eye(8)
    step = -np.stack([np.linalg.solve(A, J[i].T @ E[i]) for i in range(6)])
    np.testing.assert_allclose(solver.parameter_changes(E, 0.3, leverage=False), step, rtol=1e-8, atol=1e-12)
    blocks = solver.leverage_blocks(0.3)
    np.testing.assert_allclose(
        blocks, np.stack([J[i] @ np.linalg.solve(A, J[i].T) for i in range(6)]), rtol=1e-8, atol=1e-12
    )
    expected = np.array([[np.sum((Jq[q] @ step[i]) ** 2) for i in range(6)] for q in range(4)])
    np.testing.assert_allclose(solver.scores(Jq, E, 0.3, leverage=False), expected, rtol=1e-8)


def test_vector_form_with_one_direction_is_squared_scalar_form():
    X, y, Xq = _problem(8, 5, seed=9)
    e = np.random.default_rng(1).normal(size=8)
    scalar = das.scalar_scores(KernelSolver(X), Xq, e, 0.2, leverage=True)
    vector = das.VectorKernelSolver(X[:, None]).scores(Xq[:, None], e[:, None], 0.2, leverage=True)
    np.testing.assert_allclose(vector, scalar**2, rtol=1e-8)


def test_vector_scores_reject_bad_shapes():
    J, _, Jq = _problem(4, 5, 2)
    solver = das.VectorKernelSolver(J)
    with pytest.raises(ValueError, match=r"\(n, 2, 5\)"):
        solver.scores(Jq[:, :1], np.zeros((4, 2)), 0.1)
    with pytest.raises(ValueError, match="vector-output DAS"):
        das.VectorKernelSolver(J[:, 0])


def test_scale_invariance_of_rankings():
    """Scaling features, residuals and queries together (as the 1/K average does) rescales every score alike."""
    J, Y, Jq = _problem(5, 6, 2, seed=11)
    E = np.random.default_rng(2).normal(size=(5, 2))
    a = das.VectorKernelSolver(J).scores(Jq, E, 0.1)
    b = das.VectorKernelSolver(3 * J).scores(3 * Jq, 3 * E, 0.1)
    np.testing.assert_allclose(b, 9 * a, rtol=1e-8)


# ---------------------------------------------------------------- compute() through the inputs interface


class _Inputs:
    query_sets = ("generated", "heldout")

    def __init__(self, features, residuals, made_by):
        self._features, self._residuals, self.made_by, self.expects = features, residuals, made_by, []

    def features(self, role, split, expect=None):
        assert role == "final"
        self.expects.append(expect)
        for key, want in expect.items():
            if self.made_by.get(key) != want:
                raise ArtefactError(f"store has {key} {self.made_by.get(key)!r}, the method needs {want!r}")
        return self._features[split]

    def residuals(self, role):
        return self._residuals


def test_compute_scalar_form():
    X, _, Xq = _problem(10, 6, seed=12)
    r = np.random.default_rng(3).uniform(0.2, 0.4, 10)
    inputs = _Inputs(
        {"train": X, "generated": Xq, "heldout": Xq[:2]}, r, {"kind": "unitnorm", "output_function": "mean"}
    )
    cfg = {"family": "das", "form": "scalar", "output_function": "mean", "leverage": True}
    out = get_scorer("das").compute(cfg, inputs, [0.1, 1.0])
    assert [lam for lam, _ in out] == [0.1, 1.0]
    np.testing.assert_allclose(
        out[1][1]["heldout"], das.scalar_scores(KernelSolver(X), Xq[:2], r, 1.0, True), rtol=1e-5
    )
    assert out[0][1]["generated"].dtype == np.float32 and out[0][1]["generated"].shape == (4, 10)


def test_compute_vector_form_checks_store_kind():
    J, _, Jq = _problem(6, 5, 3, seed=13)
    E = np.random.default_rng(4).normal(size=(6, 3))
    made_by = {"kind": "sketch", "output_function": "eps", "output_directions": 3}
    cfg = {"family": "das", "form": "vector", "output_directions": 3, "leverage": True}
    inputs = _Inputs({"train": J, "generated": Jq, "heldout": Jq}, E, made_by)
    out = get_scorer("das").compute(cfg, inputs, [0.5])
    np.testing.assert_allclose(out[0][1]["generated"], das.VectorKernelSolver(J).scores(Jq, E, 0.5), rtol=1e-5)
    with pytest.raises(ArtefactError, match="output_directions"):
        get_scorer("das").compute({**cfg, "output_directions": 4}, inputs, [0.5])
