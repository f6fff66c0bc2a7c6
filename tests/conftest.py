import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))  # the shared helpers beside this file (workflow_runs, fakes, ...)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def base_config():
    from workflow_scripts.dag.config import load_config

    return load_config(REPO / "params.yaml")


@pytest.fixture(scope="session")
def smoke_config():
    from workflow_scripts.dag.config import load_config

    return load_config(REPO / "params.yaml", REPO / "configs" / "smoke.yaml")


@pytest.fixture(scope="session")
def smoke_run(repo, tmp_path_factory):
    """The smoke workflow run locally (`snakemake --cores 2 --configfile configs/smoke.yaml`) in a scratch copy."""
    import time

    from workflow_runs import copy_repo, snakemake

    workdir = copy_repo(repo, tmp_path_factory.mktemp("smoke") / "repo")
    started = time.monotonic()
    result = snakemake(workdir, "--configfile", "configs/smoke.yaml")
    assert result.returncode == 0, result.stderr[-5000:]
    print(f"local smoke run: {time.monotonic() - started:.0f} s wall")
    return workdir
