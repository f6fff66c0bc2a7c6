"""Journey-TRAK (Georgiev et al. 2023), as specified in docs/methods.md: the query features of a generated
image follow its sampling trajectory. At each of the K chosen sampling steps (method key
`sampling_steps`, default all of sample.num_inference_steps) the trajectory's x0-prediction is
re-noised to that step's timestep with fresh seeded noise and the TRAK loss gradient taken there;
the features are the projected average over the steps (computed by the gradients stage, kind
`journey`). Training features and the kernel are TRAK's (loss, final checkpoint):
    S[q, i] = phi_J(x_q)^T (Phi^T Phi + lambda I)^{-1} phi(z_i).

Held-out queries have no sampling trajectory, so Journey-TRAK does not apply to them. Their row is
scored with the standard TRAK query features (the method then differs from `trak` only in the lambda
chosen on the tuning subsets) and says so in chosen.json ("notes"), the log and sweep.png.
"""

from __future__ import annotations

import numpy as np

from workflow_scripts.scorers.base import (
    LAMBDA_GRID,
    POSINT,
    SPACE,
    TIMESTEPS,
    Scorer,
    StoreNeed,
    check_same_space,
    expected_store,
    loss_store,
    method_schema,
)
from workflow_scripts.scorers.trak import KernelSolver

NOTES = {
    name: "standard TRAK query features: Journey-TRAK applies to generated queries only "
    "(these images have no sampling trajectory)"
    for name in ("heldout", "extra")
}


def notes(method_cfg: dict) -> dict[str, str]:
    return dict(NOTES)


def compute(method_cfg: dict, inputs, lambdas) -> list:
    expect = expected_store(method_cfg)
    journey_expect = {"kind": "journey", "output_function": "loss"}
    if "sampling_steps" in method_cfg:
        journey_expect["timesteps"] = method_cfg["sampling_steps"]
    # the journey features must live in the TRAK features' space: same checkpoint and projection
    check_same_space(inputs, [("final", "train"), ("journey", "generated")], (*SPACE, "checkpoint"))
    solver = KernelSolver(inputs.features("final", "train", expect))
    queries = {"generated": inputs.features("journey", "generated", journey_expect)}
    for name in inputs.query_sets:
        if name != "generated":  # no trajectory: TRAK's query features (see NOTES, logged by the scores stage)
            queries[name] = inputs.features("final", name, expect)
    return [(lam, {name: solver.scores(q, lam).astype(np.float32) for name, q in queries.items()}) for lam in lambdas]


class JourneyTrak(Scorer):
    family = "journey"
    schemas = (
        method_schema(
            "journey",
            ["output_function"],
            output_function={"const": "loss"},
            timesteps=TIMESTEPS,
            sampling_steps=POSINT,
            lambda_grid=LAMBDA_GRID,
        ),
    )
    # latent: the guided x0-prediction of the stored latent trajectory, the loss conditioned on the query's prompt
    model_families = ("ddpm", "latent")
    refused_reason = "it re-noises a DDPM-type sampling trajectory (x_t = sqrt(a_bar) x0 + sqrt(1 - a_bar) eps)"

    def stores(self, method_cfg):
        # timesteps None: the journey store spans sample.num_inference_steps (dag/paths.py)
        return [
            loss_store(method_cfg),
            StoreNeed("journey", method_cfg["output_function"], "journey", method_cfg.get("sampling_steps")),
        ]

    def compute(self, method_cfg, inputs, lambdas):
        return compute(method_cfg, inputs, lambdas)

    def notes(self, method_cfg):
        return notes(method_cfg)
