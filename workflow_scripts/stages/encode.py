"""Stage `encode` (model.family latent): the model inputs of the latent family, encoded once per data set.

Writes latents.npz with the keys of dataset.npz (train_images / heldout_images are now VAE latents,
mode() * scaling_factor, of the images at latent.encode_resolution: data.resolution, else the VAE's sample_size), the caption table `captions` (one per
class; train_labels / heldout_labels index it) and the base pipeline it was encoded with (`pipeline`, and its
sha256 `pipeline_sha256`, which every LoRA trained on these latents records). Every retraining reuses it.
"""

from __future__ import annotations

import argparse

import numpy as np

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import log, save_npz, select_device
from workflow_scripts.families.latent import (
    base_dtype,
    encode_images,
    encode_resolution,
    load_components,
    pipeline_digest,
)
from workflow_scripts.families.latent_miniature import pool_captions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--pipeline", required=True, help="the base pipeline directory (model.pipeline)")
    parser.add_argument("--out", required=True)


def captions_of(dataset: dict, data_cfg: dict) -> np.ndarray:
    """The data set's caption table: its own (ArtBench: "a {style} painting") or, for digits, "a {digit} digit"."""
    if "captions" in dataset:
        return np.asarray(dataset["captions"])
    if data_cfg["dataset"] == "digits":
        return np.asarray(pool_captions())
    raise ValueError(f"data.dataset {data_cfg['dataset']!r} has no captions: the latent family needs a caption table")


def run(args, config: dict) -> None:
    device = select_device(config["compute"])
    dataset = core_data.load_dataset(args.dataset)
    parts = load_components(args.pipeline, device, base_dtype(config["model"], device))
    resolution = encode_resolution(config["data"], parts["vae"].config)
    batch = config["measure"]["batch_size"]
    latents = {
        split: encode_images(parts["vae"], dataset[f"{split}_images"], batch, device, resolution)
        for split in ("train", "heldout")
    }
    # the data set's own caption table (ArtBench, folder) is written below, as captions_of gives it
    out = {key: value for key, value in dataset.items() if not key.endswith("_images") and key != "captions"}
    save_npz(
        args.out,
        **out,
        train_images=latents["train"],
        heldout_images=latents["heldout"],
        captions=captions_of(dataset, config["data"]),
        pipeline=np.asarray(str(args.pipeline)),
        pipeline_sha256=np.asarray(pipeline_digest(args.pipeline)),
    )
    log.info("encode: latents %s (train) and %s (held-out)", latents["train"].shape, latents["heldout"].shape)
