"""Stage `measure`: ground-truth measurements of every query under one trained model.

Measurement `loss` (docs/methods.md): the simple loss of the query averaged over fixed (t, eps) draws
(a uniform grid of n_timesteps t, n_noise eps each), the same draws for every model. The other targets of
measure.measurements (ELBO, per-timestep losses, trajectory -log p; workflow_scripts/families/likelihood.py) are
written into the same file: the loss under the query set's name ('generated', 'heldout'), every other
target as '<query set>__<target>' (likelihood.target_key), and the list of targets as 'targets'.
model.family vesde: the only target is the exact -ln p (nats), '<query set>__likelihood', and the file's
'measurement' entry names it as the primary target (what load_targets reads).

One job may measure several retrainings (--model, --replicate and --out each take one value per model, in the same
order; measure.group: subset measures every seed of an LDS subset in one job): the queries are loaded once and each
model is measured exactly as in a job of its own (the draws are seeded per query set, not per process), so the
files are bit-identical; only the interpreter's start-up is paid once.
"""

from __future__ import annotations

import argparse

import numpy as np

from workflow_scripts.core.common import load_npz, log, require_finite, save_npz, select_device
from workflow_scripts.core.contracts import target_names
from workflow_scripts.core.data import load_conditions, load_queries
from workflow_scripts.families.likelihood import family_primary_target, measure_queries
from workflow_scripts.families.registry import load_family_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, nargs="+", help="one or more models")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--extra-queries", help="the user's own queries as the model takes them (queries.extra)")
    parser.add_argument("--subset", type=int, default=-1)
    parser.add_argument("--replicate", type=int, nargs="+", default=[0], help="one per model")
    parser.add_argument("--out", required=True, nargs="+", help="one per model")


def measurement_jobs(args) -> list[tuple[str, int, str]]:
    """(model, replicate, out) of each model the job measures; a single value is one model."""
    models, replicates, outs = (
        [v] if isinstance(v, (str, int)) else list(v) for v in (args.model, args.replicate, args.out)
    )
    if not len(models) == len(replicates) == len(outs):
        raise ValueError(
            f"--model, --replicate and --out need one value per model: got {len(models)}, {len(replicates)}, {len(outs)}"
        )
    return list(zip(models, replicates, outs, strict=True))


def run(args, config: dict) -> None:
    device = select_device(config["compute"])
    jobs = measurement_jobs(args)
    queries = load_queries(args.dataset, args.samples, args.extra_queries)
    targets = target_names(config)
    # the trajectory target needs the generated queries' stored sampling trajectories
    samples = load_npz(args.samples, ("trajectories", "timesteps")) if "trajectory" in targets else None
    conditions = None
    # the primary target of the LDS tables: the loss, or a vesde model's exact -ln p
    target = family_primary_target(config["model"])
    primary = {"measurement": np.array(target)} if target != "loss" else {}
    for model_path, replicate, out in jobs:
        model, _ = load_family_model(model_path, config["model"], device)
        if conditions is None and getattr(model, "conditional", False):
            conditions = load_conditions(args.dataset, args.samples, args.extra_queries)
        results = measure_queries(model, queries, config, device, samples, conditions)
        for key, values in results.items():  # a NaN target would surface only as an LDS of NaN or an unnamed error
            require_finite(values, f"{out}: measurement {key} of {model_path}")
        save_npz(
            out,
            subset=np.array(args.subset),
            replicate=np.array(replicate),
            targets=np.array(targets),
            **primary,
            **results,
        )
        log.info("measure %s: means %s", model_path, {k: round(float(v.mean()), 5) for k, v in results.items()})
