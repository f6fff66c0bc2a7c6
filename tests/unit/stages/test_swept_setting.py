"""A setting swept beside lambda (Scorer.swept_setting, AbU's parameter subset): the scores stage's sweep table gains
a setting column, the (setting, lambda) pair with the best mean tuning LDS is chosen, and chosen.json, sweep.csv,
sweep.png and the LDS table's note say which. Scores are built so that the tuning LDS of each candidate is known."""

import json

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.scorers import get_scorer
from workflow_scripts.stages import scores
from workflow_scripts.stages.evaluate import lds_table

N_TRAIN, N_QUERY, N_SUBSETS = 30, 4, 40


@pytest.fixture
def problem():
    """Subsets, targets that are exactly additive in a weight per training image (one per query), and candidates:
    the true weights (perfect LDS), their negative (LDS -1), and noise."""
    rng = np.random.default_rng(0)
    masks = rng.random((N_SUBSETS, N_TRAIN)) < 0.5
    weights = rng.normal(size=(N_QUERY, N_TRAIN))
    # a positive score is a proponent: including it LOWERS the query's loss (core/lds.py's sign convention)
    target = -(masks.astype(float) @ weights.T)[:, None, :]  # (subsets, seeds, queries)
    subsets = {"masks": masks, "tuning": np.arange(20), "evaluation": np.arange(20, N_SUBSETS)}
    sets = lambda s: {"generated": s.copy(), "heldout": s.copy()}  # noqa: E731
    noise = rng.normal(size=weights.shape)
    results = [
        (0.1, sets(noise), "all"),
        (1.0, sets(-weights), "all"),
        (0.1, sets(weights), "attention"),  # the best: chosen
        (1.0, sets(noise[::-1]), "attention"),
    ]
    return results, subsets, {"generated": target, "heldout": target}


def test_the_best_setting_and_lambda_pair_is_chosen(problem):
    results, subsets, targets = problem
    table = scores.sweep(results, subsets["masks"], subsets["tuning"], subsets["evaluation"], targets)
    assert list(table.columns) == ["lambda", "setting", "query_set", "lds_tuning", "lds_evaluation"]
    assert table["setting"].tolist() == ["all"] * 4 + ["attention"] * 4
    # Spearman of scores that equal the additive weights is 1 up to ties (none in continuous draws); -1 for negated
    assert table["lds_tuning"].iloc[4] == pytest.approx(1.0) and table["lds_tuning"].iloc[2] == pytest.approx(-1.0)
    assert scores.choose(results, table) == 2
    # the same lambda under two settings are two candidates, never averaged together
    assert scores.choose(results[:2] + results[3:], scores.sweep(results[:2] + results[3:], **_args(problem))) != 1


def _args(problem):
    _, subsets, targets = problem
    return {
        "masks": subsets["masks"],
        "tuning": subsets["tuning"],
        "evaluation": subsets["evaluation"],
        "targets": targets,
    }


def test_plain_pairs_keep_the_table_as_it_was(problem):
    results, subsets, targets = problem
    plain = [(lam, matrices) for lam, matrices, _ in results[:2]]
    table = scores.sweep(plain, **_args(problem))
    assert list(table.columns) == ["lambda", "query_set", "lds_tuning", "lds_evaluation"]
    assert scores.choose(plain, table) == 0  # noise beats the negated weights


def test_chosen_json_sweep_and_lds_note_name_the_setting(problem, tmp_path):
    results, subsets, targets = problem
    scorer = get_scorer("unlearning")
    method_cfg = {"family": "unlearning", "fisher": "diagonal", "params": ["all", "attention"]}
    out = tmp_path / "abu"
    scores.write_method("abu", method_cfg, scorer, {}, results, subsets, targets, {}, out)
    chosen = json.loads((out / "chosen.json").read_text())
    assert chosen["lambda"] == 0.1 and chosen["setting"] == {"params": "attention"}
    assert chosen["settings"]["params"] == "attention"
    assert pd.read_csv(out / "sweep.csv")["setting"].tolist() == ["all"] * 4 + ["attention"] * 4
    assert (out / "sweep.png").stat().st_size > 5000
    np.testing.assert_array_equal(np.load(out / "generated.npy"), results[2][1]["generated"].astype(np.float32))
    rows = lds_table({"abu": out}, subsets, targets, {"bootstrap_samples": 20, "ci": 0.95}, 0)
    assert rows["note"].str.contains("params attention").all(), rows["note"].tolist()
