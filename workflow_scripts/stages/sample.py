"""Stage `sample`: generate the query images from the full model, keeping every sampling trajectory
(model.family vesde: the probability-flow ODE of vesde.generate_vesde).

Image i starts from, and draws its ancestral noise from, its own generator seeded with
seeds.sample * 1000 + i, so an image does not depend on how many others are generated with it.
"""

from __future__ import annotations

import argparse

from workflow_scripts.core.common import log, require_finite, save_npz, select_device
from workflow_scripts.families.registry import generate_images, load_family_model, sampler_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)


def run(args, config: dict) -> None:
    device = select_device(config["compute"])
    model, payload = load_family_model(args.model, config["model"], device)
    result = generate_images(model, payload["image_shape"], config, device)
    for key in ("images", "trajectories"):  # a NaN image would fail only at measurement or scoring, unnamed
        require_finite(result[key], f"{args.out}: the {key} sampled from {args.model}")
    save_npz(args.out, **result)
    sampler = sampler_name(config)
    log.info("sample: %d images with %s, %d steps", len(result["images"]), sampler, len(result["timesteps"]))
