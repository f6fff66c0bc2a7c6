"""Raw pixel similarity: dot product or cosine of flattened images (no model involved)."""

from __future__ import annotations

import numpy as np

from workflow_scripts.scorers import base
from workflow_scripts.scorers.base import SIMILARITY, Scorer, method_schema


def similarity(queries: np.ndarray, train: np.ndarray, kind: str) -> np.ndarray:
    """(n_query, n_train) float32, computed in float64 over chunks of training images (scorers/base.py)."""
    return base.similarity(queries, train, kind, tiny=1e-12).astype(np.float32)


def compute(method_cfg: dict, inputs, lambdas) -> list:
    train = inputs.train_images()
    return [
        (None, {name: similarity(images, train, method_cfg["similarity"]) for name, images in inputs.queries().items()})
    ]


class Pixel(Scorer):
    family = "pixel"
    schemas = (method_schema("pixel", ["similarity"], similarity=SIMILARITY),)
    model_families = ("ddpm", "vesde")  # model-free: it reads images only

    def compute(self, method_cfg, inputs, lambdas):
        return compute(method_cfg, inputs, lambdas)
