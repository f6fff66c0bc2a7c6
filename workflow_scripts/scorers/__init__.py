"""Scorer families. Each module exposes `compute(method_cfg, inputs, lambdas)` returning a list of
(lambda or None, {query_set: scores}) with scores of shape (n_query, n_train) following the
convention of METHODS.md: S[q, i] = predicted change of measurement m_q when z_i is removed."""
from __future__ import annotations

from . import pixel, trak

FAMILIES = {"pixel": pixel, "trak": trak}


def get_family(name: str):
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown scorer family {name!r}; known: {sorted(FAMILIES)}") from None
