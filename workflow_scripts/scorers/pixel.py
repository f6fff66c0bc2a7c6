"""Raw pixel similarity: dot product or cosine of flattened images (no model involved).

`space: images` (default) compares the images; `space: inputs` the model inputs, which for the latent family are
the VAE latents (similarity in latent space) and for a pixel-space family the images again."""

from __future__ import annotations

import numpy as np

from workflow_scripts.scorers import base
from workflow_scripts.scorers.base import SIMILARITY, Scorer, method_schema


def similarity(queries: np.ndarray, train: np.ndarray, kind: str) -> np.ndarray:
    """(n_query, n_train) float32, computed in float64 over chunks of training images (scorers/base.py)."""
    return base.similarity(queries, train, kind, tiny=1e-12).astype(np.float32)


def compute(method_cfg: dict, inputs, lambdas) -> list:
    if method_cfg.get("space", "images") == "inputs":
        train, queries = inputs.train_images(), inputs.queries()
    else:
        train, queries = inputs.train_pixels(), inputs.query_pixels()
    return [(None, {name: similarity(images, train, method_cfg["similarity"]) for name, images in queries.items()})]


class Pixel(Scorer):
    family = "pixel"
    schemas = (method_schema("pixel", ["similarity"], similarity=SIMILARITY, space={"enum": ["images", "inputs"]}),)
    # model-free: it reads images (or the model inputs) only
    model_families = ("ddpm", "vesde", "latent")

    def compute(self, method_cfg, inputs, lambdas):
        return compute(method_cfg, inputs, lambdas)
