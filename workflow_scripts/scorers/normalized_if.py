"""Relative influence (Barshan et al. 2020) and renormalised influence (Hammoudeh & Lowd 2022), TRAK-scaled.

With S_TRAK[q, i] = phi(x_q)^T (Phi^T Phi + lambda I)^{-1} phi(z_i) on the TRAK loss features:
  relative:      S[q, i] = S_TRAK[q, i] / ||(Phi^T Phi + lambda I)^{-1} phi(z_i)||
  renormalized:  S[q, i] = S_TRAK[q, i] / ||phi(z_i)||
(DAS paper appendix E.3). lambda is swept like TRAK's (relative to the mean eigenvalue of Phi^T Phi).
"""

from __future__ import annotations

import numpy as np

from workflow_scripts.scorers.base import (
    LAMBDA_GRID,
    OUTPUT_FUNCTION,
    QUERY_MEASUREMENT,
    TIMESTEPS,
    LossFeatureScorer,
    expected_store,
    method_schema,
    query_features,
)
from workflow_scripts.scorers.trak import KernelSolver


def normalized_scores(
    solver: KernelSolver, queries: np.ndarray, relative_lambda: float, normalization: str
) -> np.ndarray:
    if normalization == "relative":
        norms = solver.preconditioned_train_norms(relative_lambda)
    elif normalization == "renormalized":
        norms = solver.train_norms()
    else:
        raise ValueError(f"unknown normalization {normalization!r}")
    return solver.scores(queries, relative_lambda) / np.clip(norms, 1e-300, None)


def compute(method_cfg: dict, inputs, lambdas) -> list:
    expect = expected_store(method_cfg)
    solver = KernelSolver(inputs.features("final", "train", expect))
    queries = {name: query_features(method_cfg, inputs, name, expect) for name in inputs.query_sets}
    kind = method_cfg["normalization"]
    return [
        (lam, {name: normalized_scores(solver, q, lam, kind).astype(np.float32) for name, q in queries.items()})
        for lam in lambdas
    ]


class NormalizedInfluence(LossFeatureScorer):
    family = "normalized_if"
    schemas = (
        method_schema(
            "normalized_if",
            ["output_function", "normalization"],
            output_function=OUTPUT_FUNCTION,
            normalization={"enum": ["relative", "renormalized"]},
            timesteps=TIMESTEPS,
            lambda_grid=LAMBDA_GRID,
            query_measurement=QUERY_MEASUREMENT,
        ),
    )

    def compute(self, method_cfg, inputs, lambdas):
        return compute(method_cfg, inputs, lambdas)
