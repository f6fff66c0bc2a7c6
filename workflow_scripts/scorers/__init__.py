"""Scorer families. Each module exposes `compute(method_cfg, inputs, lambdas)` returning a list of
(lambda or None, {query_set: scores}) with scores of shape (n_query, n_train) following the
convention of docs/methods.md: S[q, i] = predicted change of measurement m_q when z_i is removed.
A module may also expose `notes(method_cfg) -> {query_set: text}` for rows that need a caveat.

Families: pixel (raw pixel dot / cosine), trak (TRAK and D-TRAK, any output function and K),
gradient_similarity (gradient dot / cosine), tracin (TracInCP and GAS over checkpoints),
normalized_if (relative and renormalised influence), journey (Journey-TRAK), das (DAS, scalar
reference form and vector-output form), clip (open_clip embeddings from local
weights; raises ScorerNotRun without them), embedding (the benchmark's own classifier features),
kfac (K-FAC / EK-FAC influence; reads the final checkpoint and its fitted curvature),
metagradient (MAGIC: -dm/dw by reverse-mode through the whole training; recomputes training from the data).
A module may also expose `settings(method_cfg, config) -> dict`, saved in chosen.json (ablation tables), and
`query_target(method_cfg) -> str`: the measured target its scores predict (default: the loss), on which the
scores stage tunes its lambda."""
from __future__ import annotations

from workflow_scripts.scorers import clip, das, embedding, gradient_similarity, journey, kfac, metagradient, normalized_if, pixel, tracin, trak
from workflow_scripts.scorers.clip import ScorerNotRun as ScorerNotRun

FAMILIES = {"pixel": pixel, "trak": trak, "gradient_similarity": gradient_similarity, "tracin": tracin,
            "normalized_if": normalized_if, "journey": journey, "das": das, "clip": clip, "embedding": embedding,
            "kfac": kfac, "metagradient": metagradient}


def get_family(name: str):
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown scorer family {name!r}; known: {sorted(FAMILIES)}") from None


def family_notes(name: str, method_cfg: dict) -> dict[str, str]:
    module = get_family(name)
    return module.notes(method_cfg) if hasattr(module, "notes") else {}


def family_settings(name: str, method_cfg: dict, config: dict) -> dict:
    module = get_family(name)
    return module.settings(method_cfg, config) if hasattr(module, "settings") else {}


def family_target(name: str, method_cfg: dict) -> str:
    """The measured target (likelihood.target_names) a method's scores predict: 'loss' unless its family says."""
    module = get_family(name)
    return module.query_target(method_cfg) if hasattr(module, "query_target") else "loss"
