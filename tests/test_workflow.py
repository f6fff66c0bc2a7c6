"""The smoke workflow end to end, through Snakemake, in a scratch copy of the repository."""
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

IGNORE = shutil.ignore_patterns(".venv", "results", ".snakemake", ".git", ".dvc", "__pycache__", ".pytest_cache")


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("snakemake")
    return subprocess.run([str(exe), "--cores", "2", *args], cwd=workdir, capture_output=True, text=True,
                          env={"PATH": f"{exe.parent}:/usr/bin:/bin", "HOME": str(workdir)})


@pytest.fixture(scope="module")
def smoke_run(repo, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke") / "repo"
    shutil.copytree(repo, workdir, ignore=IGNORE)
    result = snakemake(workdir, "--configfile", "configs/smoke.yaml")
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir


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


def test_figure_is_a_nonempty_png(smoke_run):
    from PIL import Image

    image = Image.open(smoke_run / "results/smoke/figures/lds.png")
    assert image.size[0] > 200 and image.size[1] > 200
    assert len(set(image.convert("L").tobytes())) > 10  # not a blank canvas


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
    from workflow_scripts.diffusion import load_model

    _, payload = load_model(smoke_run / "results/smoke/models/full/model.pt", smoke_config["model"])
    assert payload["config"]["train"] == smoke_config["train"]
    assert payload["step"] == smoke_config["train"]["steps"]
    intermediate = sorted((smoke_run / "results/smoke/models/full/checkpoints").glob("step*.pt"))
    assert len(intermediate) == smoke_config["train"]["steps"] // smoke_config["train"]["checkpoint_every"]
