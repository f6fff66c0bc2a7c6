import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def base_config():
    from workflow_scripts.config import load_config

    return load_config(REPO / "params.yaml")


@pytest.fixture(scope="session")
def smoke_config():
    from workflow_scripts.config import load_config

    return load_config(REPO / "params.yaml", REPO / "configs" / "smoke.yaml")
