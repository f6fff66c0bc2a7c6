"""The model-family interface and its registry: ``model.family`` names one module of this package.

A model family is a module that provides
  load_model(path, model_cfg, device) -> (model in eval mode on device, checkpoint payload)
  train_family_model(config, dataset, members, replicate, model_out, checkpoint_paths, weights) -> None
    (dataset: the dict of the stage's --dataset file, the family's model inputs: dataset.npz, or latents.npz)
  generate_images(model, image_shape, config, device, n_images, indices) -> {images, trajectories, timesteps, seeds}
  sampler_name(config) -> how it samples (for the logs)
and, to be differentiated through its training by the metagradient scorer (engines/magic.py),
  training_replay(config, dataset, replicate, device, dtype) -> ddpm.TrainingReplay (initial model, the batch of
    every step, the clipping) of its training on all training examples
  checkpoint_identity(config, dataset, members, replicate, weights) -> the identity its checkpoints record
Which scorers apply to a family is the scorers' declaration (Scorer.model_families), and the measurements of a
family are families/likelihood.py's (measure_queries, measure_generated_query, family_primary_target).
The stages call the functions below and never branch on the family themselves; a new family is one new
module here plus one entry of FAMILIES.
"""

from __future__ import annotations

from workflow_scripts.families import ddpm, latent, vesde

FAMILIES = {"ddpm": ddpm, "vesde": vesde, "latent": latent}


def family_name(model_cfg: dict) -> str:
    return model_cfg.get("family", "ddpm")


def family_module(model_cfg: dict):
    name = family_name(model_cfg)
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model.family: unknown family {name!r}; known: {sorted(FAMILIES)}") from None


def load_family_model(path, model_cfg: dict, device="cpu"):
    """The checkpoint of model_cfg's family (model.family). Returns (model in eval mode on device, payload)."""
    return family_module(model_cfg).load_model(path, model_cfg, device)


def train_family_model(
    config: dict, dataset: dict, members, replicate: int, model_out, checkpoint_paths=None, weights=None
) -> None:
    """Train one model of the configured family on training examples `members` of the dataset dict (weights:
    per-example loss weights)."""
    family_module(config["model"]).train_family_model(
        config, dataset, members, replicate, model_out, checkpoint_paths=checkpoint_paths, weights=weights
    )


def sampler_name(config: dict) -> str:
    """How the configured family draws its generated queries (for the logs)."""
    return family_module(config["model"]).sampler_name(config)


def generate_images(model, image_shape, config: dict, device, n_images: int | None = None, indices=None) -> dict:
    """The sample stage's images of the configured family (n_images: sample.n_generated unless given)."""
    n_images = config["sample"]["n_generated"] if n_images is None else n_images
    return family_module(config["model"]).generate_images(model, image_shape, config, device, n_images, indices)


def is_conditional(model_cfg: dict) -> bool:
    """Whether the family's denoiser takes a condition (caption index) per example: forward(x_t, t, cond)."""
    return bool(getattr(family_module(model_cfg), "CONDITIONAL", False))


def training_replay(config: dict, dataset: dict, replicate: int, device, dtype):
    """The configured family's training on ALL of dataset's training examples, for the metagradient to replay."""
    module = family_module(config["model"])
    if not hasattr(module, "training_replay"):
        raise ValueError(f"model.family {family_name(config['model'])!r}: its training cannot be replayed")
    return module.training_replay(config, dataset, replicate, device, dtype)


def checkpoint_identity(config: dict, dataset: dict, members, replicate: int, weights=None) -> dict:
    """The identity train_family_model records in the checkpoint of this training."""
    return family_module(config["model"]).checkpoint_identity(config, dataset, members, replicate, weights)
