"""Helpers shared by the gradient-based scorer families: what a method expects of its stores, similarity."""
from __future__ import annotations

import numpy as np

from workflow_scripts.core.common import ArtefactError

CHUNK_BYTES = 64 * 2**20  # float64 bytes of one chunk of training rows


def row_chunks(features, chunk_bytes: int | None = None):
    """(slice, float64 rows) over the first axis of a (memory-mapped) array, about chunk_bytes (CHUNK_BYTES) at a time."""
    per_row = max(1, int(np.prod(features.shape[1:])) * 8)
    step = max(1, (chunk_bytes or CHUNK_BYTES) // per_row)
    for start in range(0, len(features), step):
        rows = slice(start, min(start + step, len(features)))
        yield rows, np.asarray(features[rows], dtype=np.float64)


# made_by entries that put features of different stores in the same space (same model family and projection)
SPACE = ("model", "diffusion", "projection", "projection_dim", "seed_projection", "sjlt_nonzeros")


def expected_store(method_cfg: dict, kind: str = "avg", output_function: str | None = None, **extra) -> dict:
    """Sidecar `made_by` entries a method's store must have (checked by ScorerInputs.features).

    The timestep budget is checked only when the method fixes it (`timesteps`); otherwise it is the
    gradients.timesteps default, which the scores stage does not see."""
    expect = {"kind": kind, "output_function": output_function or method_cfg["output_function"], **extra}
    if "timesteps" in method_cfg:
        expect["timesteps"] = method_cfg["timesteps"]
    return expect


def similarity(queries: np.ndarray, train: np.ndarray, kind: str, tiny: float = 1e-300) -> np.ndarray:
    """(n_query, n_train) dot product or cosine of flattened vectors, computed in float64 over chunks of the
    training rows (a memory-mapped store is never read whole; norms are clipped at `tiny`)."""
    if kind not in ("dot", "cosine"):
        raise ValueError(f"unknown similarity {kind!r}")
    q = np.asarray(queries, dtype=np.float64).reshape(len(queries), -1)
    if kind == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(tiny)
    out = np.empty((len(q), len(train)))
    for rows, chunk in row_chunks(train):
        x = chunk.reshape(len(chunk), -1)
        if kind == "cosine":
            x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(tiny)
        out[:, rows] = q @ x.T
    return out


def check_same_space(inputs, stores: list[tuple[str, str]], keys=SPACE) -> None:
    """Stores combined by one method must share their projection (and whatever else `keys` names)."""
    (role0, split0), *rest = stores
    ref = inputs.sidecar(role0, split0)["made_by"]
    for role, split in rest:
        made_by = inputs.sidecar(role, split)["made_by"]
        for key in keys:
            if made_by.get(key) != ref.get(key):
                raise ArtefactError(f"gradient stores {role0!r} and {role!r} differ in {key} "
                                    f"({ref.get(key)!r} vs {made_by.get(key)!r}); their features cannot be combined")


# ---------------------------------------------------------------- query_measurement (TRAK family)
#
# A method's query_measurement m (default loss) replaces its query features by P^T grad m(x_q) from the store role
# 'query' (paths.method_stores, rule gradients_measurement); the training side stays the loss store. Trajectory has
# no held-out queries: those keep the loss features (noted).


def query_target(method_cfg: dict) -> str:
    """The measured target the method's query features are gradients of (scores.py tunes lambda on it)."""
    return method_cfg.get("query_measurement", "loss")


def uses_loss_queries(method_cfg: dict, query_set: str) -> bool:
    target = query_target(method_cfg)
    return target == "loss" or (target == "trajectory" and query_set != "generated")


def query_features(method_cfg: dict, inputs, query_set: str, expect: dict) -> np.ndarray:
    """The query features of one set: the loss store's, or the query_measurement store's (same projection)."""
    if uses_loss_queries(method_cfg, query_set):
        return inputs.features("final", query_set, expect)
    check_same_space(inputs, [("final", "train"), ("query", query_set)], (*SPACE, "checkpoint", "seed_gradients"))
    return inputs.features("query", query_set, {"query_measurement": query_target(method_cfg)})


def query_notes(method_cfg: dict) -> dict[str, str]:
    if query_target(method_cfg) == "trajectory":
        return {"heldout": "loss query features: held-out images have no sampling trajectory"}
    return {}
