"""Does the LoRA fine-tune of the latent miniature visibly change the model? Base vs fine-tune, on a finished run.

    python benchmarks/latent_finetune_effect.py [--overlay configs/latent.yaml] [--n-generated 32] [--threads 2]

Reads the run of the overlay (results/<benchmark>/: the full model's LoRA checkpoint, the encoded pool, the digit
classifier) and compares the base pipeline (the same UNet with its LoRA adapters switched off) with the fine-tuned
model under the pool's captions ("a {digit} digit"), which the base never saw:

1. loss: the simple loss of the held-out and of the training latents under their own caption, over the measure
   stage's fixed (t, eps) draws (measure.n_timesteps x measure.n_noise per image): mean, and the share of images
   whose loss the fine-tune lowers;
2. images: the generated queries regenerated with the same seeds and prompts by both (the sample stage's sampler
   and guidance): the mean pixel value of the decodings (the base draws dark digits on white, the pool is white on
   black: -1 is black), and how often the benchmark's digit classifier (trained on the pool) reads the prompt's
   digit in the image.

Prints one Markdown table; every draw is seeded, so a rerun on the same run prints the same numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.core.classifier import load_classifier
from workflow_scripts.core.common import load_npz
from workflow_scripts.core.contracts import QUERY_SETS
from workflow_scripts.core.data import load_dataset, to_size
from workflow_scripts.dag import paths
from workflow_scripts.dag.config import load_config
from workflow_scripts.families import latent
from workflow_scripts.families.ddpm import measure_loss


def losses(model, inputs: dict, split: str, config: dict) -> np.ndarray:
    """Per-image loss of a split's latents under their own captions, with the measure stage's seed."""
    stream = QUERY_SETS.index(split) if split in QUERY_SETS else len(QUERY_SETS)
    return measure_loss(
        model,
        inputs[f"{split}_images"],
        config["diffusion"],
        config["measure"],
        config["seeds"]["measure"],
        stream,
        "cpu",
        cond=inputs[f"{split}_labels"],
    )


def image_statistics(model, config: dict, shape, n: int, classifier, size: int) -> tuple[float, float]:
    """(mean pixel value of the decoded generations, share whose classified digit is the prompt's digit)."""
    generated = latent.generate_images(model, shape, config, "cpu", n)
    decoded = generated["decoded"]
    with torch.no_grad():
        read = classifier(torch.from_numpy(to_size(decoded, size))).argmax(1).numpy()
    return float(decoded.mean()), float(np.mean(read == generated["labels"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overlay", default="configs/latent.yaml")
    parser.add_argument("--n-generated", type=int, default=32, help="generations per model (seeds of the sample stage)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(REPO / "params.yaml", REPO / args.overlay)
    config["compute"]["device"] = "cpu"
    full = REPO / paths.full_model(config)
    if not full.exists():
        sys.exit(f"{full} is missing: run `snakemake --cores all --configfile {args.overlay}` first")
    inputs = load_npz(REPO / paths.latents_file(config))
    pool = load_dataset(REPO / paths.dataset_file(config))
    model, payload = latent.load_model(full, config["model"])
    classifier, _ = load_classifier(REPO / paths.classifier_model(config))
    size = pool["train_images"].shape[-1]
    rows = {}
    for name, adapters_on in (("base (LoRA off)", False), ("fine-tuned", True)):
        if adapters_on:
            model.unet.enable_adapters()
        else:
            model.unet.disable_adapters()
        heldout, train = losses(model, inputs, "heldout", config), losses(model, inputs, "train", config)
        brightness, prompt_read = image_statistics(
            model, config, payload["image_shape"], args.n_generated, classifier, size
        )
        rows[name] = (heldout, train, brightness, prompt_read)
    base_heldout, base_train = rows["base (LoRA off)"][:2]
    print(
        f"Run: {paths.root(config)} (overlay {args.overlay}); pool mean pixel value {pool['train_images'].mean():.3f}"
    )
    print(
        f"Loss: {config['measure']['n_timesteps']} x {config['measure']['n_noise']} fixed draws per image "
        f"({len(base_heldout)} held-out, {len(base_train)} training latents); images: {args.n_generated} generations "
        f"per model ({latent.sampler_name(config)}), the same seeds and prompts\n"
    )
    print(
        "| model | held-out loss (mean) | held-out images the fine-tune improves | training loss (mean) "
        "| generated: mean pixel value | generated: classifier reads the prompt's digit |"
    )
    print("|---|---|---|---|---|---|")
    for name, (heldout, train, brightness, prompt_read) in rows.items():
        improved = "-" if name.startswith("base") else f"{np.mean(heldout < base_heldout):.0%}"
        print(
            f"| {name} | {heldout.mean():.4f} | {improved} | {train.mean():.4f} | {brightness:.3f} | {prompt_read:.0%} |"
        )


if __name__ == "__main__":
    main()
