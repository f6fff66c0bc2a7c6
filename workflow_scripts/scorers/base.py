"""Helpers shared by the gradient-based scorer families: what a method expects of its stores, similarity."""
from __future__ import annotations

import numpy as np

from ..common import ArtefactError

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


def similarity(queries: np.ndarray, train: np.ndarray, kind: str) -> np.ndarray:
    """(n_query, n_train) dot product or cosine of flattened vectors, computed in float64."""
    q = np.asarray(queries, dtype=np.float64).reshape(len(queries), -1)
    x = np.asarray(train, dtype=np.float64).reshape(len(train), -1)
    if kind == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-300)
        x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-300)
    elif kind != "dot":
        raise ValueError(f"unknown similarity {kind!r}")
    return q @ x.T


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
