"""TracInCP (Pruthi et al. 2020) and GAS (Hammoudeh & Lowd 2022) over the full model's checkpoints.

TracInCP: S[q, i] = sum_c lr_c <phi_c(x_q), phi_c(z_i)>, GAS: S[q, i] = sum_c lr_c cos(phi_c(x_q), phi_c(z_i)),
with phi_c the TRAK loss features at intermediate checkpoint c (results/<b>/models/full/checkpoints/
step*.pt) and lr_c the learning rate of the optimizer step that produced it (recorded in the
checkpoint and copied into each store's sidecar). The sum runs over the C checkpoints of
train.checkpoint_every (the last one is the final step, whose cosine-schedule lr is ~0).
"""

from __future__ import annotations

import numpy as np

from workflow_scripts.core.common import ArtefactError, log
from workflow_scripts.scorers.base import (
    OUTPUT_FUNCTION,
    QUERY_MEASUREMENT,
    SIMILARITY,
    TIMESTEPS,
    Scorer,
    check_same_space,
    expected_store,
    loss_store,
    method_schema,
    similarity,
)


def tracin_scores(queries: list[np.ndarray], train: list[np.ndarray], lrs: list[float], kind: str) -> np.ndarray:
    """sum_c lr_c sim(queries[c], train[c]) -- one feature matrix pair per checkpoint."""
    if not (len(queries) == len(train) == len(lrs)) or not lrs:
        raise ValueError(
            f"need one (query, train, lr) triple per checkpoint, got {len(queries)}, {len(train)}, {len(lrs)}"
        )
    return sum(lr * similarity(q, x, kind) for q, x, lr in zip(queries, train, lrs))


def checkpoint_roles(inputs) -> list[str]:
    roles = sorted((r for r in inputs.roles() if r.startswith("step")), key=lambda r: int(r[4:]))
    if not roles:
        raise ArtefactError("TracInCP / GAS need gradient stores of the intermediate checkpoints (roles step<N>)")
    return roles


def compute(method_cfg: dict, inputs, lambdas) -> list:
    expect = expected_store(method_cfg)
    roles = checkpoint_roles(inputs)
    check_same_space(inputs, [(role, "train") for role in roles])
    lrs = []
    for role in roles:
        lr = inputs.checkpoint(role)["lr"]
        if lr is None:
            raise ArtefactError(
                f"store {role}: its checkpoint records no learning rate (not an intermediate checkpoint?)"
            )
        lrs.append(lr)
    log.info("TracIn over %d checkpoints: %s", len(roles), ", ".join(f"{r} (lr {lr:.3g})" for r, lr in zip(roles, lrs)))
    train = [inputs.features(role, "train", expect) for role in roles]
    kind = method_cfg["similarity"]
    return [
        (
            None,
            {
                name: tracin_scores([inputs.features(role, name, expect) for role in roles], train, lrs, kind).astype(
                    np.float32
                )
                for name in inputs.query_sets
            },
        )
    ]


class TracIn(Scorer):
    family = "tracin"
    # query_measurement is accepted by the schema only to be refused with a reason (dag/config.py)
    schemas = (
        method_schema(
            "tracin",
            ["output_function", "similarity"],
            output_function=OUTPUT_FUNCTION,
            similarity=SIMILARITY,
            timesteps=TIMESTEPS,
            query_measurement=QUERY_MEASUREMENT,
        ),
    )
    model_families = ("ddpm", "latent")  # latent: the LoRA parameters, conditioned on the caption
    refused_reason = "its gradient stores (rule gradients) hold gradients of DDPM output functions"

    def stores(self, method_cfg):
        return [loss_store(method_cfg, role="checkpoints")]

    def compute(self, method_cfg, inputs, lambdas):
        return compute(method_cfg, inputs, lambdas)
