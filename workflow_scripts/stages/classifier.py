"""Stage `classifier`: train the digit classifier of core/classifier.py and save it with its held-out accuracy."""

from __future__ import annotations

import argparse

from workflow_scripts.core import data as core_data
from workflow_scripts.core.classifier import accuracy, classifier_config, train_classifier
from workflow_scripts.core.common import ArtefactError, log, save_torch, select_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", required=True, help="dataset.npz of the data stage (train + held-out images, labels)"
    )
    parser.add_argument("--out", required=True, help="classifier checkpoint (.pt)")


def run(args, config: dict) -> None:
    if "classifier" not in config.get("seeds", {}):
        raise ValueError("config lacks seeds.classifier (the seed of the classifier stage)")
    cfg, seed = classifier_config(config), config["seeds"]["classifier"]
    device = select_device(config["compute"])
    dataset = core_data.load_dataset(args.dataset)
    for key in ("train_labels", "heldout_labels"):
        if key not in dataset:
            raise ArtefactError(f"{args.dataset}: lacks {key}")
    model, payload = train_classifier(cfg, seed, dataset["train_images"], dataset["train_labels"], device)
    payload["metrics"]["heldout_accuracy"] = accuracy(
        model, dataset["heldout_images"], dataset["heldout_labels"], device
    )
    save_torch(payload, args.out)
    log.info(
        "classifier: train accuracy %.3f, held-out accuracy %.3f (%d held-out images); wrote %s",
        payload["metrics"]["train_accuracy"],
        payload["metrics"]["heldout_accuracy"],
        len(dataset["heldout_images"]),
        args.out,
    )
