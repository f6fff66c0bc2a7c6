"""How work is packed into Snakemake jobs (params.yaml section jobs): the DAG's choice, never the results'."""

from __future__ import annotations

import re


def test_dry_run_trains_and_measures_every_seed_of_a_subset_in_one_job_when_asked(repo, tmp_path):
    """jobs.train / jobs.measure: subset plan one job per LDS subset, each naming every seed's model and file in the
    same order (the counterfactual retrainings stay one per job); the default plans one job per retraining."""
    from workflow_runs import copy_repo, snakemake

    workdir = copy_repo(repo, tmp_path / "repo")
    (workdir / "per_subset.yaml").write_text("jobs: {train: subset, measure: subset}\n")
    counts = {}
    for name, overlays in (("model", ()), ("subset", ("per_subset.yaml",))):
        result = snakemake(workdir, "-n", "-p", "--configfile", "configs/smoke.yaml", *overlays)
        out = result.stdout + result.stderr
        assert result.returncode == 0, out[-3000:]
        counts[name] = {
            rule: int(m.group(1)) if (m := re.search(rf"^{rule}\s+(\d+)$", out, re.M)) else 0
            for rule in ("measure", "train_subset", "train_subset_seeds")
        }
    from workflow_scripts.dag.config import load_config

    config = load_config(repo / "params.yaml", repo / "configs" / "smoke.yaml")
    lds = config["lds"]
    n_models = lds["n_subsets"] * lds["n_seeds"]
    n_other = counts["model"]["train_subset"] - n_models  # the counterfactual and fixed-seed retrainings
    assert n_other > 0 and counts["model"]["measure"] == n_models and counts["model"]["train_subset_seeds"] == 0
    packed = {"measure": lds["n_subsets"], "train_subset": n_other, "train_subset_seeds": lds["n_subsets"]}
    assert counts["subset"] == packed
    seeds = range(lds["n_seeds"])
    models = " ".join(f"results/smoke/models/subset001_seed{s}/model.pt" for s in seeds)
    files = " ".join(f"results/smoke/measurements/subset001_seed{s}.npz" for s in seeds)
    replicates = " ".join(str(s) for s in seeds)
    assert f"--model {models} " in out and f"--replicate {replicates} --out {files} " in out, out[-3000:]
    assert f"--subset 001 --replicate {replicates} --out {models} " in out, out[-3000:]
