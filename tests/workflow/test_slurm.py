"""The smoke workflow through `snakemake --profile profiles/slurm` on a real one-node Slurm cluster.

scripts/slurm-localhost installs Debian's slurm-wlm + munge and starts slurmctld and slurmd on this
machine (root only; .ci/run calls it before `make test`). The profile runs unchanged, with README's
site settings pointed at this cluster: the GPU rules ask for `--gpus=slot:1` (TDA_GPU_MODEL), which the
node's GPU slots (gres without devices) grant, so the jobs run on the CPU; job status comes from squeue
(no accounting database); TDA_MAX_MEM_MB caps the profile's CIFAR-sized memory requests at the node's
memory. The tables must equal the local run's (conftest's smoke_run), the retrainings must arrive as
group jobs, and the DVC commands of README's cluster section must carry the cluster's results to a
fresh clone with nothing left to rerun.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from workflow_runs import BIN, copy_repo, snakemake

REPO = next(p for p in Path(__file__).resolve().parents if (p / "Snakefile").is_file())
MARKER = "# written by scripts/slurm-localhost"
# the first status check 10 s after a submission instead of the plugin's 40 s (jobs here take seconds)
FAST_POLLING = ("--slurm-init-seconds-before-status-checks", "10")


def ours() -> bool:
    conf = Path("/etc/slurm/slurm.conf")
    return conf.is_file() and MARKER in conf.read_text().splitlines()


def node_idle() -> bool:
    state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True)
    return state.returncode == 0 and state.stdout.strip().startswith(("idle", "mix", "alloc"))


@pytest.fixture(scope="session")  # session: set up before the (session) local smoke run, so a skip costs nothing
def cluster() -> dict:
    """Start (or reuse) scripts/slurm-localhost's cluster; the profile's environment variables for it."""
    if os.geteuid() == 0:
        started = subprocess.run([str(REPO / "scripts/slurm-localhost")], capture_output=True, text=True)
        assert started.returncode == 0, f"scripts/slurm-localhost failed:\n{started.stdout}{started.stderr}"
    elif not (shutil.which("sinfo") and ours() and node_idle()):
        reason = (
            "no Slurm cluster: tests/workflow/test_slurm.py needs root to start one (scripts/slurm-localhost), "
            "or start it first with `sudo scripts/slurm-localhost`"
        )
        print(reason)
        pytest.skip(reason)
    assert ours(), "/etc/slurm/slurm.conf is not scripts/slurm-localhost's: not submitting to that cluster"
    node = subprocess.run(["sinfo", "-h", "-N", "-o", "%R %m %G"], capture_output=True, text=True, check=True)
    partition, memory, gres = node.stdout.split()[:3]  # e.g. "debug 24105 gpu:slot:2"
    # README's site settings, with this cluster's names; the memory cap: the profile asks up to 32 GB
    return {
        "TDA_CPU_PARTITION": partition,
        "TDA_GPU_PARTITION": partition,
        "TDA_GPU_MODEL": gres.split(":")[1],
        "TDA_MAX_MEM_MB": memory,
    }


def run(args: list[str], cwd: Path) -> str:
    """A DVC / git / script command of README's cluster section; its output, or an error with it."""
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(cwd.parent),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{' '.join(args)} failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """README's `snakemake --profile profiles/slurm` with the smoke overlay merged into params.yaml (as DVC needs)."""
    from workflow_scripts.dag.config import deep_merge

    workdir = copy_repo(REPO, tmp_path_factory.mktemp("slurm") / "repo")
    params = deep_merge(
        yaml.safe_load((REPO / "params.yaml").read_text()), yaml.safe_load((REPO / "configs/smoke.yaml").read_text())
    )
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.monotonic()
    log = workdir.parent / "slurm-run.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                str(BIN / "snakemake"),
                "--profile",
                "profiles/slurm",
                *FAST_POLLING,
                "--slurm-keep-successful-logs",
                "--verbose",
            ],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(workdir), **cluster},
        )
        while process.poll() is None and time.monotonic() - started < 3600:
            time.sleep(5)
            # Plugin 2.8.0 reads MinJobAge with `scontrol show config` before every status query; if that
            # fails once it queries sacct, which fails without an accounting database, and then drops the
            # running jobs from its watch list: Snakemake would wait forever. Stop and say so.
            if "(final attempt)" in log.read_text():
                process.send_signal(signal.SIGINT)
                process.wait(120)
                pytest.fail(f"the slurm plugin lost track of its jobs after a failed status query (see {log})")
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(120)
    seconds = time.monotonic() - started
    text = log.read_text()
    assert process.returncode == 0, text[-8000:]
    print(f"slurm smoke run: {seconds:.0f} s wall")
    return workdir, text


@pytest.fixture(scope="module")
def dvc_round_trip(slurm_run):
    """README: record the cluster's results with DVC, push, clone elsewhere, scripts/dvc-pull."""
    workdir, _ = slurm_run
    remote, clone = workdir.parent / "remote", workdir.parent / "clone"
    # the scratch copy as a checkout of this repository: git, with .dvc/ (copy_repo leaves both out)
    run(["git", "init", "-q"], workdir)
    run(["dvc", "init", "-q"], workdir)
    run(["git", "add", "-A"], workdir)
    run(["git", "commit", "-qm", "workflow"], workdir)
    # README's commands
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], workdir)
    run(["dvc", "commit", "-f"], workdir)
    run(["git", "add", "dvc.lock", ".dvc/config"], workdir)
    run(["git", "commit", "-qm", "results"], workdir)
    run(["dvc", "push"], workdir)
    run(["git", "clone", "-q", str(workdir), str(clone)], workdir.parent)
    run([str(clone / "scripts/dvc-pull")], clone)
    return workdir, clone


@pytest.mark.slow
def test_smoke_workflow_on_slurm_gives_the_local_tables(cluster, slurm_run, smoke_run):
    workdir, _ = slurm_run
    for table in ("lds.csv", "lds.md", "counterfactual.csv", "kfac_ablation.csv"):
        ours_, local = workdir / "results/smoke/tables" / table, smoke_run / "results/smoke/tables" / table
        assert ours_.read_bytes() == local.read_bytes(), table


@pytest.mark.slow
def test_jobs_ran_as_slurm_jobs_with_squeue_status(slurm_run):
    workdir, log = slurm_run
    calls = re.findall(r"sbatch call: (sbatch .*)", log)
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", log)
    assert calls and len(submitted) == len(calls), log[-3000:]
    assert "command=squeue" in log and "command=sacct" not in log  # the plugin's status-query timing lines
    assert len(list((workdir / ".snakemake/slurm_logs").rglob("*.log"))) == len(submitted)  # one log per sbatch job
    gpu_calls = [c for c in calls if "--gpus=slot:1" in c]  # TDA_GPU_MODEL=slot
    assert all(" -p debug" in c for c in calls)  # TDA_CPU_PARTITION / TDA_GPU_PARTITION
    assert any("rule_train_full" in c for c in gpu_calls) and any("rule_gradients" in c for c in gpu_calls)


@pytest.mark.slow
def test_retrainings_are_submitted_as_group_jobs(slurm_run, smoke_config):
    """12 LDS retrain + measure pairs in 3 sbatch jobs, 4 counterfactual retrain + regenerate pairs in 1."""
    workdir, log = slurm_run
    root = workdir / ".snakemake/slurm_logs"
    lds = smoke_config["lds"]["n_subsets"] * smoke_config["lds"]["n_seeds"]
    counterfactual = smoke_config["counterfactual"]["queries"] * (len(smoke_config["counterfactual"]["methods"]) + 1)
    # one log directory per group and rule set: group_retrain-models_measure_train_subset, ...
    assert len(list(root.glob("group_retrain-models_*/**/*.log"))) == -(-lds // 4)
    assert len(list(root.glob("group_retrain-counterfactual_*/**/*.log"))) == -(-counterfactual // 4)
    assert not (root / "rule_train_subset").exists() and not (root / "rule_measure").exists()
    group_calls = [c for c in re.findall(r"sbatch call: (sbatch .*)", log) if "group_retrain" in c]
    assert group_calls and all("--gpus=slot:1" in c for c in group_calls)  # one GPU per group job, members in turn


def test_slurm_profile_is_not_overridden_by_the_default_profile(tmp_path):
    """Snakemake applies profiles/default on top of --profile, key by key: the slurm keys must survive."""
    workdir = copy_repo(REPO, tmp_path / "repo")
    result = snakemake(workdir, "-n", "--profile", "profiles/slurm", "--configfile", "configs/smoke.yaml", cores=False)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "python -m workflow_scripts train" in out  # printshellcmds: true of profiles/slurm


@pytest.mark.slow
def test_cluster_results_reach_a_fresh_clone_through_dvc(dvc_round_trip):
    workdir, clone = dvc_round_trip
    assert "up to date" in run(["dvc", "status"], workdir)
    assert "Nothing to be done" in run(["snakemake", "-n"], clone)
    tables = sorted((workdir / "results/smoke/tables").iterdir())
    assert {t.suffix for t in tables} >= {".csv", ".md", ".json"}
    for table in tables:
        assert (clone / table.relative_to(workdir)).read_bytes() == table.read_bytes(), table.name
