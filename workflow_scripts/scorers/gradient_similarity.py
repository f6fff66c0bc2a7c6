"""Gradient similarity (Charpiat et al. 2019): S[q, i] = <phi(x_q), phi(z_i)> or their cosine.

phi are the TRAK loss features (projected loss gradients averaged over the K timesteps) of the final
checkpoint; no kernel, no lambda. Sign convention as TRAK: a training gradient aligned with the
query's loss gradient means removing z_i raises the query's loss. `query_measurement` as in trak.py.
"""
from __future__ import annotations

import numpy as np

from workflow_scripts.scorers.base import expected_store, query_features, query_notes, similarity
from workflow_scripts.scorers.base import query_target  # noqa: F401  (scorers.family_target: lambda tuned on it)


def compute(method_cfg: dict, inputs, lambdas) -> list:
    expect = expected_store(method_cfg)
    train = inputs.features("final", "train", expect)
    kind = method_cfg["similarity"]
    return [(None, {name: similarity(query_features(method_cfg, inputs, name, expect), train, kind).astype(np.float32)
                    for name in inputs.query_sets})]


def notes(method_cfg: dict) -> dict[str, str]:
    return query_notes(method_cfg)

