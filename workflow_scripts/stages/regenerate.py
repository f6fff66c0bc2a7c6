"""Stage `regenerate`: one counterfactual query, regenerated and measured under the full and the retrained model.

For generated query i and a counterfactual model (the training set without what a method names, same
training seed as the full model):
- the image is regenerated with the same sampling seed (seeds.sample * 1000 + i, the sample stage's
  scheduler and steps) by the full model AND by the counterfactual model, both through the same
  single-image code path, so their difference is due to the model alone (batched and single-image
  sampling can differ in the last float bits, which DDIM amplifies; the log reports that difference
  against samples/generated.npz);
- the loss measurement m_i of the original query (the image the scores attribute) is taken under both
  models with the measure stage's fixed (t, eps) draws of query i.
Writes an .npz with query, image_full, image_counterfactual, query_image, loss_full, loss_counterfactual.
model.family vesde: the probability-flow ODE regenerates, and "loss" is the exact -ln p of the query (nats).
"""

from __future__ import annotations

import argparse

import numpy as np

from workflow_scripts.core.common import ArtefactError, load_npz, log, save_npz, select_device
from workflow_scripts.families.likelihood import measure_generated_query
from workflow_scripts.families.registry import generate_images, load_family_model


def regenerate(model, image_shape, config: dict, query: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Generated query `query` as this model makes it from the query's own sampling seed: (model output, image),
    each (1, c, h, w); they differ for a latent family (the latent, and its decoding)."""
    result = generate_images(model, image_shape, config, device, 1, indices=[query])
    return result["images"], result.get("decoded", result["images"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full-model", required=True)
    parser.add_argument("--model", required=True, help="the counterfactual (retrained) model")
    parser.add_argument("--samples", required=True, help="samples/generated.npz (the original queries)")
    parser.add_argument("--query", type=int, required=True, help="index of the generated query")
    parser.add_argument("--out", required=True)


def run(args, config: dict) -> None:
    device = select_device(config["compute"])
    stored = load_npz(args.samples, ("images",))
    samples = stored["images"]
    if not 0 <= args.query < len(samples):
        raise ArtefactError(f"{args.samples}: has {len(samples)} generated queries, no query {args.query}")
    query_image = samples[args.query : args.query + 1]
    images, outputs, losses, made_by = {}, {}, {}, {}
    for name, path in (("full", args.full_model), ("counterfactual", args.model)):
        model, payload = load_family_model(path, config["model"], device)
        made_by[name] = payload["config"]
        outputs[name], images[name] = regenerate(model, payload["image_shape"], config, args.query, device)
        # a conditional model (latent family) measures the query under its own prompt
        cond = stored["labels"][args.query : args.query + 1] if getattr(model, "conditional", False) else None
        losses[name] = measure_generated_query(model, query_image, config, args.query, device, cond)
    for key in (
        "seed",
        "train",
        "diffusion",
        "data",
    ):  # a counterfactual differs from the full model only in its members
        if made_by["counterfactual"].get(key) != made_by["full"].get(key):
            raise ArtefactError(
                f"{args.model}: trained with {key} {made_by['counterfactual'].get(key)!r}, the full model "
                f"{args.full_model} with {made_by['full'].get(key)!r}; retrain it"
            )
    drift = float(np.abs(outputs["full"] - query_image).max())
    shown = stored["decoded"][args.query : args.query + 1] if "decoded" in stored else query_image
    save_npz(
        args.out,
        query=np.array(args.query),
        image_full=images["full"][0],
        image_counterfactual=images["counterfactual"][0],
        query_image=shown[0],
        loss_full=np.array(losses["full"]),
        loss_counterfactual=np.array(losses["counterfactual"]),
    )
    log.info(
        "regenerate query %d: pixel L2 %.4f, loss %.5f -> %.5f (full-model regeneration vs samples: max |diff| %.2e)",
        args.query,
        float(np.linalg.norm(images["counterfactual"] - images["full"])),
        losses["full"],
        losses["counterfactual"],
        drift,
    )
