"""Gradient similarity, TracInCP / GAS and relative / renormalised influence against hand-written
dense formulas (numpy float64)."""

import numpy as np
import pytest

from workflow_scripts.core.common import ArtefactError
from workflow_scripts.scorers import get_scorer, gradient_similarity, normalized_if, tracin
from workflow_scripts.scorers.trak import KernelSolver


def _features(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) * np.geomspace(1.0, 0.05, d)


class _Inputs:
    """Stores by role; sidecar checkpoint info per role; expectations checked like ScorerInputs."""

    query_sets = ("generated", "heldout")

    def __init__(self, stores, lrs=None, made_by=None):
        self.stores, self.lrs = stores, lrs or {}
        self.made_by = made_by or {"kind": "avg", "output_function": "loss"}
        self.seeds = {}

    def roles(self):
        return list(self.stores)

    def features(self, role, split, expect=None):
        for key, want in (expect or {}).items():
            if self.made_by.get(key) != want:
                raise ArtefactError(f"store has {key} {self.made_by.get(key)!r}, the method needs {want!r}")
        return self.stores[role][split]

    def checkpoint(self, role):
        return {"step": int(role[4:]), "lr": self.lrs.get(role)}

    def sidecar(self, role, split):
        return {"made_by": {"projection": "gaussian", "projection_dim": 5, "seed_projection": self.seeds.get(role, 6)}}


def _store(n=7, d=5, seed=0):
    return {
        "train": _features(n, d, seed),
        "generated": _features(3, d, seed + 1),
        "heldout": _features(2, d, seed + 2),
    }


# ---------------------------------------------------------------- gradient similarity


@pytest.mark.parametrize("kind", ["dot", "cosine"])
def test_gradient_similarity_dense(kind):
    store = _store()
    out = get_scorer("gradient_similarity").compute(
        {"family": "gradient_similarity", "output_function": "loss", "similarity": kind},
        _Inputs({"final": store}),
        [0.1, 1.0],
    )
    assert len(out) == 1 and out[0][0] is None  # no lambda
    for name in ("generated", "heldout"):
        q, x = store[name], store["train"]
        if kind == "dot":
            expected = np.array([[sum(q[a, k] * x[b, k] for k in range(5)) for b in range(7)] for a in range(len(q))])
        else:
            expected = np.array(
                [[q[a] @ x[b] / np.sqrt((q[a] @ q[a]) * (x[b] @ x[b])) for b in range(7)] for a in range(len(q))]
            )
        np.testing.assert_allclose(out[0][1][name], expected, rtol=1e-5, atol=1e-7)
        assert out[0][1][name].dtype == np.float32


def test_gradient_similarity_checks_output_function():
    inputs = _Inputs({"final": _store()}, made_by={"kind": "avg", "output_function": "mean"})
    with pytest.raises(ArtefactError, match="output_function"):
        gradient_similarity.compute({"output_function": "loss", "similarity": "dot"}, inputs, [1.0])


# ---------------------------------------------------------------- TracInCP / GAS


def test_tracin_against_hand_sum():
    rng = np.random.default_rng(0)
    C, n, q, d = 3, 6, 4, 5
    train = [rng.normal(size=(n, d)) for _ in range(C)]
    queries = [rng.normal(size=(q, d)) for _ in range(C)]
    lrs = [1e-3, 5e-4, 1e-5]
    dot = tracin.tracin_scores(queries, train, lrs, "dot")
    cos = tracin.tracin_scores(queries, train, lrs, "cosine")
    for a in range(q):
        for i in range(n):
            hand_dot = hand_cos = 0.0
            for c in range(C):
                inner = sum(queries[c][a, k] * train[c][i, k] for k in range(d))
                hand_dot += lrs[c] * inner
                hand_cos += lrs[c] * inner / (np.linalg.norm(queries[c][a]) * np.linalg.norm(train[c][i]))
            assert dot[a, i] == pytest.approx(hand_dot, rel=1e-12)
            assert cos[a, i] == pytest.approx(hand_cos, rel=1e-12)


def test_tracin_compute_uses_every_checkpoint_with_its_lr():
    stores = {"step0000300": _store(seed=3), "step0000100": _store(seed=1), "step0000200": _store(seed=2)}
    lrs = {"step0000100": 1e-3, "step0000200": 6e-4, "step0000300": 1e-4}
    inputs = _Inputs(stores, lrs)
    out = tracin.compute({"family": "tracin", "output_function": "loss", "similarity": "dot"}, inputs, [0.1])
    assert out[0][0] is None
    expected = sum(lrs[r] * stores[r]["generated"] @ stores[r]["train"].T for r in stores)
    np.testing.assert_allclose(out[0][1]["generated"], expected, rtol=1e-5)
    # a single checkpoint's contribution is visible: dropping one changes the scores
    partial = tracin.tracin_scores(
        [stores["step0000100"]["generated"]], [stores["step0000100"]["train"]], [1e-3], "dot"
    )
    assert not np.allclose(partial, expected)


def test_tracin_errors():
    with pytest.raises(ArtefactError, match="intermediate checkpoints"):
        tracin.compute({"output_function": "loss", "similarity": "dot"}, _Inputs({"final": _store()}), [1.0])
    with pytest.raises(ArtefactError, match="learning rate"):
        tracin.compute({"output_function": "loss", "similarity": "dot"}, _Inputs({"step0000010": _store()}, {}), [1.0])
    mixed = _Inputs({"step0000010": _store(), "step0000020": _store()}, {"step0000010": 1.0, "step0000020": 1.0})
    mixed.seeds["step0000020"] = 7
    with pytest.raises(ArtefactError, match="differ in seed_projection"):
        tracin.compute({"output_function": "loss", "similarity": "dot"}, mixed, [1.0])
    with pytest.raises(ValueError, match="one \\(query, train, lr\\) triple"):
        tracin.tracin_scores([np.ones((1, 2))], [], [1.0], "dot")


# ---------------------------------------------------------------- relative / renormalised influence


@pytest.mark.parametrize("n, d", [(12, 7), (5, 9)])
@pytest.mark.parametrize("relative_lambda", [1e-3, 0.1, 10.0])
def test_normalized_influence_dense(n, d, relative_lambda):
    train, queries = _features(n, d, 4), _features(3, d, 5)
    gram = train.T @ train
    lam = relative_lambda * np.trace(gram) / d
    solved = np.linalg.solve(gram + lam * np.eye(d), train.T)  # columns (Phi^T Phi + lam I)^{-1} phi_i
    trak = queries @ solved
    solver = KernelSolver(train)
    np.testing.assert_allclose(
        normalized_if.normalized_scores(solver, queries, relative_lambda, "relative"),
        trak / np.linalg.norm(solved, axis=0)[None],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        normalized_if.normalized_scores(solver, queries, relative_lambda, "renormalized"),
        trak / np.linalg.norm(train, axis=1)[None],
        rtol=1e-6,
    )
    np.testing.assert_allclose(solver.train_norms(), np.linalg.norm(train, axis=1), rtol=1e-10)


def test_normalized_influence_compute_sweeps_lambda():
    store = _store(n=9, d=4, seed=6)
    out = get_scorer("normalized_if").compute(
        {"family": "normalized_if", "output_function": "loss", "normalization": "relative"},
        _Inputs({"final": store}),
        [0.01, 1.0],
    )
    assert [lam for lam, _ in out] == [0.01, 1.0]
    solver = KernelSolver(store["train"])
    np.testing.assert_allclose(
        out[1][1]["heldout"], normalized_if.normalized_scores(solver, store["heldout"], 1.0, "relative"), rtol=1e-5
    )
    with pytest.raises(ValueError, match="unknown normalization"):
        normalized_if.normalized_scores(solver, store["heldout"], 1.0, "absolute")
