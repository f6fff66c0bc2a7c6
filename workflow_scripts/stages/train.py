"""Stage `train`: DDPM training of the full model and of every retraining (model.family vesde: the VE-SDE score
model by denoising score matching, vesde.train_vesde, with the same seeds, data order and checkpoints).

A retraining's members come from an LDS subset (--subsets FILE --subset j) or from a file of
training indices (--members FILE: a counterfactual retraining, the training set without what a
method names). Every random draw at step s is a pure function of (seed, s): the initialisation
comes from the seed, the data order of epoch e is the permutation of the MEMBERS drawn from
(seed, e), and the (t, eps) draws of step s come from (seed, s). "The same seed" therefore means the
same initialisation and the same per-step (t, eps) stream; the data order necessarily differs
when the members differ. A run resumed from its last saved state reproduces the uninterrupted run
exactly (on CPU, bit for bit).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import ArtefactError, log
from workflow_scripts.core.fixed_seed import load_sets, weights
from workflow_scripts.families.registry import train_family_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--subsets", help="LDS subset masks (data stage); with --subset")
    parser.add_argument("--subset", type=int, default=-1, help="LDS subset index; -1 = the full training set")
    parser.add_argument("--members", help="a .npy of training indices to train on (counterfactual retrainings)")
    parser.add_argument(
        "--fixed-seed-sets",
        help="fixed_seed/sets.npz; with --fixed-seed-set: train on ALL examples, "
        "those outside the set weighted 0 (the metagradient's fixed-seed ground truth)",
    )
    parser.add_argument("--fixed-seed-set", help="name of the fixed-seed set (subset<j> or loo<k>)")
    parser.add_argument(
        "--replicate",
        type=int,
        nargs="+",
        default=[0],
        help="training seed index s (seed = seeds.train + s); several with --subset: one model per seed, in one job",
    )
    parser.add_argument("--out", required=True, nargs="+", help="one per --replicate")
    parser.add_argument("--checkpoints", nargs="*", default=[], help="intermediate checkpoints, named *step<N>.pt")


def checkpoint_step(path: str) -> int:
    stem = Path(path).stem
    if "step" not in stem:
        raise ValueError(f"checkpoint path {path} must end in step<N>.pt")
    return int(stem.rsplit("step", 1)[1])


def load_members(path: str | Path, n_train: int) -> np.ndarray:
    """Training indices from a .npy file: 1-D, integer, unique, sorted, within [0, n_train), not empty."""
    path = Path(path)
    if not path.exists():
        raise ArtefactError(f"{path}: missing (run the workflow stage that makes it)")
    try:
        members = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ArtefactError(f"{path}: cannot be read ({exc}); delete it and rerun") from exc
    if members.ndim != 1 or not np.issubdtype(members.dtype, np.integer) or len(members) == 0:
        raise ArtefactError(
            f"{path}: expected a non-empty 1-D integer array of training indices, "
            f"got {members.dtype} of shape {members.shape}"
        )
    if members.min() < 0 or members.max() >= n_train:
        raise ArtefactError(f"{path}: indices outside [0, {n_train}) (the training set has {n_train} images)")
    if np.any(np.diff(members) <= 0):
        raise ArtefactError(f"{path}: indices must be sorted and unique")
    return members.astype(np.int64)


def replicate_outputs(args, several: bool) -> list[tuple[int, str]]:
    """(replicate, out) of each model the job trains: one, or (several: an LDS subset's seeds, jobs.train: subset)
    one per --replicate, in order."""
    replicates = [args.replicate] if isinstance(args.replicate, int) else list(args.replicate)
    outs = [args.out] if isinstance(args.out, str) else list(args.out)
    if len(replicates) != len(outs):
        raise ValueError(f"--replicate and --out need one value per model: got {len(replicates)} and {len(outs)}")
    if len(outs) > 1 and not several:
        raise ValueError("several models per job are LDS retrainings of one subset: give --subset (no --checkpoints)")
    return list(zip(replicates, outs, strict=True))


def run(args, config: dict) -> None:
    dataset = core_data.load_dataset(args.dataset)
    images = dataset["train_images"]
    if args.fixed_seed_sets or args.fixed_seed_set:
        if not (args.fixed_seed_sets and args.fixed_seed_set) or args.members is not None or args.subset >= 0:
            raise ValueError(
                "a fixed-seed retraining needs --fixed-seed-sets and --fixed-seed-set, and neither "
                "--members nor --subset"
            )
        [(replicate, out)] = replicate_outputs(args, several=False)
        w = weights(load_sets(args.fixed_seed_sets), args.fixed_seed_set, len(images))
        log.info(
            "fixed-seed retraining %s: %d of %d examples weighted 0, seed and data order of replicate %d",
            args.fixed_seed_set,
            int((w == 0).sum()),
            len(w),
            replicate,
        )
        train_family_model(config, dataset, np.arange(len(images)), replicate, out, weights=w)
        return
    if args.members is not None:
        if args.subset >= 0:
            raise ValueError("give either --members or --subset, not both")
        members = load_members(args.members, len(images))
    elif args.subset < 0:
        members = np.arange(len(images))
    else:
        if args.subsets is None:
            raise ValueError("--subset needs --subsets (the data stage's subsets.npz)")
        members = np.flatnonzero(core_data.load_subsets(args.subsets)["masks"][args.subset])
    checkpoints = {checkpoint_step(p): p for p in args.checkpoints}
    for replicate, out in replicate_outputs(args, several=args.subset >= 0 and not checkpoints):
        # every model is seeded from its own replicate alone, so a job training several gives each the bytes of a
        # job of its own (tests/unit/stages/test_train_packing.py)
        train_family_model(config, dataset, members, replicate, out, checkpoints)
