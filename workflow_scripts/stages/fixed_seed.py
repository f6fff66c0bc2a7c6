"""Stage `fixed_seed`: draw the fixed-seed sets (core/fixed_seed.py): the evaluation subsets and the
leave-out sets whose retrainings are the metagradient's ground truth.
"""

from __future__ import annotations

import argparse

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import log, save_npz
from workflow_scripts.core.fixed_seed import make_sets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subsets", required=True, help="data/subsets.npz (the LDS subsets and their split)")
    parser.add_argument("--out", required=True)


def run(args, config: dict) -> None:
    sets = make_sets(core_data.load_subsets(args.subsets), config["fixed_seed"], config["seeds"]["subsets"])
    save_npz(args.out, **sets)
    log.info(
        "fixed_seed: %d sets (%d evaluation subsets, %d leave-out sets of %d examples)",
        len(sets["names"]),
        sum(str(n).startswith("subset") for n in sets["names"]),
        config["fixed_seed"]["loo_sets"],
        int((~sets["masks"][-1]).sum()) if config["fixed_seed"]["loo_sets"] else 0,
    )
