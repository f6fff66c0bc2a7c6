"""Names shared by the DAG and the computation, light enough for the Snakefile to import: the query sets, the
measured targets and their defaults, the key of a target in a measurement file, the files of a gradient store,
and the hash of a configuration section.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import yaml

# measure.measurements each model family can compute (workflow_scripts/families/likelihood.py, vesde.py)
MEASUREMENTS_BY_FAMILY = {
    "ddpm": ("loss", "elbo", "timestep_loss", "trajectory"),
    "vesde": ("likelihood",),
    "latent": ("loss",),  # the loss in latent space conditioned on the query's caption
}


DEFAULT_MEASUREMENTS = {"ddpm": ["loss"], "vesde": ["likelihood"], "latent": ["loss"]}


DEFAULT_TIMESTEP_LOSS_TIMESTEPS = [10, 100, 500, 900]  # measure.timestep_loss.timesteps when absent


def measured_targets(config: dict) -> list[str]:
    """The targets measure.measurements produces: loss, elbo, timestep_loss_t<t> (one per chosen timestep),
    trajectory, likelihood (workflow_scripts/families/likelihood.py: target_names, target_key)."""
    family = config["model"].get("family", "ddpm")
    names = []
    for m in config["measure"].get("measurements", DEFAULT_MEASUREMENTS[family]):
        if m == "timestep_loss":
            timesteps = config["measure"].get("timestep_loss", {}).get("timesteps", DEFAULT_TIMESTEP_LOSS_TIMESTEPS)
            names += [f"timestep_loss_t{t}" for t in timesteps]
        else:
            names.append(m)
    return names


def config_hash(section: dict) -> str:
    """A short stable hash of a (sub)configuration, stored beside artefacts to detect mismatches."""
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()[:16]


QUERY_SETS = ("generated", "heldout")  # also the stream index of each set's measurement noise


# ----------------------------------------------------------------------------------------------------------------
# All configured measurements of the query sets (what the measure stage will call once wired)
# ----------------------------------------------------------------------------------------------------------------
def target_names(config: dict) -> list[str]:
    """Targets of measure.measurements: loss, elbo, timestep_loss_t<t> (one per chosen timestep), trajectory,
    likelihood."""
    return measured_targets(config)


def target_key(query_set: str, target: str) -> str:
    """Array name in a measurement file: the query set for the loss (today's format), '<set>__<target>' else."""
    return query_set if target == "loss" else f"{query_set}__{target}"


# The files of a gradient store (core/store.py): one per split, plus the training residuals (DAS); the output
# function name of a vector-output (sketch) store.
STORE_SPLITS = ("train", "generated", "heldout")


RESIDUAL = "train_residual"  # per-training-example residuals at the store's (t, eps) draws (DAS)


VECTOR_OUTPUT = "eps"  # the "output function" of sketch stores: the noise predictor itself


# The one source of default settings: the repository's params.yaml (validated by dag/schemas/params.schema.yaml).
# Code that accepts a partial section (a library call, a test) fills it from here, never from its own numbers.
PARAMS_FILE = Path(__file__).resolve().parents[2] / "params.yaml"


@functools.cache
def _params() -> dict:
    return yaml.safe_load(PARAMS_FILE.read_text())


def params_defaults(section: str, keys=None) -> dict:
    """params.yaml's settings of a section (only `keys` when given): the defaults of a partial section."""
    values = _params()[section]
    return {key: values[key] for key in keys} if keys is not None else dict(values)
