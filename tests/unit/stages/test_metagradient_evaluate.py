"""The metagradient table (stage metagradient_evaluate) on constructed measurements, against scipy."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from workflow_scripts.__main__ import main
from workflow_scripts.core.common import save_npz
from workflow_scripts.stages import metagradient_evaluate as M

N, SUBSETS, TUNING, SEEDS, QUERIES, LOO = 20, 8, 2, 2, 3, 5


@pytest.fixture()
def case(tmp_path):
    rng = np.random.default_rng(0)
    masks = rng.random((SUBSETS, N)) < 0.5
    evaluation = np.arange(TUNING, SUBSETS)
    save_npz(tmp_path / "subsets.npz", masks=masks, tuning=np.arange(TUNING), evaluation=evaluation)
    scores = {name: rng.normal(size=(QUERIES, N)) for name in ("generated", "heldout")}
    for s in scores.values():
        s[2] = np.nan  # query 2 not attributed
    # seed-averaged LDS retrainings: noisy measurements
    seeded = {name: rng.normal(size=(SUBSETS, SEEDS, QUERIES)) for name in scores}
    measurements = []
    for j in range(SUBSETS):
        for s in range(SEEDS):
            path = tmp_path / "measurements" / f"subset{j:03d}_seed{s}.npz"
            save_npz(path, subset=np.array(j), replicate=np.array(s), **{k: v[j, s] for k, v in seeded.items()})
            measurements.append(path)
    # fixed-seed retrainings: an exact linear datamodel of the scores on the subsets (LDS 1), and leave-out changes
    # that are a monotone function of the prediction for query 0 and anti-monotone for query 1
    loo = np.ones((LOO, N), dtype=bool)
    for k in range(LOO):
        loo[k, rng.choice(N, 2, replace=False)] = False
    names = [f"subset{j:03d}" for j in evaluation] + [f"loo{k:03d}" for k in range(LOO)]
    save_npz(tmp_path / "sets.npz", names=np.array(names), masks=np.concatenate([masks[evaluation], loo]))
    full = {name: np.full(QUERIES, 1.0) for name in scores}
    fixed = {"full": full}
    for j in evaluation:
        fixed[f"subset{j:03d}"] = {n: 1.0 + np.nan_to_num(s) @ ~masks[j] for n, s in scores.items()}
    actual = {}
    for k in range(LOO):
        pred = {n: np.nan_to_num(s) @ ~loo[k] for n, s in scores.items()}
        change = {n: np.array([2 * p[0], -(p[1] ** 3), 0.5]) for n, p in pred.items()}
        actual[k] = change
        fixed[f"loo{k:03d}"] = {n: full[n] + change[n] for n in scores}
    fixed_files = []
    for name, values in fixed.items():
        path = tmp_path / "fixed_seed" / name / "measurement.npz"
        save_npz(path, subset=np.array(-1), replicate=np.array(0), **values)
        fixed_files.append(path)
    method = tmp_path / "scores" / "magic"
    method.mkdir(parents=True)
    (method / "chosen.json").write_text(
        json.dumps({"method": "magic", "config": {"family": "metagradient"}, "lambda": None})
    )
    for name, s in scores.items():
        np.save(method / f"{name}.npy", s.astype(np.float32))
    config = {
        "lds": {"n_subsets": SUBSETS, "n_seeds": SEEDS, "bootstrap_samples": 50, "ci": 0.95},
        "seeds": {"bootstrap": 7},
        "fixed_seed": {"loo_sets": LOO, "loo_fraction": 0.1},
    }
    return dict(
        tmp_path=tmp_path,
        masks=masks,
        evaluation=evaluation,
        scores=scores,
        seeded=seeded,
        loo=loo,
        measurements=measurements,
        fixed_files=fixed_files,
        method=method,
        config=config,
    )


def _run(case, *extra):
    stem = case["tmp_path"] / "tables" / "metagradient"
    main(
        [
            "metagradient_evaluate",
            "--config",
            json.dumps(case["config"]),
            "--subsets",
            str(case["tmp_path"] / "subsets.npz"),
            "--measurements",
            *map(str, case["measurements"]),
            *extra,
            "--table",
            str(stem),
        ]
    )
    return stem


def test_metagradient_table_against_scipy(case):
    stem = _run(
        case,
        "--fixed-seed-sets",
        str(case["tmp_path"] / "sets.npz"),
        "--fixed-seed",
        *map(str, case["fixed_files"]),
        "--scores",
        str(case["method"]),
    )
    table = pd.read_csv(stem.with_suffix(".csv")).set_index(["query_set", "target"])
    ev, masks = case["evaluation"], case["masks"]
    for name, scores in case["scores"].items():
        rows = table.loc[name]
        assert (rows["n_queries"] == 2).all() and (rows["n_queries_total"] == QUERIES).all()  # query 2 not attributed
        assert rows.loc[M.FIXED_SEED_LDS, "value"] == pytest.approx(1.0)  # exact linear datamodel
        predictions = scores[:2] @ ~masks[ev].T
        target = case["seeded"][name][ev].mean(1)
        expected = np.mean([spearmanr(predictions[q], target[:, q]).statistic for q in range(2)])
        assert rows.loc[M.SEED_AVERAGED_LDS, "value"] == pytest.approx(expected)
        assert rows.loc[M.LOO_SPEARMAN, "value"] == pytest.approx(0.0)  # +1 (query 0) and -1 (query 1)
        assert rows.loc[M.LOO_SPEARMAN, "n_sets"] == LOO
        fixed_target = 1.0 + np.nan_to_num(scores) @ ~masks[ev].T  # (n_query, n_eval)
        expected = np.mean([spearmanr(fixed_target[q], target[:, q]).statistic for q in range(2)])
        assert rows.loc[M.FIXED_SEED_PREDICTOR, "value"] == pytest.approx(expected)
        seeds = case["seeded"][name][ev]
        expected = np.mean([spearmanr(seeds[:, 0, q], seeds[:, 1, q]).statistic for q in range(2)])
        assert rows.loc[M.NOISE_CEILING, "value"] == pytest.approx(expected)
        for column in ("ci_low", "ci_high", "se"):
            assert rows[column].map(np.isfinite).all(), column
    markdown = stem.with_suffix(".md").read_text()
    assert "| magic | generated | LDS, fixed-seed target | 1.000 |" in markdown and "| 2 of 3 |" in markdown
    assert stem.with_suffix(".html").exists()


def test_metagradient_table_without_a_method_says_so(case):
    stem = _run(case)
    assert "No metagradient method is configured" in stem.with_suffix(".md").read_text()


def test_fixed_seed_sets_must_be_the_lds_subsets(case):
    from workflow_scripts.core.common import ArtefactError, load_npz

    sets = load_npz(case["tmp_path"] / "sets.npz")
    sets["masks"][0] = ~sets["masks"][0]
    save_npz(case["tmp_path"] / "sets.npz", **sets)
    with pytest.raises(ArtefactError, match="subset002 is not LDS subset 2"):
        _run(
            case,
            "--fixed-seed-sets",
            str(case["tmp_path"] / "sets.npz"),
            "--fixed-seed",
            *map(str, case["fixed_files"]),
            "--scores",
            str(case["method"]),
        )
