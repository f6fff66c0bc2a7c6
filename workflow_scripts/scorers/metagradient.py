"""Metagradient / MAGIC (docs/methods.md): S[q, i] = -d m_q / d w_i at
w = 1 by reverse-mode differentiation through the whole training run (workflow_scripts.metagradient).

Computed from the dataset and the configuration alone: the full model's training (all N examples, seed
seeds.train + replicate, train.* settings) is rerun functionally with checkpoints, then one reverse pass serves all
attributed queries of both query sets (loss measurement with the measure stage's fixed draws). The scores therefore
belong to the model `train_full` makes (checked against it when the scorer inputs name its checkpoint).

Method keys:
- checkpoint_every: state checkpoint interval of the reverse pass (default ceil(sqrt(train.steps)));
- max_queries: attribute only the first n queries of EACH query set (the cost grows by about 2.6 training runs
  per query, see benchmarks/README.md). Rows of the queries not attributed are NaN -- "not attributed", never a
  number; `notes` says so, and every LDS is over the attributed queries only (lds.py).
- queries_per_job: in the workflow, the attributed queries (generated first, then held-out) are split into jobs of
  this many (rule metagradient, one forward + reverse pass each: paths.metagradient_chunks); the scores job
  assembles their chunk files (ScorerInputs.chunks). null: one job.
- replicate: training seed index of the attributed model (default 0 = the full model).
There is no lambda: a single result (None, matrices).
"""
from __future__ import annotations

import numpy as np

from workflow_scripts.core.common import ArtefactError, log
from workflow_scripts.scorers.magic import default_every
from workflow_scripts.core.common import load_torch
from workflow_scripts.core.seeds import training_identity
from workflow_scripts.core.common import load_npz
from workflow_scripts.core.common import select_device
from workflow_scripts.scorers.magic import attribute

DEFAULTS = {"checkpoint_every": None, "max_queries": None, "replicate": 0, "queries_per_job": None}


def _options(method_cfg: dict) -> dict:
    unknown = sorted(set(method_cfg) - set(DEFAULTS) - {"family"})
    if unknown:
        raise ValueError(f"metagradient: unknown method keys {unknown}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **{k: v for k, v in method_cfg.items() if k != "family"}}
    for key in ("checkpoint_every", "max_queries", "queries_per_job"):
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
    text = f"metagradient cost: only the first {n} queries of each set attributed (the other rows NaN)"
    return {name: text for name in ("generated", "heldout")}


def settings(method_cfg: dict, config: dict) -> dict:
    opts = _options(method_cfg)
    steps = int(config["train"]["steps"])
    return {"checkpoint_every": int(opts["checkpoint_every"] or default_every(steps)), "max_queries": opts["max_queries"],
            "replicate": int(opts["replicate"]), "train_steps": steps, "queries_per_job": opts["queries_per_job"]}


def check_full_model(model_path: str, config: dict, n_train: int, replicate: int, params: dict) -> float:
    """The checkpoint must come from the training we differentiated; returns the max |param difference|."""
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


def assemble(chunk_paths: list[str], queries: dict[str, np.ndarray], n_train: int,
             selected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{query set: (n_query, n_train) float32} from the chunk jobs' files; rows not attributed are NaN. The chunks
    must hold every selected query exactly once, and nothing else."""
    matrices = {name: np.full((len(images), n_train), np.nan, dtype=np.float32) for name, images in queries.items()}
    seen = {name: [] for name in queries}
    for path in chunk_paths:
        chunk = load_npz(path, ("query_sets",))
        for name in (str(n) for n in chunk["query_sets"]):
            if name not in matrices:
                raise ArtefactError(f"{path}: scores for unknown query set {name!r}")
            idx, scores = chunk[f"{name}_indices"], chunk[f"{name}_scores"]
            if scores.shape != (len(idx), n_train) or not np.isfinite(scores).all():
                raise ArtefactError(f"{path}: {name} scores of shape {scores.shape} (expected ({len(idx)}, {n_train}), "
                                    "finite); delete it and rerun")
            matrices[name][idx] = scores
            seen[name].extend(int(i) for i in idx)
    for name in queries:
        if sorted(seen[name]) != sorted(int(i) for i in selected[name]):
            raise ArtefactError(f"the chunk files hold {name} queries {sorted(seen[name])}, expected exactly "
                                f"{selected[name].tolist()} (max_queries changed? rerun the metagradient jobs)")
    log.info("metagradient: assembled %d chunk file(s): %s queries attributed", len(chunk_paths),
             {name: len(v) for name, v in seen.items()})
    return matrices


def compute(method_cfg: dict, inputs, lambdas) -> list:
    """[(None, {query set: (n_query, n_train) float32})]; rows of queries beyond max_queries are NaN.

    With chunk files (inputs.chunks, the workflow) they are assembled; otherwise the scores are computed here."""
    opts = _options(method_cfg)
    if getattr(inputs, "chunks", None):
        queries = inputs.queries()
        selected = selected_queries({name: len(images) for name, images in queries.items()}, opts["max_queries"])
        return [(None, assemble(inputs.chunks, queries, len(inputs.train_images()), selected))]
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
