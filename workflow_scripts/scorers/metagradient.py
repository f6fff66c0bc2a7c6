"""Metagradient / MAGIC (METHODS.md; papers/metagradient-likelihood-attribution.txt): S[q, i] = -d m_q / d w_i at
w = 1 by reverse-mode differentiation through the whole training run (workflow_scripts.metagradient).

Computed from the dataset and the configuration alone: the full model's training (all N examples, seed
seeds.train + replicate, train.* settings) is rerun functionally with checkpoints, then one reverse pass serves all
attributed queries of both query sets (loss measurement with the measure stage's fixed draws). The scores therefore
belong to the model `train_full` makes (checked against it when the scorer inputs name its checkpoint).

Method keys:
- checkpoint_every: state checkpoint interval of the reverse pass (default ceil(sqrt(train.steps)));
- max_queries: attribute only the first n queries of EACH query set (the cost grows by about 2.6 training runs
  per query, see benchmarks/README.md). Rows of the queries not attributed are NaN -- "not attributed", never a
  number; `notes` says so. (scores.py currently rejects non-finite matrices: a partial run must be evaluated on
  the attributed rows only, see the family's notes and the report of the branch `metagradient`.)
- replicate: training seed index of the attributed model (default 0 = the full model).
There is no lambda: a single result (None, matrices).
"""
from __future__ import annotations

import numpy as np

from ..common import ArtefactError, log

DEFAULTS = {"checkpoint_every": None, "max_queries": None, "replicate": 0}


def _options(method_cfg: dict) -> dict:
    unknown = sorted(set(method_cfg) - set(DEFAULTS) - {"family"})
    if unknown:
        raise ValueError(f"metagradient: unknown method keys {unknown}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **{k: v for k, v in method_cfg.items() if k != "family"}}
    for key in ("checkpoint_every", "max_queries"):
        value = opts[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"metagradient: {key} must be a positive integer or null, got {value!r}")
    if isinstance(opts["replicate"], bool) or not isinstance(opts["replicate"], (int, np.integer)) or opts["replicate"] < 0:
        raise ValueError(f"metagradient: replicate must be a non-negative integer, got {opts['replicate']!r}")
    return opts


def selected_queries(n_queries: dict[str, int], max_queries: int | None) -> dict[str, np.ndarray]:
    """The attributed query indices of every set: the first max_queries (all when None)."""
    return {name: np.arange(n if max_queries is None else min(n, int(max_queries))) for name, n in n_queries.items()}


def notes(method_cfg: dict) -> dict[str, str]:
    n = method_cfg.get("max_queries")
    if n is None:
        return {}
    text = (f"only the first {n} queries attributed (metagradient cost); the other rows are NaN (not attributed), "
            "LDS over the attributed queries only")
    return {name: text for name in ("generated", "heldout")}


def settings(method_cfg: dict, config: dict) -> dict:
    from ..metagradient import default_every

    opts = _options(method_cfg)
    steps = int(config["train"]["steps"])
    return {"checkpoint_every": int(opts["checkpoint_every"] or default_every(steps)), "max_queries": opts["max_queries"],
            "replicate": int(opts["replicate"]), "train_steps": steps}


def check_full_model(model_path: str, config: dict, n_train: int, replicate: int, params: dict) -> float:
    """The checkpoint must come from the training we differentiated; returns the max |param difference|."""
    from ..common import load_torch
    from ..train import training_identity

    payload = load_torch(model_path)
    expected = training_identity(config, np.arange(n_train), replicate)
    if payload.get("config") != expected:
        raise ArtefactError(f"{model_path}: not the model of this training (seed, data, train settings differ); the "
                            "metagradient differentiates train.train_model on all training examples")
    diff = max(float((payload["state_dict"][n].to(p.dtype) - p.cpu()).abs().max()) for n, p in params.items())
    log.info("metagradient: recomputed final parameters vs %s: max |difference| %.3g", model_path, diff)
    if not diff < 1e-3:
        raise ArtefactError(f"{model_path}: the recomputed training ends {diff:.3g} away from this checkpoint "
                            f"(another torch version or device?); scores would not belong to this model")
    return diff


def compute(method_cfg: dict, inputs, lambdas) -> list:
    """[(None, {query set: (n_query, n_train) float32})]; rows of queries beyond max_queries are NaN."""
    from ..common import select_device
    from ..metagradient import attribute

    opts = _options(method_cfg)
    config = getattr(inputs, "config", None)
    if not config:
        raise ArtefactError("the metagradient scorer needs the full configuration in its inputs (ScorerInputs.config)")
    train = inputs.train_images()
    queries = inputs.queries()
    selected = selected_queries({name: len(images) for name, images in queries.items()}, opts["max_queries"])
    device = select_device(config["compute"])
    result = attribute(config, train, queries, selected, replicate=int(opts["replicate"]), every=opts["checkpoint_every"],
                       device=device)
    if getattr(inputs, "model_path", None):
        check_full_model(inputs.model_path, config, len(train), int(opts["replicate"]), result.final_params)
    info = result.info
    log.info("metagradient: forward %.1f s, query gradients %.1f s, reverse %.1f s (recompute %.1f s); peak RSS %.0f MB",
             info["time_forward"], info["time_query_gradients"], info["time_reverse"], info["time_recompute"],
             info["peak_rss_mb"])
    matrices = {}
    for name, images in queries.items():
        scores = np.full((len(images), len(train)), np.nan, dtype=np.float32)
        if name in result.scores:
            scores[result.indices[name]] = result.scores[name].astype(np.float32)
        if not np.isfinite(scores[selected[name]]).all():
            raise FloatingPointError(f"metagradient: non-finite scores for attributed {name} queries")
        matrices[name] = scores
    return [(None, matrices)]
