"""Helpers shared by the gradient-based scorer families: what a method expects of its stores, similarity."""
from __future__ import annotations

import numpy as np

from ..common import ArtefactError

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
