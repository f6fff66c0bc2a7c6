"""The smoke workflow end to end, through Snakemake, in a scratch copy of the repository."""

import json
import math
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml
from report_browser import rendered_results
from workflow_runs import snakemake

# smoke_run (tests/conftest.py): the smoke workflow run locally once per session, also the reference of
# tests/workflow/test_slurm.py
pytestmark = pytest.mark.slow  # every test here needs the smoke run (~25 min on 2 CPUs) or its report


def test_lds_table_has_every_method_and_query_set(smoke_run, smoke_config):
    table = pd.read_csv(smoke_run / "results/smoke/tables/lds.csv")
    methods = set(smoke_config["scores"]["methods"]) | {"noise ceiling (seed-to-seed)"}
    assert set(table["method"]) == methods
    for method in methods:
        assert set(table.loc[table["method"] == method, "query_set"]) == {"generated", "heldout"}
    not_run = table["method"].map(lambda m: smoke_config["scores"]["methods"].get(m, {}).get("family") == "clip")
    assert (table.loc[not_run, "note"] == "not run: no CLIP weights").all()  # no weights here: a reason, never a number
    assert table.loc[not_run, "lds"].isna().all()
    ran = table[~not_run]
    for column in ("lds", "ci_low", "ci_high"):
        assert ran[column].map(math.isfinite).all(), column
        assert ran[column].between(-1, 1).all(), column
    markdown = (smoke_run / "results/smoke/tables/lds.md").read_text()
    assert all(m in markdown for m in methods)


def test_lds_per_measurement_has_every_target_method_and_noise_ceiling(smoke_run, smoke_config):
    from workflow_scripts.core.contracts import target_names

    table = pd.read_csv(smoke_run / "results/smoke/tables/lds_measurements.csv")
    targets = target_names(smoke_config)
    assert {"elbo", "trajectory", "loss"} <= set(targets)
    assert list(dict.fromkeys(table["measurement"])) == targets
    methods = set(smoke_config["scores"]["methods"]) | {"noise ceiling (seed-to-seed)"}
    for target in targets:
        rows = table[table["measurement"] == target]
        sets = {"generated"} if target == "trajectory" else {"generated", "heldout"}  # held-out: no trajectory
        assert set(rows["query_set"]) == sets, target
        for query_set in sets:
            assert set(rows.loc[rows["query_set"] == query_set, "method"]) == methods, (target, query_set)
    ran = table[table["lds"].notna()]
    assert ran["lds"].between(-1, 1).all() and ran["ci_low"].map(math.isfinite).all()
    # the loss rows are the LDS table's
    lds = pd.read_csv(smoke_run / "results/smoke/tables/lds.csv")
    loss = table[table["measurement"] == "loss"].reset_index(drop=True)
    pd.testing.assert_series_equal(loss["lds"], lds["lds"], check_names=False)
    elbo_tuned = json.loads((smoke_run / "results/smoke/scores/kfac_elbo/chosen.json").read_text())
    assert elbo_tuned["target"] == {"generated": "elbo", "heldout": "elbo"}  # lambda tuned on its own target
    assert "| elbo | kfac_elbo | generated |" in (smoke_run / "results/smoke/tables/lds_measurements.md").read_text()


def test_measurement_substitution_table(smoke_run):
    table = pd.read_csv(smoke_run / "results/smoke/tables/measurement_substitution.csv")
    for target in ("loss", "elbo"):
        for method, gradient in (("kfac", "loss"), ("kfac_elbo", "elbo"), ("noise ceiling (seed-to-seed)", None)):
            rows = table[(table["measurement"] == target) & (table["method"] == method)]
            assert set(rows["query_set"]) == {"generated", "heldout"}, (target, method)
            assert rows["lds"].map(math.isfinite).all()
            if gradient:
                assert (rows["matched"] == (gradient == target)).all()
    markdown = (smoke_run / "results/smoke/tables/measurement_substitution.md").read_text()
    assert "kfac (loss gradient)" in markdown and "kfac_elbo (elbo gradient)" in markdown
    assert "| elbo | generated |" in markdown


def test_changing_elbo_settings_remeasures_but_retrains_no_lds_model(smoke_run, smoke_config):
    """measure.elbo is read by the measure jobs (and the kfac scores); the LDS retrainings, gradient stores and
    curvature stay. (Every scores job reads the measurement files, so the scores and, through the chosen top-k,
    the counterfactual retrainings rerun too.)"""
    overlay = smoke_run / "elbo.yaml"
    overlay.write_text(yaml.safe_dump({"measure": {"elbo": {"n_timesteps": 6}}}))
    result = snakemake(smoke_run, "--configfile", "configs/smoke.yaml", str(overlay), "-n")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    n_models = smoke_config["lds"]["n_subsets"] * smoke_config["lds"]["n_seeds"]
    assert re.search(rf"^measure\s+{n_models}$", out, re.M) and re.search(r"^evaluate\s+1$", out, re.M), out[-3000:]
    # the methods' counterfactual retrainings (not the random baseline's, which reads no scores); no LDS retraining
    n_counterfactual = smoke_config["counterfactual"]["queries"] * len(smoke_config["counterfactual"]["methods"])
    assert re.search(rf"^train_subset\s+{n_counterfactual}$", out, re.M), out[-3000:]
    for rule in ("train_full", "gradients", "curvature", "sample"):
        assert not re.search(rf"^{rule}\s+\d+$", out, re.M), rule


def test_figure_is_a_nonempty_png(smoke_run):
    from PIL import Image

    image = Image.open(smoke_run / "results/smoke/figures/lds.png")
    assert image.size[0] > 200 and image.size[1] > 200
    assert len(set(image.convert("L").tobytes())) > 10  # not a blank canvas


def test_the_critical_path_starts_before_the_retrainings(smoke_run):
    # job start order of the smoke run, from Snakemake's own log (each job start prints "rule <name>:")
    logs = sorted((smoke_run / ".snakemake" / "log").glob("*.snakemake.log"))
    log = next(path for path in logs if "rule train_full:" in path.read_text())
    started = [m.group(1) for line in log.read_text().splitlines() if (m := re.match(r"^(?:local)?rule (\w+):$", line))]
    retrainings = [i for i, rule in enumerate(started) if rule == "train_subset"]
    assert len(retrainings) > 4, started
    # rule priorities (rules/*.smk): the full model in the first round of jobs after the data. With 2 cores and
    # 1 thread per job that round starts 2 jobs, printed in no fixed order, so at most one retraining may come first;
    # without priorities dozens of ready retrainings compete with train_full and it is picked late.
    assert sum(i < started.index("train_full") for i in retrainings) <= 1, started
    assert started.index("sample") < retrainings[-1], started


def test_rerun_has_nothing_to_do(smoke_run):
    result = snakemake(smoke_run, "--configfile", "configs/smoke.yaml", "-n")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_changing_lds_bootstrap_reruns_only_evaluation(smoke_run):
    overlay = smoke_run / "changed.yaml"
    overlay.write_text(yaml.safe_dump({"lds": {"bootstrap_samples": 60}}))
    result = snakemake(smoke_run, "--configfile", "configs/smoke.yaml", str(overlay), "-n", "--quiet", "rules")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "evaluate" in out
    for rule in ("train_subset", "train_full", "measure", "gradients"):
        assert rule not in out, out


def test_bad_config_fails_before_any_job_naming_the_field(smoke_run):
    overlay = smoke_run / "bad.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"stepz": 10}}))
    result = snakemake(smoke_run, "--configfile", "configs/smoke.yaml", str(overlay), "-n")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "train" in out and "stepz" in out
    assert "Execute" not in out


def test_checkpoints_keep_their_config(smoke_run, smoke_config):
    from workflow_scripts.families.ddpm import load_model

    _, payload = load_model(smoke_run / "results/smoke/models/full/model.pt", smoke_config["model"])
    assert payload["config"]["train"] == smoke_config["train"]
    assert payload["step"] == smoke_config["train"]["steps"]
    intermediate = sorted((smoke_run / "results/smoke/models/full/checkpoints").glob("step*.pt"))
    assert len(intermediate) == smoke_config["train"]["steps"] // smoke_config["train"]["checkpoint_every"]


def test_ensemble_members_are_full_models_with_their_own_seeds(smoke_run, smoke_config):
    from workflow_scripts.core.common import load_torch

    root = smoke_run / "results/smoke"
    full = load_torch(root / "models/full/model.pt")["config"]
    sizes = [m.get("ensemble", 1) for m in smoke_config["scores"]["methods"].values() if m]
    members = sorted((root / "models/ensemble").glob("member*/model.pt"))
    assert len(members) == max(sizes) - 1 >= 1
    for k in range(1, max(sizes)):
        made_by = load_torch(root / f"models/ensemble/member{k}/model.pt")["config"]
        assert made_by["seed"] == full["seed"] + k  # seeds.train + k: another initialisation and data order
        assert made_by["members_sha256"] == full["members_sha256"] and made_by["train"] == full["train"]
    # every member's store sits beside the full model's, and an ensemble's scores are not the full model's alone
    assert (root / "gradients/member1").is_dir()
    ens = np.load(root / "scores/trak_ens2/generated.npy")
    assert ens.shape == np.load(root / "scores/trak/generated.npy").shape
    assert not np.allclose(ens, np.load(root / "scores/trak/generated.npy"))


# ------------------------------------------------------------------------------ counterfactual retraining
def test_counterfactual_table_has_every_method_and_the_random_baseline(smoke_run, smoke_config):
    from workflow_scripts.stages.counterfactual_evaluate import METRICS

    table = pd.read_csv(smoke_run / "results/smoke/tables/counterfactual.csv")
    methods = [*smoke_config["counterfactual"]["methods"], "random"]
    assert list(dict.fromkeys(table["method"])) == methods
    for method in methods:
        assert set(table.loc[table["method"] == method, "metric"]) == set(METRICS)
    for column in ("median", "mean", "ci_low", "ci_high"):
        assert table[column].map(math.isfinite).all(), column
    assert (table["n_queries"] == smoke_config["counterfactual"]["queries"]).all()
    cosine = table[table["metric"] == "embedding_cosine"]
    assert cosine["median"].between(-1, 1).all()
    markdown = (smoke_run / "results/smoke/tables/counterfactual.md").read_text()
    assert all(f"| {m} |" in markdown for m in methods)


def test_counterfactual_models_differ_from_the_full_one_only_in_members(smoke_run, smoke_config):
    import json

    from workflow_scripts.core.common import load_torch

    root = smoke_run / "results/smoke"
    full = load_torch(root / "models/full/model.pt")["config"]
    k = round(smoke_config["counterfactual"]["k"] * smoke_config["data"]["n_train"])
    for method in [*smoke_config["counterfactual"]["methods"], "random"]:
        for q in range(smoke_config["counterfactual"]["queries"]):
            directory = root / f"counterfactual/{method}/q{q:03d}"
            selection = json.loads((directory / "selection.json").read_text())
            assert selection["k"] == k and len(selection["removed"]) == k
            made_by = load_torch(directory / "model.pt")["config"]
            assert made_by["seed"] == full["seed"] and made_by["train"] == full["train"]  # the full model's seed
            assert made_by["n_members"] == full["n_members"] - k


FIGURES = (
    "lds_bars",
    "damping_sweeps",
    "predicted_vs_actual",
    "influencers",
    "counterfactual_boxplots",
    "counterfactual_pairs",
    "lds_measurements",
)


@pytest.mark.parametrize("name", FIGURES)
def test_figures_are_nonempty_png_and_pdf(smoke_run, name):
    from PIL import Image

    png = smoke_run / f"results/smoke/figures/{name}.png"
    image = Image.open(png)
    assert image.size[0] > 150 and image.size[1] > 100
    assert len(set(image.convert("L").tobytes())) > 10  # not a blank canvas
    pdf = (smoke_run / f"results/smoke/figures/{name}.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(pdf) > 2000


def test_changing_k_reruns_only_the_counterfactual_retrainings(smoke_run, smoke_config):
    overlay = smoke_run / "k.yaml"
    overlay.write_text(yaml.safe_dump({"counterfactual": {"k": 3}}))
    result = snakemake(smoke_run, "--configfile", "configs/smoke.yaml", str(overlay), "-n")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    n_counterfactual = smoke_config["counterfactual"]["queries"] * (len(smoke_config["counterfactual"]["methods"]) + 1)
    assert re.search(rf"^train_subset\s+{n_counterfactual}$", out, re.M), out[-3000:]  # not the LDS retrainings
    for rule in ("train_full", "measure", "gradients", "scores", "scores_kfac_family", "evaluate"):
        assert not re.search(rf"^{rule}\s+\d+$", out, re.M), rule


# ------------------------------------------------------------------------------ metagradient (MAGIC)
def test_metagradient_rows_cover_the_attributed_queries_on_both_targets(smoke_run, smoke_config):
    from workflow_scripts.stages import metagradient_evaluate as M

    method = smoke_config["scores"]["methods"]["metagradient"]
    n_total = {"generated": smoke_config["sample"]["n_generated"], "heldout": smoke_config["data"]["n_heldout"]}
    lds = pd.read_csv(smoke_run / "results/smoke/tables/lds.csv").set_index(["method", "query_set"])
    table = pd.read_csv(smoke_run / "results/smoke/tables/metagradient.csv")
    for name, total in n_total.items():
        row = lds.loc[("metagradient", name)]
        assert row["n_queries"] == method["max_queries"] and row["note"].startswith(f"LDS over 1 of {total} queries")
        rows = table[table["query_set"] == name].set_index("target")
        assert {M.FIXED_SEED_LDS, M.SEED_AVERAGED_LDS, M.LOO_SPEARMAN, M.NOISE_CEILING} <= set(rows.index)
        assert rows["value"].between(-1, 1).all() and (rows["n_queries"] == method["max_queries"]).all()
        # the seed-averaged row is the LDS table's number
        assert rows.loc[M.SEED_AVERAGED_LDS, "value"] == pytest.approx(row["lds"], abs=1e-12)
    # its chunk jobs, fixed-seed models on every evaluation subset + leave-out set
    from workflow_scripts.dag import paths

    chunks = sorted((smoke_run / "results/smoke/scores/metagradient/chunks").glob("chunk*.npz"))
    assert len(chunks) == len(paths.metagradient_chunks(smoke_config, "metagradient"))
    fixed = sorted(p.parent.name for p in (smoke_run / "results/smoke/fixed_seed").glob("*/model.pt"))
    lds_cfg = smoke_config["lds"]
    assert len(fixed) == lds_cfg["n_subsets"] - lds_cfg["n_tuning"] + smoke_config["fixed_seed"]["loo_sets"]


def test_benchmark_lds_on_the_metagradient_queries(smoke_run, smoke_config, repo):
    """benchmarks/lds_on_queries.py (README, "Metagradient"): every method on the metagradient's queries; its
    metagradient row equals tables/metagradient.csv, and the other methods are restricted to the same queries."""
    from workflow_runs import BIN

    out = subprocess.run(
        [
            str(BIN / "python"),
            str(repo / "benchmarks/lds_on_queries.py"),
            "--results",
            "results/smoke",
            "--config",
            "params.yaml",
            "configs/smoke.yaml",
        ],
        cwd=smoke_run,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")[1:]
        for line in out.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| method")
    }
    table = pd.read_csv(smoke_run / "results/smoke/tables/metagradient.csv").set_index(["query_set", "target"])
    from workflow_scripts.stages import metagradient_evaluate as M

    cells = rows["metagradient"]
    for k, (name, target) in enumerate(
        (name, t) for name in ("generated", "heldout") for t in (M.FIXED_SEED_LDS, M.SEED_AVERAGED_LDS, M.LOO_SPEARMAN)
    ):
        assert float(cells[k].split()[0]) == pytest.approx(table.loc[(name, target), "value"], abs=5e-4)
    assert "trak" in rows and "kfac" in rows and "queries: generated [0], heldout [0]" in out.stdout
    # trak's seed-averaged LDS is over query 0 alone: scipy's Spearman of its subset predictions vs the target
    from scipy.stats import spearmanr

    from workflow_scripts.core import data as core_data
    from workflow_scripts.dag import paths
    from workflow_scripts.families.likelihood import load_targets

    config = smoke_config
    subsets = core_data.load_subsets(smoke_run / "results/smoke/data/subsets.npz")
    evaluation = subsets["evaluation"]
    target = load_targets(
        [str(smoke_run / p) for p in paths.measurement_files(config)],
        config["lds"]["n_subsets"],
        config["lds"]["n_seeds"],
    )["generated"][evaluation].mean(1)[:, 0]
    scores = np.load(smoke_run / "results/smoke/scores/trak/generated.npy")[0].astype(np.float64)
    predicted = (~subsets["masks"][evaluation]).astype(np.float64) @ scores
    assert float(rows["trak"][1].split()[0]) == pytest.approx(spearmanr(predicted, target)[0], abs=5e-4)


# ------------------------------------------------------------------------------ the HTML report in a browser
@pytest.fixture(scope="module")
def report(smoke_run):
    result = snakemake(smoke_run, "--configfile", "configs/smoke.yaml", "--report", "results/smoke/report.html")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return smoke_run / "results/smoke/report.html"


def test_report_is_self_contained_with_every_table_and_figure(report):
    html = report.read_text()
    assert len(html) > 100_000
    for name in (*FIGURES, "lds", "counterfactual", "kfac_ablation", "measurement_substitution"):
        assert name in html, name
    assert 'src="http' not in html and 'href="http' not in html.replace('href="https://snakemake', "")


def test_report_renders_its_figures_in_a_headless_browser(report, tmp_path):
    by_name = rendered_results(report, tmp_path)
    expected_images = {f"{name}.png" for name in FIGURES} | {"kfac_ablation.png"}
    assert expected_images <= set(by_name), sorted(by_name)
    for name in expected_images:
        r = by_name[name]
        assert r.get("naturalWidth", 0) > 100 and r.get("naturalHeight", 0) > 100, r  # decoded by the browser
        assert r["shownWidth"] > 50, r  # laid out on the page
        assert 0.005 < r["inkFraction"] < 0.99, r  # not blank
        assert r["caption"] > 100, r  # explained
    for name in (
        "lds.html",
        "counterfactual.html",
        "kfac_ablation.html",
        "lds_measurements.html",
        "measurement_substitution.html",
    ):
        r = by_name[name]
        assert r["iframe"] and r["rows"] >= 3 and r["caption"] > 100, r
