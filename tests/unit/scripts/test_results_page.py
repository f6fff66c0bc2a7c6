"""scripts/results_page.py: the results page from the tables of a finished run.

A tiny fake run: CSVs in the column layout the workflow writes (rule evaluate: lds, kfac_ablation, lds_measurements,
measurement_substitution; metagradient_evaluate: metagradient; counterfactual_evaluate: counterfactual and its
per-query values; likelihood_sanity: bpd_sanity), with a known modification date.
"""

from __future__ import annotations

import calendar
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = next(p for p in Path(__file__).resolve().parents if (p / "Snakefile").is_file())
SCRIPT = REPO / "scripts" / "results_page.py"
NAN = math.nan
NOISE = "noise ceiling (seed-to-seed)"
DATE = (2026, 11, 24, 12, 0, 0)  # noon UTC: the same calendar day in every time zone the date is printed in (UTC)

# rule evaluate, lds_table(): noise-ceiling rows first, keys in the order the workflow's row dicts have them
LDS_COLUMNS = [
    "method",
    "query_set",
    "lambda",
    "lds",
    "se",
    "ci_low",
    "ci_high",
    "n_queries",
    "n_queries_total",
    "n_subsets",
    "lds_tuned_on_evaluation",
    "note",
    "scores_of",
]
LDS_ROWS = [
    [NOISE, "generated", NAN, 0.509, 0.034, 0.419, 0.549, 32, 32, 20, NAN, "two retrainings of the same subset", ""],
    ["trak", "generated", 1.0, 0.335, 0.041, 0.226, 0.407, 32, 32, 20, 0.351, "", "loss"],
    ["clip_dot", "generated", NAN, NAN, NAN, NAN, NAN, 0, 32, 20, NAN, "not run: no CLIP weights", ""],
    ["kfac", "generated", 1e-07, 0.474, 0.033, 0.378, 0.527, 32, 32, 20, 0.476, "", "loss"],
    [
        "metagradient",
        "generated",
        NAN,
        0.508,
        NAN,
        0.109,
        0.781,
        1,
        32,
        20,
        0.508,
        "LDS over 1 of 32 queries; metagradient cost",
        "loss",
    ],
    [NOISE, "heldout", NAN, 0.770, 0.025, 0.699, 0.789, 32, 32, 20, NAN, "two retrainings of the same subset", ""],
    ["trak", "heldout", 1.0, 0.605, 0.029, 0.526, 0.634, 32, 32, 20, 0.605, "", "loss"],
    ["clip_dot", "heldout", NAN, NAN, NAN, NAN, NAN, 0, 32, 20, NAN, "not run: no CLIP weights", ""],
    ["kfac", "heldout", 1e-07, 0.651, 0.031, 0.572, 0.680, 32, 32, 20, 0.651, "", "loss"],
    [
        "metagradient",
        "heldout",
        NAN,
        0.744,
        NAN,
        0.390,
        0.941,
        1,
        32,
        20,
        0.744,
        "LDS over 1 of 32 queries; metagradient cost",
        "loss",
    ],
]
# rule evaluate, kfac_ablation()
ABLATION_COLUMNS = [
    "method",
    "fisher_type",
    "kfac_approx",
    "ekfac",
    "quantization",
    "damping",
    "query_measurement",
    "query_set",
    "lds",
    "ci_low",
    "ci_high",
    "lambda",
    "lds_tuned_on_evaluation",
    "note",
]
ABLATION_ROWS = [
    [NOISE, "", "", "", "", "", "", "generated", 0.509, 0.419, 0.549, NAN, NAN, "two retrainings of the same subset"],
    ["trak", "", "", "", "", "", "", "generated", 0.335, 0.226, 0.407, 1.0, 0.351, ""],
    ["kfac", "mc", "expand", False, "int8", "relative", "loss", "generated", 0.474, 0.378, 0.527, 1e-07, 0.476, ""],
    ["ekfac", "mc", "expand", True, "int8", "relative", "loss", "generated", 0.467, 0.373, 0.519, 1e-07, 0.467, ""],
]
# rule evaluate, measurement_table(): lds_table with a leading measurement column
MEASUREMENT_ROWS = [
    ["loss", *LDS_ROWS[0]],
    ["loss", *LDS_ROWS[1]],
    ["loss", *LDS_ROWS[5]],
    ["loss", *LDS_ROWS[6]],
    [
        "elbo",
        NOISE,
        "generated",
        NAN,
        0.287,
        0.03,
        0.202,
        0.349,
        32,
        32,
        20,
        NAN,
        "two retrainings of the same subset",
        "",
    ],
    ["elbo", "trak", "generated", 1.0, 0.216, 0.04, 0.094, 0.308, 32, 32, 20, NAN, "", "loss"],
]
# rule evaluate, measurement_substitution()
SUBSTITUTION_COLUMNS = [
    "measurement",
    "query_set",
    "method",
    "query_measurement",
    "scores_of",
    "matched",
    "lds",
    "se",
    "ci_low",
    "ci_high",
    "lambda",
    "note",
]
SUBSTITUTION_ROWS = [
    ["loss", "generated", NOISE, "", "", False, 0.509, 0.034, 0.419, 0.549, NAN, "two retrainings of the same subset"],
    ["loss", "generated", "kfac", "loss", "loss", True, 0.474, 0.033, 0.378, 0.527, 1e-07, ""],
    ["loss", "generated", "kfac_elbo", "elbo", "elbo", False, 0.308, 0.038, 0.222, 0.360, 0.001, ""],
    ["elbo", "generated", NOISE, "", "", False, 0.287, 0.03, 0.202, 0.349, NAN, "two retrainings of the same subset"],
    ["elbo", "generated", "kfac", "loss", "loss", False, 0.247, 0.03, 0.167, 0.305, 1e-07, ""],
    ["elbo", "generated", "kfac_elbo", "elbo", "elbo", True, 0.273, 0.03, 0.199, 0.323, 0.001, ""],
]
# rule metagradient_evaluate, method_rows()
METAGRADIENT_COLUMNS = [
    "method",
    "query_set",
    "target",
    "value",
    "se",
    "ci_low",
    "ci_high",
    "n_queries",
    "n_queries_total",
    "n_sets",
    "note",
]
METAGRADIENT_ROWS = [
    ["metagradient", "generated", "LDS, fixed-seed target", 0.623, NAN, 0.253, 0.859, 1, 32, 20, ""],
    [
        "metagradient",
        "generated",
        "leave-out Spearman (predicted vs actual change)",
        0.714,
        NAN,
        -0.205,
        1.0,
        1,
        32,
        8,
        "3 of 300 examples removed per set; median |predicted| / |actual| change 1.37",
    ],
]
# rule counterfactual_evaluate: summary_table() + k, n_train, embedding
COUNTERFACTUAL_COLUMNS = [
    "method",
    "metric",
    "median",
    "mean",
    "ci_low",
    "ci_high",
    "n_queries",
    "k",
    "n_train",
    "embedding",
]
COUNTERFACTUAL_ROWS = [
    ["das_vector", "pixel_l2", 1.969, 1.949, 1.475, 2.383, 4, 30, 300, "classifier features"],
    ["das_vector", "embedding_cosine", 0.9477, 0.9548, 0.9332, 0.9908, 4, 30, 300, "classifier features"],
    ["das_vector", "loss_change", 0.01031, 0.009626, 0.007472, 0.01041, 4, 30, 300, "classifier features"],
    ["random", "pixel_l2", 0.7582, 0.9197, 0.7126, 1.45, 4, 30, 300, "classifier features"],
    ["random", "embedding_cosine", 0.9961, 0.995, 0.9886, 0.9993, 4, 30, 300, "classifier features"],
    ["random", "loss_change", 0.0003278, 0.0009602, -0.0007951, 0.00398, 4, 30, 300, "classifier features"],
]
PER_QUERY_COLUMNS = [
    "method",
    "query",
    "loss_full",
    "loss_counterfactual",
    "pixel_l2",
    "embedding_cosine",
    "loss_change",
]
# rule likelihood_sanity, summary_table()
BPD_COLUMNS = ["category", "n", "mean_bpd", "se_bpd", "median_bpd", "min_bpd", "max_bpd"]
BPD_ROWS = [["train", 16, 1.915, 0.047, 1.944, 1.541, 2.144], ["noise", 16, 5.393, 0.035, 5.385, 5.068, 5.661]]


def fake_run(root: Path, tables: dict[str, pd.DataFrame]) -> Path:
    directory = root / "results" / "fake"
    (directory / "tables").mkdir(parents=True)
    stamp = calendar.timegm(DATE)
    for name, frame in tables.items():
        path = directory / "tables" / f"{name}.csv"
        path.write_text(frame.to_csv(index=False))  # as the workflow writes them (save_table / save_text)
        os.utime(path, (stamp, stamp))
    return directory


def all_tables() -> dict[str, pd.DataFrame]:
    return {
        "lds": pd.DataFrame(LDS_ROWS, columns=LDS_COLUMNS),
        "kfac_ablation": pd.DataFrame(ABLATION_ROWS, columns=ABLATION_COLUMNS),
        "lds_measurements": pd.DataFrame(MEASUREMENT_ROWS, columns=["measurement", *LDS_COLUMNS]),
        "measurement_substitution": pd.DataFrame(SUBSTITUTION_ROWS, columns=SUBSTITUTION_COLUMNS),
        "metagradient": pd.DataFrame(METAGRADIENT_ROWS, columns=METAGRADIENT_COLUMNS),
        "counterfactual": pd.DataFrame(COUNTERFACTUAL_ROWS, columns=COUNTERFACTUAL_COLUMNS),
        "counterfactual_per_query": pd.DataFrame([["random", 0, 0.1, 0.1, 0.5, 0.99, 0.0]], columns=PER_QUERY_COLUMNS),
        "bpd_sanity": pd.DataFrame(BPD_ROWS, columns=BPD_COLUMNS),
        "extra_table": pd.DataFrame([["a", 1.23456, ""]], columns=["name", "value", "empty"]),
    }


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True)


def repository_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("run")
    results = fake_run(root, all_tables())
    out = root / "docs" / "results.md"
    done = run_script("--results", str(results), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out.read_text()


def test_header_states_the_tables_date_and_the_commit(page):
    assert "files dated 2026-11-24 (UTC)" in page
    # the fake run is not in a git checkout: the commit is this repository's HEAD
    assert f"Commit: `{repository_commit()}`" in page
    assert "python scripts/results_page.py" in page


def test_lds_rows_in_the_workflow_layout(page):
    assert (
        "| method | query set | LDS (evaluation subsets) | SE | 95% bootstrap CI | lambda (tuned) | "
        "LDS tuned on evaluation* | note |"
    ) in page
    assert (
        "| noise ceiling (seed-to-seed) | generated | 0.509 | 0.034 | [0.419, 0.549] | - | - | two retrainings of the same subset |"
        in page
    )
    assert "| trak | generated | 0.335 | 0.041 | [0.226, 0.407] | 1 | 0.351 |  |" in page
    assert "| kfac | heldout | 0.651 | 0.031 | [0.572, 0.680] | 1e-07 | 0.651 |  |" in page
    assert "| clip_dot | generated | not run: no CLIP weights | | | | | |" in page
    assert (
        "| metagradient | generated | 0.508 | - | [0.109, 0.781] | - | 0.508 | LDS over 1 of 32 queries; metagradient cost |"
        in page
    )


def test_counterfactual_rows_in_the_workflow_layout(page):
    assert (
        "| method | pixel L2 (higher = removal mattered more) | embedding cosine (lower = removal mattered more) | "
        "loss change (higher = removal mattered more) |"
    ) in page
    assert (
        "| das_vector | 1.969 (mean 1.949) [1.475, 2.383] | 0.9477 (mean 0.9548) [0.9332, 0.9908] | "
        "0.01031 (mean 0.009626) [0.007472, 0.01041] |"
    ) in page
    assert (
        "| random | 0.7582 (mean 0.9197) [0.7126, 1.45] | 0.9961 (mean 0.995) [0.9886, 0.9993] | "
        "0.0003278 (mean 0.0009602) [-0.0007951, 0.00398] |"
    ) in page
    assert "Median over 4 generated queries" in page and "k = 30 of 300 training examples" in page
    assert "Not shown: `tables/counterfactual_per_query.csv`" in page


def test_the_other_tables(page):
    assert "| kfac | mc | expand | no | int8 | relative | generated | 0.474 | [0.378, 0.527] | 1e-07 | loss |" in page
    assert "| ekfac | mc | expand | yes | int8 | relative | generated | 0.467 | [0.373, 0.519] | 1e-07 | loss |" in page
    assert "| method | loss generated | loss heldout | elbo generated |" in page
    assert "| trak | 0.335 | 0.605 | 0.216 |" in page
    assert "| elbo | generated | 0.287 [0.202, 0.349] | 0.247 [0.167, 0.305] | **0.273 [0.199, 0.323]** |" in page
    assert (
        "| metagradient | generated | leave-out Spearman (predicted vs actual change) | 0.714 | - | [-0.205, 1.000] | "
        "1 of 32 | 8 | 3 of 300 examples removed per set; median \\|predicted\\| / \\|actual\\| change 1.37 |"
    ) in page
    assert "| noise | 16 | 5.393 (0.035) | 5.385 | 5.068 | 5.661 |" in page
    assert "| name | value | empty |" in page and "| a | 1.235 |  |" in page


def test_tables_in_page_order(page):
    order = [
        "## LDS of every method",
        "## K-FAC influence ablation",
        "## LDS per measurement target",
        "## Measurement substitution",
        "## Metagradient",
        "## Counterfactual retraining",
        "## Bits/dim sanity",
        "## extra_table",
    ]
    positions = [page.index(title) for title in order]
    assert positions == sorted(positions)


def test_commit_can_be_given_and_a_subset_of_tables_suffices(tmp_path):
    tables = all_tables()
    results = fake_run(tmp_path, {"lds": tables["lds"], "counterfactual": tables["counterfactual"]})
    out = tmp_path / "results.md"
    done = run_script("--results", str(results), "--out", str(out), "--commit", "5d53d2a", "--note", "A note.")
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "Commit: `5d53d2a`" in text and "A note." in text
    assert "## LDS of every method" in text and "## Counterfactual retraining" in text
    assert "K-FAC" not in text


def test_no_tables_is_an_error(tmp_path):
    (tmp_path / "results" / "empty" / "tables").mkdir(parents=True)
    done = run_script("--results", str(tmp_path / "results" / "empty"), "--out", str(tmp_path / "page.md"))
    assert done.returncode != 0
    assert "no tables" in done.stderr
    assert not (tmp_path / "page.md").exists()


def test_committed_page_is_in_the_generated_layout():
    text = (REPO / "docs" / "results.md").read_text()
    assert "python scripts/results_page.py" in text
    assert "files dated 2026-12-07 (UTC)" in text and "Commit: `9a58f19`" in text
    assert (
        "Default benchmark wall time: 80.7 min (from scratch at commit b8b2119" in text
    )  # the measured wall-time line
    assert "| das_vector | generated | 0.559 | 0.035 | [0.478, 0.587] | 0.1 | 0.559 |  |" in text


def test_an_empty_table_of_a_run_without_its_method_is_named(tmp_path):
    # the workflow writes an empty metagradient.csv when the run has no metagradient method (configs/latent.yaml)
    tables = all_tables()
    results = fake_run(tmp_path, {"lds": tables["lds"]})
    (results / "tables" / "metagradient.csv").write_text("\n")
    out = tmp_path / "page.md"
    done = run_script("--results", str(results), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "`tables/metagradient.csv`: no rows in this run." in out.read_text()
