"""Gradient similarity (Charpiat et al. 2019): S[q, i] = <phi(x_q), phi(z_i)> or their cosine.

phi are the TRAK loss features (projected loss gradients averaged over the K timesteps) of the final
checkpoint; no kernel, no lambda. Sign convention as TRAK: a training gradient aligned with the
query's loss gradient means removing z_i raises the query's loss. `query_measurement` as in trak.py.
"""

from __future__ import annotations

import numpy as np

from workflow_scripts.scorers.base import (
    OUTPUT_FUNCTION,
    QUERY_MEASUREMENT,
    SIMILARITY,
    TIMESTEPS,
    LossFeatureScorer,
    expected_store,
    method_schema,
    query_features,
    similarity,
)


def compute(method_cfg: dict, inputs, lambdas) -> list:
    expect = expected_store(method_cfg)
    train = inputs.features("final", "train", expect)
    kind = method_cfg["similarity"]
    return [
        (
            None,
            {
                name: similarity(query_features(method_cfg, inputs, name, expect), train, kind).astype(np.float32)
                for name in inputs.query_sets
            },
        )
    ]


class GradientSimilarity(LossFeatureScorer):
    family = "gradient_similarity"
    schemas = (
        method_schema(
            "gradient_similarity",
            ["output_function", "similarity"],
            output_function=OUTPUT_FUNCTION,
            similarity=SIMILARITY,
            timesteps=TIMESTEPS,
            query_measurement=QUERY_MEASUREMENT,
        ),
    )

    def compute(self, method_cfg, inputs, lambdas):
        return compute(method_cfg, inputs, lambdas)
