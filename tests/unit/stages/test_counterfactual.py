"""Counterfactual retraining: selection of the removed examples (stage counterfactual), the retraining's
membership file (stage train), the metrics and the bootstrap summary (stage counterfactual_evaluate),
and the configuration checks."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from workflow_scripts import __main__ as cli
from workflow_scripts.core import classifier
from workflow_scripts.core.common import ArtefactError, save_npz, save_torch
from workflow_scripts.dag import paths
from workflow_scripts.dag.config import ConfigError, removal_count, validate_config
from workflow_scripts.families.ddpm import measurement_draws
from workflow_scripts.stages import counterfactual as CF
from workflow_scripts.stages import counterfactual_evaluate as CE
from workflow_scripts.stages import train

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------- selection
def test_top_k_is_the_k_largest_scores_ties_to_the_lower_index():
    scores = np.array([0.1, 0.5, -0.2, 0.5, 0.3, 0.0])
    # by hand: 0.5 (index 1), 0.5 (index 3, tie -> after 1), 0.3 (index 4)
    np.testing.assert_array_equal(CF.top_k(scores, 3), [1, 3, 4])
    np.testing.assert_array_equal(CF.top_k(scores, 1), [1])


def test_top_k_takes_the_least_negative_when_few_scores_are_positive():
    scores = np.array([-3.0, 2.0, -1.0, -0.5])
    np.testing.assert_array_equal(CF.top_k(scores, 3), [1, 3, 2])


@pytest.mark.parametrize("k", [0, 4, 5])
def test_top_k_refuses_k_outside_1_to_n_minus_1(k):
    with pytest.raises(ValueError, match="cannot remove k"):
        CF.top_k(np.arange(4.0), k)


def test_top_k_refuses_non_finite_scores():
    with pytest.raises(ValueError, match="NaN or infinite"):
        CF.top_k(np.array([0.0, np.nan, 1.0]), 1)


def test_random_baseline_is_seeded_per_query():
    a = CF.random_k(100, 10, seed=9, query=0)
    assert len(set(a)) == 10 and a.min() >= 0 and a.max() < 100 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, CF.random_k(100, 10, seed=9, query=0))  # same seed, same query: same draw
    assert not np.array_equal(a, CF.random_k(100, 10, seed=9, query=1))  # another query: another draw
    assert not np.array_equal(a, CF.random_k(100, 10, seed=10, query=0))  # another seed: another draw


def test_remaining_is_the_sorted_complement():
    np.testing.assert_array_equal(CF.remaining(6, np.array([4, 1])), [0, 2, 3, 5])


def test_select_checks_the_score_matrix_shape():
    with pytest.raises(ArtefactError, match="does not match 10 training examples"):
        CF.select("trak", 10, 2, 0, 0, np.zeros((3, 9)))
    with pytest.raises(ArtefactError, match="scores for 1 generated queries, none for query 1"):
        CF.select("trak", 10, 2, 1, 0, np.zeros((1, 10)))
    scores = np.array([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]], float)
    np.testing.assert_array_equal(CF.select("trak", 5, 2, 0, 0, scores), [4, 3])
    np.testing.assert_array_equal(CF.select("trak", 5, 2, 1, 0, scores), [0, 1])
    np.testing.assert_array_equal(CF.select("random", 5, 2, 1, 3), CF.random_k(5, 2, 3, 1))


@pytest.mark.parametrize("k, n, expected", [(0.1, 300, 30), (0.25, 10, 2), (10, 300, 10), (1, 2, 1), (0.5, 3, 2)])
def test_removal_count_fraction_or_count(k, n, expected):
    assert removal_count(k, n) == expected


@pytest.mark.parametrize(
    "k, message",
    [
        (0, "removes nothing|fraction"),
        (0.001, "rounds to 0"),
        (300, "at least one must remain"),
        (1.5, "fraction"),
        (-2, "removes nothing|fraction"),
        (True, "fraction"),
        ("10", "fraction"),
        (0.9999, "at least one must remain"),
    ],
)
def test_removal_count_refuses_bad_k(k, message):
    with pytest.raises(ConfigError, match=message):
        removal_count(k, 300)


def _stage_config(base_config, **counterfactual):
    config = copy.deepcopy(base_config)
    config["counterfactual"].update(counterfactual)
    return json.loads(paths.stage_config(config, "counterfactual"))


def test_stage_writes_members_and_selection(base_config, tmp_path):
    n_train, n_queries = 20, 3
    save_npz(
        tmp_path / "dataset.npz",
        train_images=np.zeros((n_train, 1, 8, 8), np.float32),
        heldout_images=np.zeros((2, 1, 8, 8), np.float32),
    )
    scores = np.random.default_rng(0).normal(size=(4, n_train)).astype(np.float32)
    (tmp_path / "scores" / "trak").mkdir(parents=True)
    np.save(tmp_path / "scores" / "trak" / "generated.npy", scores)
    (tmp_path / "scores" / "trak" / "chosen.json").write_text(json.dumps({"method": "trak", "lambda": 1.0}))
    config = json.dumps(_stage_config(base_config, k=0.2))
    for method in ("trak", "random"):
        for q in range(n_queries):
            args = [
                "counterfactual",
                "--config",
                config,
                "--method",
                method,
                "--query",
                str(q),
                "--dataset",
                str(tmp_path / "dataset.npz"),
                "--out-dir",
                str(tmp_path / "cf" / method / f"q{q:03d}"),
            ]
            assert cli.main(args + (["--scores", str(tmp_path / "scores" / "trak")] if method == "trak" else [])) == 0
    for method in ("trak", "random"):
        for q in range(n_queries):
            directory = tmp_path / "cf" / method / f"q{q:03d}"
            selection = json.loads((directory / "selection.json").read_text())
            assert selection["k"] == 4 and selection["n_train"] == n_train and selection["query"] == q
            members = np.load(directory / "members.npy")
            np.testing.assert_array_equal(members, np.setdiff1d(np.arange(n_train), selection["removed"]))
            if method == "trak":  # the hand computation: the 4 largest scores of query q
                assert set(selection["removed"]) == set(np.argsort(scores[q])[-4:])
                assert min(selection["scores"]) >= np.sort(scores[q])[-4]
            else:
                np.testing.assert_array_equal(
                    selection["removed"], CF.random_k(n_train, 4, base_config["seeds"]["counterfactual"], q)
                )
            # the train stage accepts the file as a membership
            np.testing.assert_array_equal(train.load_members(directory / "members.npy", n_train), members)


def test_stage_refuses_a_method_that_did_not_run(base_config, tmp_path):
    save_npz(
        tmp_path / "dataset.npz",
        train_images=np.zeros((10, 1, 8, 8), np.float32),
        heldout_images=np.zeros((2, 1, 8, 8), np.float32),
    )
    (tmp_path / "clip_dot").mkdir()
    (tmp_path / "clip_dot" / "chosen.json").write_text(json.dumps({"not_run": "not run: no CLIP weights"}))
    args = [
        "counterfactual",
        "--config",
        json.dumps(_stage_config(base_config, k=2)),
        "--method",
        "clip_dot",
        "--query",
        "0",
        "--scores",
        str(tmp_path / "clip_dot"),
        "--dataset",
        str(tmp_path / "dataset.npz"),
        "--out-dir",
        str(tmp_path / "o"),
    ]
    with pytest.raises(ArtefactError, match="no CLIP weights.*counterfactual.methods"):
        cli.main(args)


# ------------------------------------------------------------------------------------------- membership files
@pytest.mark.parametrize(
    "members, message",
    [
        (np.array([0, 2, 1]), "sorted and unique"),
        (np.array([0, 0, 1]), "sorted and unique"),
        (np.array([0, 10]), r"outside \[0, 10\)"),
        (np.array([-1, 3]), "outside"),
        (np.array([0.0, 1.0]), "integer"),
        (np.zeros((2, 2), int), "1-D"),
        (np.array([], int), "non-empty"),
    ],
)
def test_members_file_is_checked(tmp_path, members, message):
    np.save(tmp_path / "members.npy", members)
    with pytest.raises(ArtefactError, match=message):
        train.load_members(tmp_path / "members.npy", 10)


def test_retraining_paths_for_lds_and_counterfactual_models(base_config):
    root = paths.root(base_config)
    lds = paths.retraining_inputs(base_config, "models", "subset003_seed1")
    assert lds == {"dataset": f"{root}/data/dataset.npz", "membership": f"{root}/data/subsets.npz"}
    assert paths.retraining_args("models", "subset003_seed1", "S") == "--subsets S --subset 3 --replicate 1"
    cf = paths.retraining_inputs(base_config, "counterfactual", "trak/q002")
    assert cf["membership"] == f"{root}/counterfactual/trak/q002/members.npy"
    assert (
        paths.retraining_args("counterfactual", "trak/q002", "M") == "--members M --replicate 0"
    )  # the full model's seed
    for kind, name in (("models", "full"), ("models", "trak/q002"), ("counterfactual", "subset003_seed1")):
        with pytest.raises(ValueError, match="unknown retraining"):
            paths.retraining_inputs(base_config, kind, name)
    assert paths.counterfactual_methods(base_config) == [*base_config["counterfactual"]["methods"], "random"]


def test_single_query_measurement_draws_match_the_whole_set():
    t, eps = measurement_draws(5, (1, 8, 8), 10, 2, 1000, seed=4, stream=0)
    t1, eps1 = measurement_draws(1, (1, 8, 8), 10, 2, 1000, seed=4, stream=0, indices=[3])
    assert torch.equal(t, t1) and torch.equal(eps[3:4], eps1)


# ------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "dotted, value, message",
    [
        ("counterfactual.queries", 33, "exceeds sample.n_generated"),
        ("counterfactual.methods", ["nope"], "'nope' is not in scores.methods"),
        ("counterfactual.methods", ["random"], "built-in baseline"),
        ("counterfactual.methods", ["clip_dot"], "no scores without CLIP weights"),
        ("counterfactual.k", 300, "at least one must remain"),
        ("counterfactual.k", 0.001, "rounds to 0"),
        ("figures.queries", [32], "does not exist"),
        ("figures.methods", ["nope"], "'nope' is not in scores.methods"),
    ],
)
def test_config_checks_name_the_field(base_config, dotted, value, message):
    config = copy.deepcopy(base_config)
    section, key = dotted.split(".")
    config[section][key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


@pytest.mark.parametrize("k", [0, 1.0, -0.5, "0.1", None])
def test_schema_rejects_bad_k(base_config, k):
    config = copy.deepcopy(base_config)
    config["counterfactual"]["k"] = k
    with pytest.raises(ConfigError, match="counterfactual.k"):
        validate_config(config)


# ------------------------------------------------------------------------------------------- metrics
def test_pixel_l2_and_cosine_match_direct_formulas():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 1, 8, 8)), rng.normal(size=(4, 1, 8, 8))
    expected = [np.sqrt(np.sum((a[i] - b[i]) ** 2)) for i in range(4)]
    np.testing.assert_allclose(CE.pixel_l2(a, b), expected)
    np.testing.assert_allclose(CE.pixel_l2(a, a), 0)
    x, y = rng.normal(size=(3, 16)), rng.normal(size=(3, 16))
    expected = [x[i] @ y[i] / (np.linalg.norm(x[i]) * np.linalg.norm(y[i])) for i in range(3)]
    np.testing.assert_allclose(CE.cosine(x, y), expected)
    np.testing.assert_allclose(CE.cosine(x, 2 * x), 1)
    np.testing.assert_allclose(CE.cosine(x, -x), -1)
    assert CE.cosine(np.zeros((1, 3)), np.ones((1, 3)))[0] == 0  # a zero embedding: defined as 0, not NaN
    with pytest.raises(ValueError, match="shapes differ"):
        CE.pixel_l2(a, b[:2])


def test_bootstrap_median_summary():
    values = np.array([1.0, 2.0, 3.0, 10.0])
    s = CE.bootstrap_median(values, 2000, 0.95, seed=7)
    assert s["median"] == 2.5 and s["mean"] == 4.0 and s["n_queries"] == 4
    assert 1.0 <= s["ci_low"] <= s["median"] <= s["ci_high"] <= 10.0
    assert s == CE.bootstrap_median(values, 2000, 0.95, seed=7)  # seeded
    # the CI by hand: percentiles of the medians of resamples drawn with the same generator
    g = np.random.default_rng(7)
    medians = np.median(values[g.integers(0, 4, (2000, 4))], axis=1)
    np.testing.assert_allclose([s["ci_low"], s["ci_high"]], np.quantile(medians, [0.025, 0.975]))
    constant = CE.bootstrap_median(np.full(5, 0.3), 100, 0.9, seed=0)
    assert constant["ci_low"] == constant["ci_high"] == constant["median"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="NaN"):
        CE.bootstrap_median(np.array([1.0, np.nan]), 10, 0.9, 0)
    with pytest.raises(ValueError, match="non-empty"):
        CE.bootstrap_median(np.array([]), 10, 0.9, 0)


# ------------------------------------------------------------------------------------------- the evaluation stage
@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from workflow_scripts.core.data import load_digits_images

    images, labels = load_digits_images()
    x, y = images[:60], labels[:60]
    cfg = {**classifier.DEFAULTS, "steps": 5, "channels": [4, 8], "feature_dim": 8}
    _, payload = classifier.train_classifier(cfg, 0, x, y)
    directory = tmp_path_factory.mktemp("cf-eval")
    save_torch(payload, directory / "classifier.pt")
    save_npz(directory / "dataset.npz", train_images=x, heldout_images=images[60:62])
    return directory, x


def test_evaluation_stage_writes_table_and_figures(base_config, tiny_classifier, tmp_path):
    directory, x = tiny_classifier
    config = copy.deepcopy(base_config)
    config["counterfactual"].update(methods=["trak"], queries=3, bootstrap_samples=50)
    rng = np.random.default_rng(0)
    regenerated, selections = [], []
    for method, scale in (("trak", 0.5), ("random", 0.05)):
        for q in range(3):
            full = x[q]
            path = tmp_path / method / f"q{q:03d}" / "regenerated.npz"
            save_npz(
                path,
                query=np.array(q),
                image_full=full,
                image_counterfactual=np.clip(full + scale * rng.normal(size=full.shape), -1, 1).astype(np.float32),
                query_image=full,
                loss_full=np.array(0.1),
                loss_counterfactual=np.array(0.1 + scale),
            )
            regenerated.append(str(path))
            (path.parent / "selection.json").write_text(
                json.dumps({"method": method, "query": q, "k": 6, "n_train": 60})
            )
            selections.append(str(path.parent / "selection.json"))
    args = [
        "counterfactual_evaluate",
        "--config",
        paths.stage_config(config, "counterfactual_evaluate"),
        "--regenerated",
        *regenerated,
        "--selections",
        *selections,
        "--dataset",
        str(directory / "dataset.npz"),
        "--classifier",
        str(directory / "classifier.pt"),
        "--table",
        str(tmp_path / "tables" / "counterfactual"),
        "--boxplots",
        str(tmp_path / "figures" / "boxplots"),
        "--pairs",
        str(tmp_path / "figures" / "pairs"),
    ]
    assert cli.main(args) == 0
    summary = pd.read_csv(tmp_path / "tables" / "counterfactual.csv")
    assert list(dict.fromkeys(summary["method"])) == ["trak", "random"]
    assert set(summary["metric"]) == set(CE.METRICS)
    assert np.isfinite(summary[["median", "mean", "ci_low", "ci_high"]].to_numpy()).all()
    assert (summary["embedding"] == "classifier features").all()
    per_query = pd.read_csv(tmp_path / "tables" / "counterfactual_per_query.csv")
    assert len(per_query) == 6
    np.testing.assert_allclose(per_query["loss_change"], np.repeat([0.5, 0.05], 3))
    l2 = summary.set_index(["method", "metric"])["median"]
    assert l2[("trak", "pixel_l2")] > l2[("random", "pixel_l2")]  # the bigger change is measured as bigger
    metrics = json.loads((tmp_path / "tables" / "counterfactual.json").read_text())
    assert set(metrics) == {"trak", "random"} and "pixel_l2_median" in metrics["trak"]
    assert "<table>" in (tmp_path / "tables" / "counterfactual.html").read_text()
    assert "| trak |" in (tmp_path / "tables" / "counterfactual.md").read_text()
    for stem in ("boxplots", "pairs"):
        for ext in ("png", "pdf"):
            assert (tmp_path / "figures" / f"{stem}.{ext}").stat().st_size > 2000, (stem, ext)


def test_regenerating_one_query_starts_from_its_own_seed(smoke_config):
    from workflow_scripts.families.ddpm import build_model, generate

    torch.manual_seed(0)
    model = build_model(smoke_config["model"], (1, 8, 8)).eval()
    cfg = {**smoke_config["sample"], "num_inference_steps": 3}
    batch = generate(model, (1, 8, 8), smoke_config["diffusion"], cfg, 3, 3, torch.device("cpu"))
    one = generate(model, (1, 8, 8), smoke_config["diffusion"], cfg, 3, 3, torch.device("cpu"), indices=[2])
    assert one["images"].shape == (1, 1, 8, 8) and list(one["seeds"]) == [3002]
    np.testing.assert_array_equal(one["trajectories"][0, 0], batch["trajectories"][2, 0])  # the same x_T
    np.testing.assert_allclose(one["images"][0], batch["images"][2], atol=0.05)  # batched vs single: float noise only
