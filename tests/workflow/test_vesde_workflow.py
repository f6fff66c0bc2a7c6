"""The VE-SDE workflow (configs/vesde.yaml) end to end through Snakemake, on a tiny overlay, in a scratch copy."""

import math
import shutil

import numpy as np
import pandas as pd
import pytest
from workflow_runs import IGNORE, overlay_run, snakemake

# configs/vesde.yaml shrunk to seconds per job: 4 subsets x 1 seed, 3 queries per set, a few steps everywhere, two
# scorers (pixel, the classifier's embedding) and one counterfactual query (embedding_cosine + random)
TINY = {
    "benchmark": "vesde-tiny",
    "data": {"n_train": 40, "n_heldout": 3},
    "lds": {"n_subsets": 4, "n_tuning": 2, "n_seeds": 1, "bootstrap_samples": 20},
    "model": {"block_out_channels": [8, 16], "attention": [False, True], "norm_num_groups": 4, "attention_head_dim": 4},
    "train": {"steps": 10, "batch_size": 16, "checkpoint_every": 10, "resume_every": 10},
    "sample": {"n_generated": 3, "num_inference_steps": 3},
    "measure": {"likelihood": {"solver": "euler", "n_steps": 2, "batch_size": 8}},
    "classifier": {"steps": 20, "channels": [8, 16], "feature_dim": 16},
    "scores": {
        "methods": {
            "pixel_dot": None,
            "clip_dot": None,
            "clip_cosine": None,
            "embedding_dot": None,
            "nda": None,
            "nda_multiscale": None,
        }
    },
    "counterfactual": {"queries": 1, "bootstrap_samples": 20},
    "figures": {"queries": [0], "n_influencers": 2},
}


@pytest.fixture(scope="module")
def vesde_run(repo, tmp_path_factory):
    return overlay_run(repo, tmp_path_factory.mktemp("vesde") / "repo", "configs/vesde.yaml", TINY)


def test_vesde_overlay_plans_every_rule_it_needs(repo, tmp_path):
    workdir = tmp_path / "repo"
    shutil.copytree(repo, workdir, ignore=IGNORE)
    result = snakemake(workdir, "--configfile", "configs/vesde.yaml", "-n", "--quiet", "rules")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    for rule in (
        "train_full",
        "train_subset",
        "sample",
        "measure",
        "likelihood_sanity",
        "scores",
        "evaluate",
        "regenerate",
        "counterfactual_evaluate",
        "figures",
    ):
        assert rule in out, rule
    for rule in ("gradients", "curvature"):  # no DDPM gradient scorer is configured
        assert rule not in out, rule


@pytest.mark.slow  # the tiny VE-SDE workflow, run through Snakemake
def test_vesde_run_measures_bits_per_dim_and_ranks_methods(vesde_run):
    measurement = np.load(vesde_run / "measurements" / "subset000_seed0.npz")
    assert str(measurement["measurement"]) == "likelihood"
    assert np.isfinite(measurement["generated__likelihood"]).all() and measurement["heldout__likelihood"].shape == (3,)
    table = pd.read_csv(vesde_run / "tables" / "lds.csv")
    assert set(table["method"]) == {"pixel_cosine", "embedding_cosine"}
    assert table["lds"].map(math.isfinite).all() and table["lds"].between(-1, 1).all()
    counterfactual = pd.read_csv(vesde_run / "tables" / "counterfactual_per_query.csv")
    assert set(counterfactual["method"]) == {"embedding_cosine", "random"}


@pytest.mark.slow  # the tiny VE-SDE workflow, run through Snakemake
def test_vesde_run_writes_the_sanity_table_and_figure(vesde_run):
    from PIL import Image

    table = pd.read_csv(vesde_run / "tables" / "bpd_sanity.csv")
    assert list(table["category"]) == ["train", "heldout", "rotated", "averaged", "noise"]
    assert (table["n"] == 3).all() and table["mean_bpd"].map(math.isfinite).all()
    assert "Paper's ordering" in (vesde_run / "tables" / "bpd_sanity.md").read_text()
    image = Image.open(vesde_run / "figures" / "bpd_sanity.png")
    assert image.size[0] > 400 and len(set(image.convert("L").tobytes())) > 10
