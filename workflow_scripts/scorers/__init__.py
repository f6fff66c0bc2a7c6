"""Scorer families and their registry.

Each module of this package declares one or more `Scorer` subclasses (scorers/base.py); they are discovered here,
so a new scorer family is one new module (plus its params.yaml entry and its test) and nothing else. Every scorer
follows one score convention: S[q, i] = predicted change of the query's measurement m_q when training example z_i
is removed (docs/methods.md).

Families: pixel (raw pixel dot / cosine), nda (patch posteriors of the empirical optimal denoiser, no model), trak
(TRAK and D-TRAK, any output function and K), gradient_similarity (gradient dot / cosine), tracin (TracInCP and GAS
over checkpoints), normalized_if (relative and renormalised influence), journey (Journey-TRAK), das (DAS, scalar and
vector-output forms), clip (open_clip embeddings from local weights; ScorerNotRun without them), embedding (the
benchmark's own classifier features), kfac (K-FAC / EK-FAC influence), metagradient (MAGIC: -dm/dw by reverse mode
through the whole training), unlearning (AbU / AbU+: the loss rise of each training image after one Fisher-preconditioned
step that unlearns the query).
"""

from __future__ import annotations

import importlib
import pkgutil

from workflow_scripts.scorers.base import Scorer, ScorerNotRun, StoreNeed

__all__ = ["SCORERS", "Scorer", "ScorerNotRun", "StoreNeed", "get_scorer"]


def _discover() -> dict[str, Scorer]:
    """{family: Scorer instance} of every Scorer subclass defined in a module of this package."""
    found: dict[str, Scorer] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if not (
                isinstance(obj, type) and issubclass(obj, Scorer) and obj.__module__ == module.__name__ and obj.family
            ):
                continue
            if obj.family in found:
                raise TypeError(
                    f"scorer family {obj.family!r} is declared twice ({type(found[obj.family]).__module__}, "
                    f"{module.__name__})"
                )
            if not obj.schemas:
                raise TypeError(f"scorer family {obj.family!r} ({module.__name__}) declares no method schema")
            if obj.shared_pass and (obj.chunk_jobs or obj.engine is None):
                raise TypeError(
                    f"scorer family {obj.family!r} ({module.__name__}): a shared_pass scorer needs an engine with "
                    "compute_family and no chunk jobs"
                )
            if any("ensemble" in schema["properties"] for schema in obj.schemas) != obj.takes_ensemble:
                raise TypeError(
                    f"scorer family {obj.family!r} ({module.__name__}): an `ensemble` key in its schemas and "
                    "takes_ensemble must go together"
                )
            found[obj.family] = obj()
    return found


SCORERS = _discover()


def get_scorer(family: str) -> Scorer:
    try:
        return SCORERS[family]
    except KeyError:
        raise ValueError(f"unknown scorer family {family!r}; known: {sorted(SCORERS)}") from None
