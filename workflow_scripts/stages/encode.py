"""Stage `encode` (model.family latent): the model inputs of the latent family, encoded once per data set.

Writes latents.npz with the keys of dataset.npz (train_images / heldout_images are now VAE latents,
mode() * scaling_factor, of the images at latent.encode_resolution: data.resolution, else the VAE's sample_size), the caption table `captions` (one per
class; train_labels / heldout_labels index it) and the base pipeline it was encoded with (`pipeline`, and its
sha256 `pipeline_sha256`, which every LoRA trained on these latents records). Every retraining reuses it.

With --queries (the queries stage's extra_queries.npz) it encodes the user's own query images instead and writes
extra_latents.npz: `images` (latents), `files`, `captions` and `labels`, each caption's index in the data set's
caption table (the model is conditioned on the table's precomputed text embeddings, so an extra query's caption
must be one of the training captions; an unknown one is named in the error with the table).
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
    parser.add_argument("--queries", help="encode these extra query images (stage queries' file) instead")
    parser.add_argument("--out", required=True)


def captions_of(dataset: dict, data_cfg: dict) -> np.ndarray:
    """The data set's caption table: its own (ArtBench: "a {style} painting") or, for digits, "a {digit} digit"."""
    if "captions" in dataset:
        return np.asarray(dataset["captions"])
    if data_cfg["dataset"] == "digits":
        return np.asarray(pool_captions())
    raise ValueError(f"data.dataset {data_cfg['dataset']!r} has no captions: the latent family needs a caption table")


def caption_labels(captions: np.ndarray, table: np.ndarray, where: str) -> np.ndarray:
    """Each caption's index in the caption table; an unknown caption is named with the table."""
    index = {str(c): i for i, c in enumerate(table)}
    unknown = sorted({str(c) for c in captions} - set(index))
    if unknown:
        raise ValueError(
            f"{where}: captions {unknown} are not among the training captions {[str(c) for c in table]}; the latent "
            "model is conditioned on the training caption table, so an extra query takes one of those captions"
        )
    return np.array([index[str(c)] for c in captions], np.int64)


def encode_extra_queries(args, config: dict, dataset: dict, parts: dict, resolution, device) -> None:
    """extra_latents.npz from the queries stage's file (see the module docstring)."""
    extra = core_data.load_extra_queries(args.queries)
    if "captions" not in extra:
        raise ValueError(
            "queries.extra_captions is not set: the text-conditional latent family needs a caption for each extra "
            "query (a CSV with header file,caption, as data.captions)"
        )
    table = captions_of(dataset, config["data"])
    labels = caption_labels(extra["captions"], table, f"queries.extra_captions (queries {args.queries})")
    latents = encode_images(parts["vae"], extra["images"], config["measure"]["batch_size"], device, resolution)
    save_npz(args.out, images=latents, files=extra["files"], captions=extra["captions"], labels=labels)
    log.info("encode: latents %s of the extra queries", latents.shape)


def run(args, config: dict) -> None:
    device = select_device(config["compute"])
    dataset = core_data.load_dataset(args.dataset)
    parts = load_components(args.pipeline, device, base_dtype(config["model"], device))
    resolution = encode_resolution(config["data"], parts["vae"].config)
    if args.queries:
        encode_extra_queries(args, config, dataset, parts, resolution, device)
        return
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
