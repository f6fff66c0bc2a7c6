"""Raw pixel similarity: dot product or cosine of flattened images (no model involved)."""
from __future__ import annotations

import numpy as np


def similarity(queries: np.ndarray, train: np.ndarray, kind: str) -> np.ndarray:
    q = queries.reshape(len(queries), -1).astype(np.float64)
    x = train.reshape(len(train), -1).astype(np.float64)
    if kind == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
        x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    elif kind != "dot":
        raise ValueError(f"unknown similarity {kind!r}")
    return (q @ x.T).astype(np.float32)


def compute(method_cfg: dict, inputs, lambdas) -> list:
    train = inputs.train_images()
    return [(None, {name: similarity(images, train, method_cfg["similarity"]) for name, images in inputs.queries().items()})]
