"""Stage `data`: load the data set, split train / held-out queries, draw the LDS subsets."""

from __future__ import annotations

import argparse

from workflow_scripts.core.common import log, save_npz
from workflow_scripts.core.data import make_dataset, make_subsets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset-out", required=True)
    parser.add_argument("--subsets-out", required=True)


def run(args, config: dict) -> None:
    dataset = make_dataset(config["data"], config["seeds"]["split"])
    subsets = make_subsets(len(dataset["train_images"]), config["lds"], config["seeds"]["subsets"])
    save_npz(args.dataset_out, **dataset)
    save_npz(args.subsets_out, **subsets)
    log.info(
        "data: %d train, %d held-out queries, %d subsets (%d tuning)",
        len(dataset["train_images"]),
        len(dataset["heldout_images"]),
        len(subsets["masks"]),
        len(subsets["tuning"]),
    )
