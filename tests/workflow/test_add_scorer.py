"""A new store-based scorer is one module plus a params entry: the worked example of docs/adding-a-scorer.md, copied
from the doc into a scratch copy of the finished smoke run, runs through the smoke DAG to the LDS table."""

import re
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from workflow_runs import snakemake

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def added_scorer(smoke_run, repo, tmp_path_factory):
    doc = (repo / "docs" / "adding-a-scorer.md").read_text()
    module = re.search(r"`workflow_scripts/scorers/feature_distance.py`:\n\n```python\n(.*?)```", doc, re.S).group(1)
    entry = yaml.safe_load(re.search(r"```yaml\n(.*?)```", doc, re.S).group(1))
    work = tmp_path_factory.mktemp("added") / "repo"
    shutil.copytree(smoke_run, work, symlinks=True, ignore=shutil.ignore_patterns("locks", "incomplete"))
    (work / "workflow_scripts" / "scorers" / "feature_distance.py").write_text(module)  # the one new module
    (work / "extra.yaml").write_text(yaml.safe_dump(entry))  # the params entry (an overlay here)
    return work


def test_the_new_scorer_runs_only_its_own_jobs(added_scorer):
    # the target first: --configfile takes every file name that follows it
    args = ("results/smoke/tables/lds.md", "--configfile", "configs/smoke.yaml", "extra.yaml")
    plan = snakemake(added_scorer, *args, "-n", "--quiet", "rules")
    out = plan.stdout + plan.stderr
    assert plan.returncode == 0, out
    assert "scores" in out and "evaluate" in out, out
    for rule in ("train_full", "train_subset", "measure", "gradients", "curvature"):  # the loss store is reused
        assert not re.search(rf"\b{rule}\b", out), out
    result = snakemake(added_scorer, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(added_scorer / "results/smoke/tables/lds.csv")
    rows = table[table["method"] == "feature_distance"]
    assert set(rows["query_set"]) == {"generated", "heldout"}
    assert rows["lds"].between(-1, 1).all() and np.isfinite(rows["lds"]).all()
    scores = np.load(added_scorer / "results/smoke/scores/feature_distance/generated.npy")
    assert scores.ndim == 2 and (scores <= 0).all()  # minus a distance


def test_a_bad_entry_of_the_new_scorer_is_refused_naming_the_field(added_scorer):
    (added_scorer / "bad.yaml").write_text(
        yaml.safe_dump(
            {"scores": {"methods": {"feature_distance": {"family": "feature_distance", "output_function": "nope"}}}}
        )
    )
    result = snakemake(added_scorer, "--configfile", "configs/smoke.yaml", "bad.yaml", "-n")
    assert result.returncode != 0
    assert "scores.methods.feature_distance" in result.stdout + result.stderr
