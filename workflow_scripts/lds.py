"""Linear datamodelling score (LDS) and its uncertainty.

With the score convention S[q, i] = predicted change of m_q when z_i is removed, the prediction
for a model trained on subset S_j is sum_{i not in S_j} S[q, i]; LDS_q is the Spearman rank
correlation over subsets j of that prediction and the seed-averaged measured m_q.

Queries a method did not score (e.g. the metagradient beyond its max_queries) have NaN rows: their LDS is NaN,
and every summary is over the scored queries only (n_queries says how many; the unscored ones are logged).
A row is scored completely or not at all; a partly non-finite row is an error.
"""
from __future__ import annotations

import itertools
import logging

import numpy as np
from scipy.stats import rankdata

log = logging.getLogger("workflow_scripts")


def subset_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(n_query, n_train) scores, (n_subsets, n_train) membership -> (n_query, n_subsets) predictions."""
    return scores.astype(np.float64) @ (~masks).T.astype(np.float64)


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of a with the same row of b (average ranks for ties).

    A row without variation has no ranking; its correlation is reported as 0, with a warning.
    """
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    denom = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    constant = denom == 0
    if constant.any():
        log.warning("%d of %d rows are constant; their rank correlation is set to 0", int(constant.sum()), len(denom))
    return np.where(constant, 0.0, (ra * rb).sum(1) / np.where(constant, 1.0, denom))


def scored_queries(scores: np.ndarray) -> np.ndarray:
    """Boolean (n_query,): rows that are all finite. NaN rows are queries not scored; anything else is an error."""
    scores = np.asarray(scores)
    scored = np.isfinite(scores).all(1)
    unscored = np.isnan(scores).all(1)
    bad = np.flatnonzero(~(scored | unscored))
    if len(bad):
        raise ValueError(f"score rows {bad[:10].tolist()} are partly non-finite (or infinite): a query is either scored "
                         "completely or not at all (a NaN row)")
    return scored


def lds_per_query(scores: np.ndarray, masks: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """targets: (n_subsets, n_query) seed-averaged measurements on exactly these subsets.

    (n_query,) LDS; NaN for queries not scored (NaN rows of scores)."""
    scored = scored_queries(scores)
    out = np.full(len(scored), np.nan)
    if scored.any():
        out[scored] = rowwise_spearman(subset_predictions(scores[scored], masks), targets.T[scored])
    return out


def mean_over_scored(per_query: np.ndarray) -> float:
    """Mean LDS over the scored queries (NaN entries are queries not scored); error if none is scored."""
    per_query = np.asarray(per_query, dtype=np.float64)
    if np.isnan(per_query).all():
        raise ValueError("no query has scores: nothing to evaluate")
    return float(np.nanmean(per_query))


def summarise(per_subset_fn, n_subsets: int, n_bootstrap: int, ci: float, seed: int) -> dict:
    """Mean over queries, its standard error, and a bootstrap CI over subsets.

    per_subset_fn(subset_indices) -> per-query LDS computed on those (resampled) subsets, NaN for queries not
    scored: mean, SE and CI are over the scored queries; n_queries counts them, n_queries_total all queries.
    """
    per_query = per_subset_fn(np.arange(n_subsets))
    valid = ~np.isnan(per_query)
    lds = mean_over_scored(per_query)
    generator = np.random.default_rng(seed)
    boot = [mean_over_scored(per_subset_fn(generator.integers(0, n_subsets, n_subsets))) for _ in range(n_bootstrap)]
    low, high = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    n = int(valid.sum())
    se = float(per_query[valid].std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")  # one query: no SE
    return {"lds": lds, "se": se, "ci_low": float(low), "ci_high": float(high), "n_queries": n,
            "n_queries_total": int(len(per_query)), "n_subsets": int(n_subsets)}


def lds_summary(scores: np.ndarray, masks: np.ndarray, targets: np.ndarray, n_bootstrap: int, ci: float, seed: int) -> dict:
    """LDS summary over the scored queries (NaN rows = not scored; logged)."""
    scored = scored_queries(scores)
    if not scored.all():
        log.warning("LDS over %d of %d queries: %d rows are NaN (not scored)", int(scored.sum()), len(scored),
                    int((~scored).sum()))
    return summarise(lambda idx: lds_per_query(scores, masks[idx], targets[idx]), len(masks), n_bootstrap, ci, seed)


def seed_pairs(n_seeds: int):
    return list(itertools.combinations(range(n_seeds), 2))


def noise_ceiling_per_query(targets: np.ndarray) -> np.ndarray:
    """targets (n_subsets, n_seeds, n_query): rank correlation between two seeds' measurements over
    subsets, averaged over seed pairs -- how well one retraining predicts another."""
    pairs = seed_pairs(targets.shape[1])
    if not pairs:
        raise ValueError("the noise ceiling needs at least 2 seeds per subset (lds.n_seeds >= 2)")
    return np.mean([rowwise_spearman(targets[:, a].T, targets[:, b].T) for a, b in pairs], axis=0)


def noise_ceiling_summary(targets: np.ndarray, n_bootstrap: int, ci: float, seed: int) -> dict:
    return summarise(lambda idx: noise_ceiling_per_query(targets[idx]), len(targets), n_bootstrap, ci, seed)
