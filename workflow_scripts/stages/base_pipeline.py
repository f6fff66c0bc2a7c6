"""Stage `base_pipeline` (model.family latent, model.pipeline null): build and pretrain the miniature base pipeline
on the digits OUTSIDE the attribution pool and save it as a diffusers directory (families/latent_miniature.py)."""

from __future__ import annotations

import argparse

import numpy as np

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import log
from workflow_scripts.families.latent_miniature import build_and_pretrain


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="the data stage's dataset.npz (which digits are the pool)")
    parser.add_argument("--out", required=True, help="the pipeline directory to write")


def run(args, config: dict) -> None:
    if config["data"]["dataset"] != "digits":
        raise ValueError(
            f"model.pipeline is null, which builds the miniature base on digits, but data.dataset is "
            f"{config['data']['dataset']!r}: set model.pipeline to a local diffusers directory (e.g. miniSD)"
        )
    dataset = core_data.load_dataset(args.dataset)
    images, labels = core_data.load_digits_images()
    pool = np.union1d(dataset["train_index"], dataset["heldout_index"])
    outside = np.setdiff1d(np.arange(len(images)), pool)
    log.info("base pipeline: pretraining on %d digits outside the pool of %d", len(outside), len(pool))
    build_and_pretrain(config, images[outside], labels[outside], args.out)
