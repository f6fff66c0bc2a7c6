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


QUERY_SETS = ("generated", "heldout")  # the query sets of every run; a set's position is its measurement-noise stream
EXTRA_QUERY_SET = "extra"  # the user's own query images (queries.extra), a third set after the two: stream 2
ALL_QUERY_SETS = (*QUERY_SETS, EXTRA_QUERY_SET)


def query_stream(name: str) -> int:
    """The measurement-noise stream of a query set: its position in ALL_QUERY_SETS (generated 0, heldout 1,
    extra 2), so adding extra queries changes no other set's draws."""
    return ALL_QUERY_SETS.index(name)


def query_sets(config: dict) -> tuple[str, ...]:
    """The query sets of a run: generated and held-out, then `extra` when queries.extra names a folder."""
    return (*QUERY_SETS, EXTRA_QUERY_SET) if has_extra_queries(config) else QUERY_SETS


def measurement_sets(target: str, sets) -> list[str]:
    """The query sets among `sets` that have a target: the trajectory exists for the generated queries only (the
    held-out and extra images were never sampled)."""
    return ["generated"] if target == "trajectory" else list(sets)


def has_extra_queries(config: dict) -> bool:
    return bool((config.get("queries") or {}).get("extra"))


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


def store_splits(config: dict) -> tuple[str, ...]:
    """The per-split files of a gradient store in a run: STORE_SPLITS, then the extra queries' when configured."""
    return (*STORE_SPLITS, EXTRA_QUERY_SET) if has_extra_queries(config) else STORE_SPLITS


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
