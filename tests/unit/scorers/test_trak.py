"""Unit tests of workflow_scripts.scorers.trak (KernelSolver) and scorers.pixel against dense formulas."""

import numpy as np
import pytest

from workflow_scripts.scorers import get_scorer, pixel, trak


def _features(n, d, q, seed=0):
    rng = np.random.default_rng(seed)
    # anisotropic features, as gradients are: very different eigenvalues of Phi^T Phi
    scales = np.geomspace(1.0, 1e-2, d)
    return (rng.normal(size=(n, d)) * scales).astype(np.float32), (rng.normal(size=(q, d)) * scales).astype(np.float32)


def dense_scores(train, queries, relative_lambda):
    phi = train.astype(np.float64)
    d = phi.shape[1]
    gram = phi.T @ phi
    lam = relative_lambda * np.trace(gram) / d
    solved = np.linalg.solve(gram + lam * np.eye(d), phi.T)  # (d, n): columns (Phi^T Phi + lam I)^{-1} phi_i
    return queries.astype(np.float64) @ solved, solved


@pytest.mark.parametrize("n, d", [(12, 30), (40, 9), (16, 16)])  # N < d, N > d, N = d
@pytest.mark.parametrize("relative_lambda", [1e-4, 1e-2, 1.0, 10.0])
def test_scores_equal_dense_formula(n, d, relative_lambda):
    train, queries = _features(n, d, q=5)
    solver = trak.KernelSolver(train)
    got = solver.scores(queries, relative_lambda)
    expected, _ = dense_scores(train, queries, relative_lambda)
    assert got.shape == (5, n)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("n, d", [(12, 30), (40, 9)])
@pytest.mark.parametrize("relative_lambda", [1e-3, 0.1, 3.0])
def test_preconditioned_train_norms(n, d, relative_lambda):
    train, _ = _features(n, d, q=1, seed=1)
    got = trak.KernelSolver(train).preconditioned_train_norms(relative_lambda)
    _, solved = dense_scores(train, train[:1], relative_lambda)
    np.testing.assert_allclose(got, np.linalg.norm(solved, axis=0), rtol=1e-6)


def test_absolute_lambda_is_relative_to_mean_eigenvalue():
    train, _ = _features(10, 7, 1)
    solver = trak.KernelSolver(train)
    phi = train.astype(np.float64)
    assert solver.absolute(0.5) == pytest.approx(0.5 * np.trace(phi.T @ phi) / 7, rel=1e-10)
    assert solver.absolute(0.5) == pytest.approx(0.5 * np.linalg.eigvalsh(phi.T @ phi).mean(), rel=1e-8)


def test_query_outside_row_space_of_train():
    # N < d: the part of phi(x) orthogonal to every train feature does not change any score
    train, queries = _features(5, 20, 3)
    solver = trak.KernelSolver(train)
    _, _, vt = np.linalg.svd(train.astype(np.float64), full_matrices=True)
    orthogonal = vt[5:].sum(0)  # orthogonal to the row space of Phi
    np.testing.assert_allclose(
        solver.scores(queries + orthogonal, 0.1), solver.scores(queries, 0.1), rtol=1e-6, atol=1e-9
    )


def test_large_lambda_tends_to_scaled_dot_product():
    train, queries = _features(8, 6, 2)
    solver = trak.KernelSolver(train)
    rel = 1e6
    lam = solver.absolute(rel)
    np.testing.assert_allclose(
        solver.scores(queries, rel) * lam, queries.astype(np.float64) @ train.T.astype(np.float64), rtol=1e-4
    )


class _FakeInputs:
    query_sets = ("generated", "heldout")

    def __init__(self, features):
        self._features = features

    def features(self, role, split, expect=None):
        assert role == "final"
        assert expect["output_function"] == "mean-squared-l2-norm" and expect["kind"] == "avg"
        return self._features[split]


def test_compute_returns_one_entry_per_lambda():
    train, gen = _features(10, 6, 3)
    _, held = _features(10, 6, 4, seed=2)
    inputs = _FakeInputs({"train": train, "generated": gen, "heldout": held})
    out = get_scorer("trak").compute({"family": "trak", "output_function": "mean-squared-l2-norm"}, inputs, [0.01, 1.0])
    assert [lam for lam, _ in out] == [0.01, 1.0]
    for lam, matrices in out:
        assert matrices["generated"].shape == (3, 10) and matrices["heldout"].shape == (4, 10)
        assert matrices["heldout"].dtype == np.float32
        np.testing.assert_allclose(matrices["heldout"], dense_scores(train, held, lam)[0], rtol=1e-4, atol=1e-6)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown scorer family"):
        get_scorer("clip-xl")


# ---------------------------------------------------------------- pixel similarity


def test_pixel_dot():
    rng = np.random.default_rng(0)
    queries, train = rng.normal(size=(3, 1, 4, 4)), rng.normal(size=(5, 1, 4, 4))
    got = pixel.similarity(queries, train, "dot")
    expected = np.array([[float(np.sum(q * z)) for z in train] for q in queries])
    assert got.shape == (3, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_pixel_cosine():
    rng = np.random.default_rng(1)
    queries, train = rng.normal(size=(3, 1, 4, 4)), rng.normal(size=(5, 1, 4, 4))
    got = pixel.similarity(queries, train, "cosine")
    expected = np.array(
        [[float(np.sum(q * z) / np.sqrt(np.sum(q * q) * np.sum(z * z))) for z in train] for q in queries]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(got) <= 1 + 1e-6)
    # an image is maximally similar to itself and to scaled copies of itself
    same = pixel.similarity(train[:2], np.concatenate([train[:2], 3 * train[:2]]), "cosine")
    np.testing.assert_allclose(same[[0, 0, 1, 1], [0, 2, 1, 3]], 1.0, rtol=1e-6)


def test_pixel_cosine_zero_image_is_finite():
    got = pixel.similarity(np.zeros((1, 1, 2, 2)), np.ones((2, 1, 2, 2)), "cosine")
    assert np.all(np.isfinite(got)) and np.all(got == 0)


def test_pixel_unknown_similarity():
    with pytest.raises(ValueError, match="manhattan"):
        pixel.similarity(np.zeros((1, 4)), np.zeros((1, 4)), "manhattan")
