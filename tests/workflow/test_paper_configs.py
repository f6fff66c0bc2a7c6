"""configs/{cifar2,cifar10,mnist,celeba}.yaml: each validates, plans with `snakemake -n` with the job counts its
protocol implies (64 subsets x 3 seeds, 60 counterfactual queries x (3 methods + random), ...), builds the reference
UNet, and (CIFAR-2, CelebA) its data rule runs through Snakemake on small files in torchvision's format."""

import re
import shutil

import numpy as np
import pytest
import yaml
from image_files import write_celeba
from torchvision_files import write_cifar10
from workflow_runs import IGNORE, snakemake

from workflow_scripts.dag.config import load_config

CONFIGS = ["cifar2", "cifar10", "mnist", "celeba"]


def job_counts(output: str) -> dict[str, int]:
    stats = output.split("Job stats:", 1)[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}


def assert_scores_jobs(counts: dict[str, int], config: dict) -> None:
    """One scores job per method, except the kfac methods: one job for all of them (rule scores_kfac_family)."""
    kfac = [m for m, c in config["scores"]["methods"].items() if c["family"] == "kfac"]
    assert kfac  # the K-FAC ablation of params.yaml (without the likelihood query measurements on the latent family)
    assert counts["scores"] == len(config["scores"]["methods"]) - len(kfac)
    assert counts["scores_kfac_family"] == 1


@pytest.fixture(scope="module")
def workdir(repo, tmp_path_factory):
    path = tmp_path_factory.mktemp("paper") / "repo"
    shutil.copytree(repo, path, ignore=IGNORE)
    return path


@pytest.mark.parametrize("name", CONFIGS)
def test_dry_run_plans_the_protocol(workdir, repo, name):
    config = load_config(repo / "params.yaml", repo / "configs" / f"{name}.yaml")
    lds, cf = config["lds"], config["counterfactual"]
    assert (lds["n_subsets"], lds["n_seeds"]) == (64, 3) and config["sample"] == {
        "n_generated": 1000,
        "scheduler": "ddim",
        "num_inference_steps": 50,
    }
    result = snakemake(workdir, "--configfile", f"configs/{name}.yaml", "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout)
    retrainings, counterfactuals = 64 * 3, cf["queries"] * (len(cf["methods"]) + 1)
    # the metagradient's fixed-seed ground truth: every evaluation subset and the leave-1%-out sets
    fixed_seed = lds["n_subsets"] - lds["n_tuning"] + config["fixed_seed"]["loo_sets"]
    assert counts["train_full"] == 1
    assert counts["train_member"] == 3  # params.yaml's ensembles of 4 models: three more full models
    assert counts["train_subset"] == retrainings + counterfactuals + fixed_seed
    assert retrainings + counterfactuals == 192 + 60 * 4
    assert counts["measure_fixed_seed"] == fixed_seed + 1  # + the full model
    assert counts["measure"] == retrainings
    assert counts["counterfactual"] == counts["regenerate"] == counterfactuals
    assert_scores_jobs(counts, config)
    assert counts["sample"] == counts["data"] == counts["evaluate"] == 1


def test_reference_unet_layout(repo):
    """The google/ddpm-cifar10-32 layout: 35,746,307 parameters as published; with docs/methods.md's scale_shift
    time conditioning 38,306,691 (~38M)."""
    from workflow_scripts.families.ddpm import build_model

    model_cfg = load_config(repo / "params.yaml", repo / "configs" / "cifar2.yaml")["model"]
    count = lambda cfg: sum(p.numel() for p in build_model(cfg, (3, 32, 32)).parameters())  # noqa: E731
    assert count(model_cfg) == 38_306_691
    assert count({**model_cfg, "resnet_time_scale_shift": "default"}) == 35_746_307
    down = [type(b).__name__ for b in build_model(model_cfg, (3, 32, 32)).down_blocks]
    assert down == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]


def test_celeba_unet_layout(repo):
    """The published CelebA UNet (the D-TRAK / DAS code's config.json with scale_shift time conditioning): 118,793,987
    parameters (~118.8M), attention at the fifth of six levels. Built on the meta device (no weights allocated)."""
    import torch

    from workflow_scripts.families.ddpm import build_model

    config = load_config(repo / "params.yaml", repo / "configs" / "celeba.yaml")
    with torch.device("meta"):
        model = build_model(config["model"], (3, 64, 64))
    assert sum(p.numel() for p in model.parameters()) == 118_793_987
    down = [type(b).__name__ for b in model.down_blocks]
    assert down == ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"]
    assert config["train"]["steps"] == 200 * (5000 // 128) and config["train"]["batch_size"] == 128


def test_celeba_data_rule_runs_on_files_in_torchvision_format(workdir, tmp_path):
    """The real data job of configs/celeba.yaml (scaled down by an overlay) through Snakemake, on 178x218 JPEGs and
    list_eval_partition.txt in torchvision's celeba/ layout."""
    root = tmp_path / "torchvision"
    partitions = [0] * 12 + [1] * 6 + [2] * 2
    write_celeba(root, partitions)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"root": str(root), "n_train": 10, "n_heldout": 4}}))
    result = snakemake(
        workdir, "--cores", "1", "--configfile", "configs/celeba.yaml", str(overlay), "--until", "data", cores=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(workdir / "results/celeba/data/dataset.npz") as f:
        assert f["train_images"].shape == (10, 3, 64, 64) and f["heldout_images"].shape == (4, 3, 64, 64)
        assert set(np.array(partitions)[f["train_index"]]) == {0} and set(np.array(partitions)[f["heldout_index"]]) == {
            1
        }
        assert "captions" not in f.files and not f["train_labels"].any()


def test_cifar2_data_rule_runs_on_files_in_torchvision_format(workdir, tmp_path, monkeypatch):
    """The real data job of configs/cifar2.yaml (scaled down by an overlay) through Snakemake. torchvision checks
    the md5 of the official CIFAR files, so the job runs in a subprocess that accepts the small files' md5s."""
    root = tmp_path / "torchvision"
    written = write_cifar10(root, per_batch=40, n_test=40)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"root": str(root), "n_train": 20, "n_heldout": 6}}))
    # a sitecustomize on PYTHONPATH patches the expected md5s inside the job's interpreter only
    patch = tmp_path / "patch"
    patch.mkdir()
    md5s = {
        p.name: __import__("hashlib").md5(p.read_bytes()).hexdigest() for p in (root / "cifar-10-batches-py").iterdir()
    }
    (patch / "sitecustomize.py").write_text(
        "from torchvision.datasets import CIFAR10\n"
        f"m = {md5s!r}\n"
        "CIFAR10.train_list = [[n, m[n]] for n, _ in CIFAR10.train_list]\n"
        "CIFAR10.test_list = [[n, m[n]] for n, _ in CIFAR10.test_list]\n"
        "CIFAR10.meta = {**CIFAR10.meta, 'md5': m['batches.meta']}\n"
    )
    result = snakemake(
        workdir,
        "--cores",
        "1",
        "--configfile",
        "configs/cifar2.yaml",
        str(overlay),
        "--until",
        "data",
        cores=False,
        env={"PYTHONPATH": str(patch)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(workdir / "results/cifar2/data/dataset.npz") as f:
        assert f["train_images"].shape == (20, 3, 32, 32) and f["heldout_images"].shape == (6, 3, 32, 32)
        assert np.bincount(f["train_labels"]).tolist() == [10, 10]
        assert set(written["train_labels"][f["train_index"]]) <= {1, 7}


@pytest.mark.parametrize("name, n_train", [("artbench2", 5000), ("artbench5", 12500)])
def test_artbench_overlays_plan_the_latent_protocol(workdir, repo, name, n_train):
    """configs/artbench{2,5}.yaml: LoRA fine-tunes of a local miniSD directory (not needed to plan: the encode job
    is the first to read it), 64 subsets x 3 seeds, 60 counterfactual queries x (3 methods + random), no base rule."""
    config = load_config(repo / "params.yaml", repo / "configs" / f"{name}.yaml")
    lds, cf = config["lds"], config["counterfactual"]
    assert config["model"]["family"] == "latent" and config["model"]["lora"]["rank"] == 128
    assert config["data"]["n_train"] == n_train and config["sample"]["guidance_scale"] == 7.5
    assert config["train"]["steps"] == 100 * (n_train // 64)  # 100 epochs at batch 64
    result = snakemake(workdir, "--configfile", f"configs/{name}.yaml", "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout)
    retrainings, counterfactuals = lds["n_subsets"] * lds["n_seeds"], cf["queries"] * (len(cf["methods"]) + 1)
    assert retrainings + counterfactuals == 192 + 60 * 4
    assert counts["train_full"] == counts["encode"] == counts["sample"] == 1
    assert "base_pipeline" not in counts  # model.pipeline names the base: nothing pretrains one
    assert counts["train_member"] == 3  # params.yaml's ensembles of 4 models: three more LoRA fine-tunes
    assert counts["train_subset"] == retrainings + counterfactuals
    assert counts["measure"] == retrainings
    assert_scores_jobs(counts, config)
