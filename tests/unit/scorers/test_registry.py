"""The scorer registry: every scorer family is a declaration the DAG derives its rules, inputs and checks from."""

import subprocess
import sys

import pytest

from workflow_scripts.dag import paths
from workflow_scripts.dag.config import ConfigError, full_schema, validate_config
from workflow_scripts.scorers import SCORERS, Scorer, get_scorer


def test_every_family_in_the_configurations_is_registered(base_config, smoke_config):
    for config in (base_config, smoke_config):
        for name, method in config["scores"]["methods"].items():
            assert isinstance(get_scorer(method["family"]), Scorer), name
    with pytest.raises(ValueError, match="unknown scorer family 'nope'"):
        get_scorer("nope")


def test_declarations_replace_the_lookup_tables():
    """What used to be hand-kept tables in dag/paths.py / config.py now follows from each scorer's declaration."""
    takers = {f for f, s in SCORERS.items() if s.takes_query_measurement}
    assert takers == {"kfac", "trak", "gradient_similarity", "normalized_if"}
    assert {f for f, s in SCORERS.items() if "vesde" in s.model_families} == {"pixel", "clip", "embedding", "nda"}
    assert {f for f, s in SCORERS.items() if s.chunk_jobs} == {"metagradient"}
    assert {f: s.model_inputs for f, s in SCORERS.items() if s.model_inputs} == {
        "embedding": ("classifier",),
        "kfac": ("model", "curvature"),
        "unlearning": ("model", "curvature"),
    }
    store_free = {
        f for f, s in SCORERS.items() if not s.stores({"family": f, "output_function": "loss", "form": "scalar"})
    }
    assert store_free == {"pixel", "clip", "embedding", "nda", "kfac", "metagradient", "unlearning"}


def test_method_schema_comes_from_the_scorer(smoke_config):
    forms = full_schema()["properties"]["scores"]["properties"]["methods"]["additionalProperties"]["oneOf"]
    assert len(forms) == sum(len(s.schemas) for s in SCORERS.values())
    bad = {
        **smoke_config,
        "scores": {
            **smoke_config["scores"],
            "methods": {"t": {"family": "trak", "output_function": "loss", "oops": 1}},
        },
    }
    with pytest.raises(ConfigError, match=r"scores\.methods\.t"):
        validate_config(bad)


def test_stores_follow_the_declarations(smoke_config):
    """A TracIn method reads one store per checkpoint, a DAS vector method a sketch store of the noise predictor,
    a trak query_measurement method the measurement store inside its loss store."""
    methods = smoke_config["scores"]["methods"]
    for name, method in methods.items():
        roles = set(paths.method_stores(smoke_config, name))
        if method["family"] == "tracin":
            assert roles == set(paths.checkpoint_names(smoke_config)), name
        elif method["family"] == "das" and method["form"] == "vector":
            stores = paths.method_stores(smoke_config, name)
            # one sketch store per model of the method's ensemble (the full model's: role final)
            assert sorted(stores) == ["final", *(f"member{k}" for k in range(1, method.get("ensemble", 1)))], name
            for role, (directory, kind) in stores.items():
                checkpoint = "full" if role == "final" else role
                assert kind == "sketch" and f"/gradients/{checkpoint}/eps_sketch" in directory, name
        elif method["family"] == "trak" and method.get("query_measurement", "loss") != "loss":
            stores = paths.method_stores(smoke_config, name)
            assert stores["query"][0] == f"{stores['final'][0]}/measurement_{method['query_measurement']}", name


def test_the_dag_layer_loads_no_torch(repo):
    """The Snakefile imports dag/ (and through it every scorer declaration) on every invocation: it stays light."""
    code = (
        "import sys; import workflow_scripts.dag.paths, workflow_scripts.dag.config; "
        "heavy = [m for m in ('torch', 'diffusers', 'workflow_scripts.engines', 'workflow_scripts.families') "
        "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert result.returncode == 0, result.stdout + result.stderr
