"""Unit tests of workflow_scripts.lds: rank correlation, LDS on constructed cases, summaries, noise ceiling."""

import logging

import numpy as np
import pytest
from scipy.stats import spearmanr

from workflow_scripts.core import lds


def _case(n_query=6, n_train=30, n_subsets=25, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_query, n_train))
    masks = rng.random((n_subsets, n_train)) < 0.5
    return rng, scores, masks


def _spearman_rows(a, b):
    return np.array([spearmanr(x, y).statistic for x, y in zip(a, b)])


def test_rowwise_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 20)), rng.normal(size=(7, 20))
    b[0] = a[0] * 2 + 1  # perfectly monotone row
    b[1] = -(a[1] ** 3)  # perfectly anti-monotone row
    got = lds.rowwise_spearman(a, b)
    np.testing.assert_allclose(got, _spearman_rows(a, b), rtol=1e-12, atol=1e-12)
    assert got[0] == pytest.approx(1.0) and got[1] == pytest.approx(-1.0)


def test_rowwise_spearman_with_ties_matches_scipy():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4, size=(10, 15)).astype(float)
    b = rng.integers(0, 3, size=(10, 15)).astype(float)
    b[2] = a[2]  # identical rows with ties
    got = lds.rowwise_spearman(a, b)
    np.testing.assert_allclose(got, _spearman_rows(a, b), rtol=1e-12, atol=1e-12)
    assert got[2] == pytest.approx(1.0)


def test_constant_row_gives_zero_and_warns(caplog):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    a[1] = 5.0
    with caplog.at_level(logging.WARNING, logger="workflow_scripts"):
        got = lds.rowwise_spearman(a, b)
    assert got[1] == 0.0
    np.testing.assert_allclose(got[[0, 2]], _spearman_rows(a[[0, 2]], b[[0, 2]]), rtol=1e-12)
    assert any("1 of 3 rows are constant" in r.getMessage() for r in caplog.records)


def test_no_warning_without_constant_rows(caplog):
    rng = np.random.default_rng(3)
    with caplog.at_level(logging.WARNING, logger="workflow_scripts"):
        lds.rowwise_spearman(rng.normal(size=(2, 5)), rng.normal(size=(2, 5)))
    assert not [r for r in caplog.records if "constant" in r.getMessage()]


def test_subset_predictions_sum_over_removed_examples():
    _, scores, masks = _case(n_query=2, n_train=5, n_subsets=3)
    got = lds.subset_predictions(scores, masks)
    expected = np.array([[sum(scores[q, i] for i in range(5) if not masks[j, i]) for j in range(3)] for q in range(2)])
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_lds_is_one_for_exact_linear_datamodel():
    _, scores, masks = _case()
    # target for subset j = sum_{i not in S_j} s_i: exactly what the scores predict
    targets = np.stack([scores[:, ~m].sum(1) for m in masks])  # (n_subsets, n_query)
    np.testing.assert_allclose(lds.lds_per_query(scores, masks, targets), 1.0, rtol=1e-12)
    # any increasing transformation of the target keeps a perfect rank correlation
    np.testing.assert_allclose(lds.lds_per_query(scores, masks, np.exp(targets) + 3), 1.0, rtol=1e-12)
    # negated scores rank the subsets in reverse
    np.testing.assert_allclose(lds.lds_per_query(-scores, masks, targets), -1.0, rtol=1e-12)


def test_lds_uses_removed_not_kept_examples():
    # a target built from the KEPT examples is (for random scores) a different ranking
    _, scores, masks = _case(seed=4)
    kept_targets = np.stack([scores[:, m].sum(1) for m in masks])
    assert np.all(lds.lds_per_query(scores, masks, kept_targets) < 0.99)


def test_lds_summary_well_behaved():
    rng, scores, masks = _case(n_query=10, n_train=40, n_subsets=30, seed=5)
    exact = np.stack([scores[:, ~m].sum(1) for m in masks])
    targets = exact + rng.normal(scale=exact.std() * 0.7, size=exact.shape)
    summary = lds.lds_summary(scores, masks, targets, n_bootstrap=200, ci=0.9, seed=0)
    per_query = lds.lds_per_query(scores, masks, targets)
    assert summary["lds"] == pytest.approx(per_query.mean())
    assert 0.2 < summary["lds"] < 0.99  # noisy, but clearly positive
    assert summary["se"] == pytest.approx(per_query.std(ddof=1) / np.sqrt(len(per_query)))
    assert summary["ci_low"] <= summary["lds"] <= summary["ci_high"]
    assert summary["ci_low"] < summary["ci_high"]
    assert summary["n_queries"] == 10 and summary["n_subsets"] == 30
    # the bootstrap is seeded
    assert lds.lds_summary(scores, masks, targets, 200, 0.9, seed=0) == summary
    assert lds.lds_summary(scores, masks, targets, 200, 0.9, seed=1)["ci_low"] != summary["ci_low"]
    # a wider confidence level gives a wider interval
    wide = lds.lds_summary(scores, masks, targets, 200, 0.99, seed=0)
    assert wide["ci_low"] <= summary["ci_low"] and wide["ci_high"] >= summary["ci_high"]


def test_noise_ceiling_identical_seeds_is_one():
    rng = np.random.default_rng(6)
    per_subset = rng.normal(size=(12, 1, 4))
    targets = np.repeat(per_subset, 3, axis=1)  # (n_subsets, n_seeds, n_query), all seeds identical
    np.testing.assert_allclose(lds.noise_ceiling_per_query(targets), 1.0, rtol=1e-12)
    summary = lds.noise_ceiling_summary(targets, n_bootstrap=20, ci=0.9, seed=0)
    assert summary["lds"] == pytest.approx(1.0) and summary["ci_low"] == pytest.approx(1.0)


def test_noise_ceiling_averages_seed_pairs():
    rng = np.random.default_rng(7)
    targets = rng.normal(size=(15, 3, 5))
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = np.mean([_spearman_rows(targets[:, a].T, targets[:, b].T) for a, b in pairs], axis=0)
    np.testing.assert_allclose(lds.noise_ceiling_per_query(targets), expected, rtol=1e-12)


def test_noise_ceiling_needs_two_seeds():
    with pytest.raises(ValueError, match="n_seeds"):
        lds.noise_ceiling_per_query(np.zeros((5, 1, 3)))


def test_average_ranks_equal_scipy_rankdata_with_ties_and_batch_axes():
    from scipy.stats import rankdata

    rng = np.random.default_rng(3)
    for shape in [(5, 7), (3, 4, 9), (2, 1), (6, 50, 20)]:
        for ties in (False, True):
            a = rng.normal(size=shape)
            a = np.round(a * 2) / 2 if ties else a
            np.testing.assert_array_equal(lds.average_ranks(a), rankdata(a, axis=-1))
    np.testing.assert_array_equal(
        lds.average_ranks(np.array([[1.0, np.nan, 2.0]])), rankdata([[1.0, np.nan, 2.0]], axis=-1)
    )


def test_vectorised_lds_summary_equals_the_bootstrap_loop_and_its_cache():
    """lds_summary (all resamples ranked at once, ranks cached per method / target) == summarise of lds_per_query."""
    rng = np.random.default_rng(4)
    # Scores on a 1/64 grid: every subset prediction is an exact float64 sum in any BLAS order, so a resample's
    # repeated subsets tie in the loop too (real-valued scores: an AVX-512 dgemm gives the copies different last bits,
    # which breaks their tie and moves single Spearman statistics by up to 1e-2 and ci_low by 1.5e-3).
    scores = np.round(rng.normal(size=(6, 40)) * 64) / 64
    masks = rng.random((15, 40)) < 0.5
    targets = (~masks).astype(float) @ scores.T + 2 * rng.normal(size=(15, 6))
    targets[:, 0] = np.round(targets[:, 0])  # ties
    loop = lds.summarise(lambda idx: lds.lds_per_query(scores, masks[idx], targets[idx]), 15, 300, 0.9, 5)
    fast = lds.lds_summary(scores, masks, targets, 300, 0.9, 5)
    assert fast.keys() == loop.keys()
    for key in loop:  # ranks and Spearman are then exact; 1e-12 covers the rounding of the query mean and the quantile
        assert fast[key] == pytest.approx(loop[key], rel=1e-12, abs=1e-12), key  # other resamples move the CI by ~1e-3
    ranks = lds.BootstrapRanks(15, 300, 0.9, 5)
    assert ranks.lds(scores, masks, targets, "m", "t") == fast
    assert ranks.lds(scores, masks, targets, "m", "t") == fast  # from the cache
    other = ranks.lds(scores, masks, targets[::-1].copy(), "m", "t2")  # a new target key: new target ranks
    assert other != fast


# ---------------------------------------------------------------- queries not scored (NaN rows)
def test_lds_with_unscored_queries_matches_scipy_on_the_scored_ones(caplog):
    rng, scores, masks = _case(n_query=7, seed=3)
    targets = rng.normal(size=(len(masks), 7))
    partial = scores.copy()
    partial[[1, 4, 5]] = np.nan  # not scored (e.g. metagradient beyond max_queries)
    per_query = lds.lds_per_query(partial, masks, targets)
    scored = [0, 2, 3, 6]
    assert np.isnan(per_query[[1, 4, 5]]).all()
    predictions = scores @ (~masks).T
    expected = [spearmanr(predictions[q], targets[:, q]).statistic for q in scored]
    np.testing.assert_allclose(per_query[scored], expected, rtol=1e-12)
    with caplog.at_level(logging.WARNING, logger="workflow_scripts"):
        summary = lds.lds_summary(partial, masks, targets, n_bootstrap=50, ci=0.9, seed=0)
    assert "LDS over 4 of 7 queries" in caplog.text  # never dropped silently
    assert summary["n_queries"] == 4 and summary["n_queries_total"] == 7
    assert summary["lds"] == pytest.approx(np.mean(expected))
    assert summary["se"] == pytest.approx(np.std(expected, ddof=1) / 2)
    assert np.isfinite([summary["ci_low"], summary["ci_high"]]).all()
    # the scored rows' numbers do not depend on the others
    assert lds.lds_summary(scores[scored], masks, targets[:, scored], 50, 0.9, seed=0)["lds"] == pytest.approx(
        summary["lds"]
    )


def test_single_scored_query_has_no_standard_error():
    rng, scores, masks = _case(n_query=3)
    scores[1:] = np.nan
    summary = lds.lds_summary(scores, masks, rng.normal(size=(len(masks), 3)), 20, 0.9, seed=0)
    assert summary["n_queries"] == 1 and np.isnan(summary["se"]) and np.isfinite(summary["lds"])


def test_partly_nonfinite_rows_and_no_scored_query_are_errors():
    rng, scores, masks = _case(n_query=3)
    targets = rng.normal(size=(len(masks), 3))
    bad = scores.copy()
    bad[0, 5] = np.nan
    with pytest.raises(ValueError, match=r"rows \[0\] are partly non-finite"):
        lds.lds_per_query(bad, masks, targets)
    bad = scores.copy()
    bad[2] = np.inf
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        lds.scored_queries(bad)
    with pytest.raises(ValueError, match="no query has scores"):
        lds.lds_summary(np.full_like(scores, np.nan), masks, targets, 10, 0.9, seed=0)
