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


def average_ranks(a: np.ndarray) -> np.ndarray:
    """scipy.stats.rankdata(a, axis=-1) (average ranks for ties, 1-based) by one sort; scipy's is ~10x slower on the
    (queries x bootstrap resamples x subsets) arrays of lds_summary. Non-finite input goes to scipy."""
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        return rankdata(a, axis=-1)
    n = a.shape[-1]
    order = np.argsort(a, axis=-1, kind="stable")
    ordered = np.take_along_axis(a, order, -1)
    pos = np.broadcast_to(np.arange(n), a.shape)
    starts = np.ones(a.shape, dtype=bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]  # first element of each group of ties
    ends = np.ones(a.shape, dtype=bool)
    ends[..., :-1] = starts[..., 1:]  # last element of each group
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, pos, n), -1), axis=-1), -1)
    ranks = np.empty(a.shape)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, -1)
    return ranks


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of a with the same row of b (average ranks for ties); rows run along the
    last axis (any leading axes are batch axes).

    A row without variation has no ranking; its correlation is reported as 0, with a warning.
    """
    return spearman_of_ranks(centred_ranks(a), centred_ranks(b))


def centred_ranks(a: np.ndarray) -> np.ndarray:
    ranks = average_ranks(a)
    return ranks - ranks.mean(-1, keepdims=True)


def spearman_of_ranks(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """rowwise_spearman from centred ranks (so that ranks shared by many correlations are computed once)."""
    ra, rb = np.asarray(ra, dtype=np.float64), np.asarray(rb, dtype=np.float64)
    denom = np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    constant = denom == 0
    if constant.any():
        log.warning(
            "%d of %d rows are constant; their rank correlation is set to 0", int(constant.sum()), constant.size
        )
    return np.where(constant, 0.0, (ra * rb).sum(-1) / np.where(constant, 1.0, denom))


def scored_queries(scores: np.ndarray) -> np.ndarray:
    """Boolean (n_query,): rows that are all finite. NaN rows are queries not scored; anything else is an error."""
    scores = np.asarray(scores)
    scored = np.isfinite(scores).all(1)
    unscored = np.isnan(scores).all(1)
    bad = np.flatnonzero(~(scored | unscored))
    if len(bad):
        raise ValueError(
            f"score rows {bad[:10].tolist()} are partly non-finite (or infinite): a query is either scored "
            "completely or not at all (a NaN row)"
        )
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
    return {
        "lds": lds,
        "se": se,
        "ci_low": float(low),
        "ci_high": float(high),
        "n_queries": n,
        "n_queries_total": int(len(per_query)),
        "n_subsets": int(n_subsets),
    }


def bootstrap_indices(n_subsets: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """(n_bootstrap, n_subsets) resampled subset indices, drawn as `summarise` draws them."""
    generator = np.random.default_rng(seed)
    return np.stack([generator.integers(0, n_subsets, n_subsets) for _ in range(n_bootstrap)])


class BootstrapRanks:
    """summarise() of lds_per_query, vectorised and cached: centred ranks of a (n_query, n_subsets) array on all
    subsets and on every bootstrap resample (drawn as summarise draws them). A method's prediction ranks are shared
    by every target, a target's by every method, so a table of M methods x T targets ranks M + T arrays, not M x T
    pairs (tables/lds_measurements has hundreds of rows)."""

    def __init__(self, n_subsets: int, n_bootstrap: int, ci: float, seed: int):
        self.idx, self.ci, self.n_subsets = bootstrap_indices(n_subsets, n_bootstrap, seed), ci, n_subsets
        self._cache: dict = {}

    def ranks(self, key, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(all subsets (n_query, n), resamples (n_query, n_bootstrap, n)) centred ranks of values (n_query, n)."""
        if key is None or key not in self._cache:
            # centred average ranks are multiples of 1/2: exact in float32, which halves the cache
            ranks = (centred_ranks(values), centred_ranks(values[:, self.idx]).astype(np.float32))
            if key is None:
                return ranks
            self._cache[key] = ranks
        return self._cache[key]

    def summary(self, prediction_ranks, target_ranks) -> dict:
        per_query = spearman_of_ranks(prediction_ranks[0], target_ranks[0])
        boot = spearman_of_ranks(prediction_ranks[1], target_ranks[1]).mean(0)  # (n_bootstrap,)
        low, high = np.quantile(boot, [(1 - self.ci) / 2, 1 - (1 - self.ci) / 2])
        n = len(per_query)
        se = float(per_query.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")  # one query: no SE
        return {
            "lds": float(per_query.mean()),
            "se": se,
            "ci_low": float(low),
            "ci_high": float(high),
            "n_queries": int(n),
            "n_queries_total": int(n),
            "n_subsets": int(self.n_subsets),
        }

    def lds(
        self, scores: np.ndarray, masks: np.ndarray, targets: np.ndarray, scores_key=None, targets_key=None
    ) -> dict:
        """lds_summary; the keys (None: not cached) name the scores and the targets for reuse.

        Over the scored queries only (NaN rows of scores = not scored, e.g. metagradient beyond max_queries; logged);
        n_queries counts them, n_queries_total all queries."""
        scored = scored_queries(scores)
        if not scored.any():
            raise ValueError("no query has scores: nothing to evaluate")
        if not scored.all():
            log.warning(
                "LDS over %d of %d queries: %d rows are NaN (not scored)",
                int(scored.sum()),
                len(scored),
                int((~scored).sum()),
            )
        prediction_ranks = self.ranks(scores_key, subset_predictions(scores[scored], masks))
        target_ranks = self.ranks(targets_key, targets.T)  # cached for all queries; rows = queries
        summary = self.summary(prediction_ranks, (target_ranks[0][scored], target_ranks[1][scored]))
        return {**summary, "n_queries_total": int(len(scored))}


def lds_summary(
    scores: np.ndarray, masks: np.ndarray, targets: np.ndarray, n_bootstrap: int, ci: float, seed: int
) -> dict:
    """Mean LDS over queries, its standard error, and a bootstrap CI over subsets (= summarise of lds_per_query)."""
    return BootstrapRanks(len(masks), n_bootstrap, ci, seed).lds(scores, masks, targets)


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
