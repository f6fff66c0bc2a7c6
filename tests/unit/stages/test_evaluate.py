"""The evaluate stage's tables: the LDS table and the K-FAC ablation built from the methods' chosen.json."""

import json

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.stages import evaluate as E


def _method(tmp_path, name, config, scores, settings=None, not_run=None):
    directory = tmp_path / name
    directory.mkdir()
    chosen = {"method": name, "config": config, "lambda": 0.1, "notes": {}, "settings": settings or {}}
    if not_run:
        chosen = {"method": name, "config": config, "lambda": None, "not_run": not_run}
    (directory / "chosen.json").write_text(json.dumps(chosen))
    if not not_run:
        for query_set, s in scores.items():
            np.save(directory / f"{query_set}.npy", s.astype(np.float32))
        pd.DataFrame(
            [{"lambda": 0.1, "query_set": q, "lds_tuning": 0.0, "lds_evaluation": 0.0} for q in scores]
        ).to_csv(directory / "sweep.csv", index=False)
    return directory


def test_ablation_has_kfac_rows_with_settings_and_references(tmp_path):
    rng = np.random.default_rng(0)
    n_subsets, n_train, n_query = 12, 20, 3
    masks = rng.random((n_subsets, n_train)) < 0.5
    effect = rng.normal(size=(n_query, n_train))
    # targets: a linear datamodel in the removed examples, two nearly identical seeds
    base = (~masks).astype(float) @ effect.T
    targets = {q: np.stack([base, base + 0.01 * rng.normal(size=base.shape)], axis=1) for q in ("generated", "heldout")}
    subsets = {"masks": masks, "evaluation": np.arange(4, n_subsets), "tuning": np.arange(4)}
    exact = {q: effect for q in targets}
    noisy = {q: effect + 3 * rng.normal(size=effect.shape) for q in targets}
    dirs = {
        "trak": _method(tmp_path, "trak", {"family": "trak"}, noisy),
        "kfac": _method(
            tmp_path,
            "kfac",
            {"family": "kfac"},
            exact,
            {
                "fisher_type": "mc",
                "kfac_approx": "expand",
                "ekfac": False,
                "quantization": "int8",
                "damping": "relative",
            },
        ),
        "ekfac": _method(tmp_path, "ekfac", {"family": "kfac", "ekfac": True}, None, not_run="no curvature here"),
        "pixel_dot": _method(tmp_path, "pixel_dot", {"family": "pixel"}, noisy),
    }
    table = E.lds_table(dirs, subsets, targets, {"bootstrap_samples": 50, "ci": 0.95}, seed=0)
    ablation = E.kfac_ablation(table, dirs)
    assert set(ablation["method"]) == {"kfac", "ekfac", "trak", E.NOISE_CEILING}  # pixel is not a reference row
    kfac = ablation[ablation["method"] == "kfac"]
    assert (kfac["fisher_type"] == "mc").all() and (kfac["lds"] > 0.99).all()  # the exact datamodel ranks perfectly
    assert (ablation.loc[ablation["method"] == "trak", "lds"] < kfac["lds"].min()).all()
    markdown = E.ablation_markdown(ablation)
    assert "| kfac | mc | expand | no | int8 | relative | generated | 1.000" in markdown
    assert "no curvature here" in markdown  # a variant that could not run says why
    E.plot(ablation, tmp_path / "ablation.png", "ablation")
    assert (tmp_path / "ablation.png").stat().st_size > 1000
    assert (tmp_path / "ablation.pdf").read_bytes()[:4] == b"%PDF"  # the PDF beside the PNG


def test_ablation_without_kfac_methods_says_so(tmp_path):
    table = pd.DataFrame(
        [
            {
                "method": "trak",
                "query_set": "generated",
                "lambda": 0.1,
                "lds": 0.3,
                "se": 0.01,
                "ci_low": 0.2,
                "ci_high": 0.4,
                "n_queries": 3,
                "n_subsets": 8,
                "lds_tuned_on_evaluation": 0.3,
                "note": "",
            }
        ]
    )
    dirs = {"trak": _method(tmp_path, "trak", {"family": "trak"}, {"generated": np.zeros((3, 4))})}
    assert "No kfac methods" in E.ablation_markdown(E.kfac_ablation(table, dirs))


def test_lds_table_covers_the_scored_queries_and_says_how_many(tmp_path):
    """A method that scored only some queries (NaN rows, e.g. the metagradient's max_queries): its row is the LDS over
    those, states the coverage, and equals the LDS of the scored rows alone."""
    rng = np.random.default_rng(1)
    n_subsets, n_train, n_query = 10, 16, 4
    masks = rng.random((n_subsets, n_train)) < 0.5
    targets = {q: rng.normal(size=(n_subsets, 2, n_query)) for q in ("generated", "heldout")}
    subsets = {"masks": masks, "evaluation": np.arange(3, n_subsets), "tuning": np.arange(3)}
    full = {q: rng.normal(size=(n_query, n_train)) for q in targets}
    partial = {q: np.where(np.arange(n_query)[:, None] < 1, s, np.nan) for q, s in full.items()}  # query 0 only
    dirs = {
        "magic": _method(tmp_path, "magic", {"family": "metagradient"}, partial),
        "trak": _method(tmp_path, "trak", {"family": "trak"}, full),
    }
    table = E.lds_table(dirs, subsets, targets, {"bootstrap_samples": 30, "ci": 0.95}, seed=0)
    magic = table[table["method"] == "magic"].set_index("query_set")
    assert (magic["n_queries"] == 1).all() and (magic["n_queries_total"] == n_query).all()
    assert magic["note"].str.startswith(f"LDS over 1 of {n_query} queries").all()
    assert table.loc[table["method"] == "trak", "note"].eq("").all()  # complete rows: no coverage note
    one = {q: (masks[subsets["evaluation"]], t[subsets["evaluation"]].mean(1)[:, :1]) for q, t in targets.items()}
    from workflow_scripts.core.lds import lds_per_query

    for q, (m, t) in one.items():
        assert magic.loc[q, "lds"] == pytest.approx(lds_per_query(full[q][:1], m, t)[0])
    markdown = E.to_markdown(table)
    assert f"| magic | generated | {magic.loc['generated', 'lds']:.3f} | - |" in markdown  # one query: no SE
