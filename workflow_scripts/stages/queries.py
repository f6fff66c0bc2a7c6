"""Stage `queries`: the user's own query images (queries.extra), a third query set beside generated and held-out.

Reads the folder (every image file checked and named in the error when unusable, core/folder.py), brings each image
to the training images' channels and resolution (centre crop, bilinear resize) and to the data set's intensity
levels (core.data.quantise), and writes extra_queries.npz: `images`, `files` (relative to queries.extra) and, with
queries.extra_captions, `captions`. The latent family encodes it (stage encode --queries); every other family reads
it as it is. A file of its own, not dataset.npz: adding query images reruns the measurements and scores, not the
retrainings.
"""

from __future__ import annotations

import argparse

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import log, save_npz
from workflow_scripts.core.folder import MODES, read_query_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="dataset.npz: the training images' channels and resolution")
    parser.add_argument("--out", required=True)


def run(args, config: dict) -> None:
    train = core_data.load_dataset(args.dataset)["train_images"]
    channels, size = train.shape[1], train.shape[-1]
    found = read_query_folder(config["queries"], size, MODES[channels])
    levels = core_data.N_LEVELS[config["data"]["dataset"]]
    found["images"] = core_data.quantise(found["images"], levels)
    save_npz(args.out, **found)
    log.info(
        "queries: %d extra queries at %dx%d, %d channel(s), %d levels%s",
        len(found["files"]),
        size,
        size,
        channels,
        levels,
        ", captioned" if "captions" in found else "",
    )
