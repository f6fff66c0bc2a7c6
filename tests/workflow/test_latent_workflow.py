"""The latent family (configs/latent.yaml) end to end through Snakemake, on a tiny overlay, in a scratch copy: the DAG
pretrains the miniature base pipeline, encodes the pool, fine-tunes LoRAs, and every configured scorer reaches the
LDS and counterfactual tables."""

import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from workflow_runs import IGNORE, overlay_run, snakemake

# configs/latent.yaml shrunk to seconds per job: 4 subsets x 2 seeds, 4 queries per set, a few steps everywhere
TINY = {
    "benchmark": "latent-tiny",
    "data": {"n_train": 40, "n_heldout": 4},
    "lds": {"n_subsets": 4, "n_tuning": 2, "n_seeds": 2, "bootstrap_samples": 50},
    "base": {"vae_steps": 60, "unet_steps": 80},
    "train": {"steps": 20, "batch_size": 16, "checkpoint_every": 10, "resume_every": 10},
    "sample": {"n_generated": 4, "num_inference_steps": 5},
    "measure": {"n_timesteps": 10, "n_noise": 1, "batch_size": 10},
    "gradients": {"timesteps": 2, "projection_dim": 64, "batch_size": 8, "timestep_chunk": 100},
    "kfac": {"draws": 4, "gradient_draws": 4, "batch_size": 64, "lambda_grid": [1.0e-4, 1.0e-2]},
    # configs/latent.yaml leaves the ensembles out for time: one runs here, on a second LoRA fine-tune
    "scores": {
        "lambda_grid": [0.01, 1.0],
        "methods": {"trak_ens2": {"family": "trak", "output_function": "loss", "ensemble": 2}},
    },
    "counterfactual": {"queries": 2, "methods": ["trak"], "k": 0.1, "bootstrap_samples": 50},
    "figures": {"queries": [0], "methods": ["trak", "das_vector"], "n_influencers": 3},
    # every seed of a subset trained and measured in one job (rules train_subset_seeds, measure): run for real here
    "jobs": {"train": "subset", "measure": "subset"},
}


@pytest.fixture(scope="module")
def latent_run(repo, tmp_path_factory):
    return overlay_run(repo, tmp_path_factory.mktemp("latent") / "repo", "configs/latent.yaml", TINY)


@pytest.mark.slow
def test_every_latent_scorer_reaches_the_lds_table(latent_run, repo):
    lds = pd.read_csv(latent_run / "tables" / "lds.csv")
    config = yaml.safe_load((repo / "params.yaml").read_text())
    overlay = yaml.safe_load((repo / "configs" / "latent.yaml").read_text())
    removed = {m for m, v in overlay["scores"]["methods"].items() if v is None}
    added = {m for m, v in overlay["scores"]["methods"].items() if v is not None}
    expected = (set(config["scores"]["methods"]) - removed) | added
    rows = lds[lds["method"].isin(expected)]
    assert set(rows["method"]) == expected, sorted(expected - set(rows["method"]))
    assert set(rows["query_set"]) == {"generated", "heldout"}
    # a number for every method and query set, except a method that says why it did not run (CLIP: no weights here)
    not_run = rows["note"].fillna("").str.startswith("not run")
    assert np.isfinite(rows.loc[~not_run, "lds"].to_numpy(float)).all(), rows.loc[~not_run, ["method", "lds"]]
    assert set(rows.loc[not_run, "method"]) <= {"clip_dot", "clip_cosine"}
    ceiling = lds[lds["method"].str.startswith("noise ceiling")]
    assert len(ceiling) == 2 and np.isfinite(ceiling["lds"]).all()


@pytest.mark.slow
def test_an_ensemble_averages_two_lora_fine_tunes(latent_run):
    import torch

    full = torch.load(latent_run / "models" / "full" / "model.pt", weights_only=False)
    member = torch.load(latent_run / "models" / "ensemble" / "member1" / "model.pt", weights_only=False)
    # another seed: other LoRA weights, on the same base
    assert full["state_dict"].keys() == member["state_dict"].keys()
    assert any(not torch.equal(full["state_dict"][k], member["state_dict"][k]) for k in full["state_dict"])
    assert (latent_run / "gradients" / "member1").is_dir()
    lds = pd.read_csv(latent_run / "tables" / "lds.csv")
    rows = lds[lds["method"] == "trak_ens2"]
    assert set(rows["query_set"]) == {"generated", "heldout"} and np.isfinite(rows["lds"]).all()
    # the mean of two models' scores is not the full model's alone
    ens = np.load(latent_run / "scores" / "trak_ens2" / "generated.npy")
    one = np.load(latent_run / "scores" / "trak" / "generated.npy")
    assert ens.shape == one.shape and not np.allclose(ens, one)


@pytest.mark.slow
def test_the_pipeline_is_a_diffusers_directory_and_the_inputs_are_latents(latent_run):
    base = latent_run / "base_pipeline"
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (base / part).exists(), part
    with np.load(latent_run / "data" / "latents.npz") as latents:
        assert latents["train_images"].shape == (40, 4, 8, 8)  # 16x16 digits -> 4 x 8 x 8 latents
        assert list(latents["captions"])[3] == "a three digit"
    with np.load(latent_run / "samples" / "generated.npz") as samples:
        assert samples["images"].shape == (4, 4, 8, 8) and samples["decoded"].shape == (4, 1, 16, 16)
        assert list(samples["prompts"]) == ["a zero digit", "a one digit", "a two digit", "a three digit"]


@pytest.mark.slow
def test_the_lds_retrainings_were_trained_and_measured_one_job_per_subset(latent_run):
    for j in range(TINY["lds"]["n_subsets"]):
        assert (latent_run / "logs" / "train" / "models" / f"subset{j:03d}.log").is_file(), j
        assert (latent_run / "logs" / "measure" / f"subset{j:03d}.log").is_file(), j
        for s in range(TINY["lds"]["n_seeds"]):
            assert (latent_run / "measurements" / f"subset{j:03d}_seed{s}.npz").is_file(), (j, s)
    assert not (latent_run / "logs" / "train" / "models" / "subset000_seed0.log").exists()  # not one job per model


@pytest.mark.slow
def test_counterfactual_table_has_the_method_and_the_random_baseline(latent_run):
    table = (latent_run / "tables" / "counterfactual.md").read_text()
    assert "trak" in table and "random" in table


def test_a_refused_measurement_is_named_with_its_reason(repo, tmp_path):
    workdir = tmp_path / "repo"
    shutil.copytree(repo, workdir, ignore=IGNORE)
    (workdir / "bad.yaml").write_text(yaml.safe_dump({"measure": {"measurements": ["loss", "elbo"]}}))
    result = snakemake(workdir, "--configfile", "configs/latent.yaml", "bad.yaml", "-n")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "measure.measurements" in out and "'elbo' needs model.family" in out and "model.family is latent" in out
