"""Stage `counterfactual`: which training examples each counterfactual retraining removes.

For one generated query q (one of the first counterfactual.queries) and one method, the k training
examples to remove (k = counterfactual.k: a count, or a fraction of the training set):
- a scoring method: its top-k for q, i.e. the k LARGEST scores S[q, i] of scores/<method>/generated.npy.
  With the score convention (README, "Score convention") these are the examples whose removal the
  method predicts raises the query's loss the most. Ties go to the lower training index. When fewer
  than k scores are positive, the rest are the least negative ones (the log says how many).
- the random baseline (`random`): k examples drawn without replacement from rng(seeds.counterfactual, q),
  one independent draw per query.
Writes <out-dir>/members.npy (the sorted training indices that remain: what the retraining trains on)
and <out-dir>/selection.json (k, the removed indices and, for a method, their scores). One job per
(method, query), so adding queries or methods reruns only the new retrainings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import ArtefactError, load_json, load_npy, log, rng, save_json, save_npy
from workflow_scripts.dag.config import removal_count
from workflow_scripts.dag.paths import RANDOM_BASELINE


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of a 1-D score vector, largest first (ties: lower index first)."""
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"expected one query's scores (1-D), got shape {scores.shape}")
    if not 1 <= k < len(scores):
        raise ValueError(f"cannot remove k = {k} of {len(scores)} training examples (need 1 <= k < n_train)")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    return np.argsort(-scores.astype(np.float64), kind="stable")[:k]


def random_k(n_train: int, k: int, seed: int, query: int) -> np.ndarray:
    """k distinct training indices drawn for query `query` (the random baseline), sorted."""
    if not 1 <= k < n_train:
        raise ValueError(f"cannot remove k = {k} of {n_train} training examples (need 1 <= k < n_train)")
    return np.sort(rng(seed, query).choice(n_train, size=k, replace=False))


def remaining(n_train: int, removed: np.ndarray) -> np.ndarray:
    """The sorted training indices not in `removed`."""
    keep = np.ones(n_train, dtype=bool)
    keep[np.asarray(removed, dtype=np.int64)] = False
    return np.flatnonzero(keep).astype(np.int64)


def select(method: str, n_train: int, k: int, query: int, seed: int, scores: np.ndarray | None = None) -> np.ndarray:
    """The training indices removed for generated query `query`."""
    if method == RANDOM_BASELINE:
        return random_k(n_train, k, seed, query)
    if scores is None:
        raise ValueError(f"method {method!r} needs its score matrix")
    if scores.ndim != 2 or scores.shape[1] != n_train:
        raise ArtefactError(
            f"{method}: score matrix of shape {scores.shape} does not match {n_train} training examples"
        )
    if not 0 <= query < scores.shape[0]:
        raise ArtefactError(f"{method}: scores for {scores.shape[0]} generated queries, none for query {query}")
    return top_k(scores[query], k)


def load_generated_scores(score_dir: str | Path, method: str) -> np.ndarray:
    score_dir = Path(score_dir)
    chosen = score_dir / "chosen.json"
    if chosen.exists():
        not_run = load_json(chosen, "scores").get("not_run")
        if not_run:
            raise ArtefactError(
                f"{method}: the scores stage did not run it ({not_run}); it has no top-k to remove. "
                f"Remove it from counterfactual.methods"
            )
    path = score_dir / "generated.npy"
    if not path.exists():
        raise ArtefactError(f"{path}: missing (run the scores stage for {method})")
    return load_npy(path, "scores")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, help=f"a scores method, or {RANDOM_BASELINE!r} (the baseline)")
    parser.add_argument("--query", type=int, required=True, help="index of the generated query")
    parser.add_argument("--scores", help="the method's score directory (scores/<method>/); not for the baseline")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out-dir", required=True, help="writes members.npy and selection.json")


def run(args, config: dict) -> None:
    n_train = len(core_data.load_dataset(args.dataset)["train_images"])
    k = removal_count(config["counterfactual"]["k"], n_train)
    scores = None
    if args.method != RANDOM_BASELINE:
        if not args.scores:
            raise ValueError(f"--scores is required for method {args.method!r}")
        scores = load_generated_scores(args.scores, args.method)
    removed = select(args.method, n_train, k, args.query, config["seeds"]["counterfactual"], scores)
    out = Path(args.out_dir)
    record = {
        "method": args.method,
        "query": args.query,
        "k": k,
        "k_config": config["counterfactual"]["k"],
        "n_train": n_train,
        "removed": [int(i) for i in removed],
    }
    if scores is not None:
        record["scores"] = [float(scores[args.query, i]) for i in removed]
        positive = int((scores[args.query, removed] > 0).sum())
        if positive < k:
            log.warning(
                "counterfactual %s query %d: only %d of the top %d scores are positive",
                args.method,
                args.query,
                positive,
                k,
            )
    save_npy(remaining(n_train, removed), out / "members.npy")
    save_json(record, out / "selection.json")
    log.info("counterfactual %s query %d: removed %d of %d training examples", args.method, args.query, k, n_train)
