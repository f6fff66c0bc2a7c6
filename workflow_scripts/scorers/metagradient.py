"""Metagradient / MAGIC (docs/methods.md): S[q, i] = -d m_q / d w_i at
w = 1 by reverse-mode differentiation through the whole training run (engine: workflow_scripts/engines/metagradient.py, on workflow_scripts/engines/magic.py).

Computed from the model inputs and the configuration alone: the full model's training (all N examples, seed
seeds.train + replicate, train.* settings; the latent family: its LoRA fine-tuning) is rerun functionally with
checkpoints, then one reverse pass serves all attributed queries of both query sets (loss measurement with the
measure stage's fixed draws, under the query's caption for the latent family). The scores therefore
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

import math

import numpy as np

from workflow_scripts.core.common import ArtefactError, load_npz, log
from workflow_scripts.core.contracts import EXTRA_QUERY_SET, QUERY_SETS
from workflow_scripts.scorers.base import POSINT, Scorer, method_schema


def default_every(steps: int) -> int:
    """The reverse pass's default state checkpoint interval: ceil(sqrt(train.steps))."""
    return max(1, math.ceil(math.sqrt(steps)))


DEFAULTS = {"checkpoint_every": None, "max_queries": None, "replicate": 0, "queries_per_job": None}


def method_options(method_cfg: dict) -> dict:
    unknown = sorted(set(method_cfg) - set(DEFAULTS) - {"family"})
    if unknown:
        raise ValueError(f"metagradient: unknown method keys {unknown}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **{k: v for k, v in method_cfg.items() if k != "family"}}
    for key in ("checkpoint_every", "max_queries", "queries_per_job"):
        value = opts[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"metagradient: {key} must be a positive integer or null, got {value!r}")
    if (
        isinstance(opts["replicate"], bool)
        or not isinstance(opts["replicate"], (int, np.integer))
        or opts["replicate"] < 0
    ):
        raise ValueError(f"metagradient: replicate must be a non-negative integer, got {opts['replicate']!r}")
    return opts


def selected_queries(n_queries: dict[str, int], max_queries: int | None) -> dict[str, np.ndarray]:
    """The attributed query indices of every set: the first max_queries (all when None) of the generated and held-out
    sets; none of the user's extra queries (EXTRA_NOTE)."""
    return {
        name: np.arange(0 if name not in QUERY_SETS else n if max_queries is None else min(n, int(max_queries)))
        for name, n in n_queries.items()
    }


# Each attributed query costs a reverse pass through the whole training, so the DAG plans the metagradient's jobs
# from the configured sizes of the generated and held-out sets; the extra queries (a folder's count) are left out.
EXTRA_NOTE = "metagradient: the extra queries are not attributed (their rows NaN); it attributes generated and held-out"


def notes(method_cfg: dict) -> dict[str, str]:
    n = method_cfg.get("max_queries")
    if n is None:
        return {EXTRA_QUERY_SET: EXTRA_NOTE}
    text = f"metagradient cost: only the first {n} queries of each set attributed (the other rows NaN)"
    return {**{name: text for name in QUERY_SETS}, EXTRA_QUERY_SET: EXTRA_NOTE}


def settings(method_cfg: dict, config: dict) -> dict:
    opts = method_options(method_cfg)
    steps = int(config["train"]["steps"])
    return {
        "checkpoint_every": int(opts["checkpoint_every"] or default_every(steps)),
        "max_queries": opts["max_queries"],
        "replicate": int(opts["replicate"]),
        "train_steps": steps,
        "queries_per_job": opts["queries_per_job"],
    }


def assemble(
    chunk_paths: list[str], queries: dict[str, np.ndarray], n_train: int, selected: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
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
                raise ArtefactError(
                    f"{path}: {name} scores of shape {scores.shape} (expected ({len(idx)}, {n_train}), "
                    "finite); delete it and rerun"
                )
            matrices[name][idx] = scores
            seen[name].extend(int(i) for i in idx)
    for name in queries:
        if sorted(seen[name]) != sorted(int(i) for i in selected[name]):
            raise ArtefactError(
                f"the chunk files hold {name} queries {sorted(seen[name])}, expected exactly "
                f"{selected[name].tolist()} (max_queries changed? rerun the metagradient jobs)"
            )
    log.info(
        "metagradient: assembled %d chunk file(s): %s queries attributed",
        len(chunk_paths),
        {name: len(v) for name, v in seen.items()},
    )
    return matrices


OPTIONAL_POSINT = {"oneOf": [POSINT, {"type": "null"}]}


class Metagradient(Scorer):
    family = "metagradient"
    schemas = (
        method_schema(
            "metagradient",
            checkpoint_every=OPTIONAL_POSINT,
            max_queries=OPTIONAL_POSINT,
            replicate={"type": "integer", "minimum": 0},
            queries_per_job=OPTIONAL_POSINT,
        ),
    )
    model_families = ("ddpm", "latent")  # latent: through the LoRA fine-tuning, each query under its caption
    refused_reason = "it replays the family's training step by step, and the VE-SDE's score matching has no replay"
    config_keys = ("train.steps",)  # its settings (checkpoint interval); the scores come from its chunk jobs
    chunk_jobs = True
    unscored_sets = (EXTRA_QUERY_SET,)  # EXTRA_NOTE
    engine = "workflow_scripts.engines.metagradient"

    def compute(self, method_cfg, inputs, lambdas):
        """[(None, {query set: (n_query, n_train) float32})]; rows of queries beyond max_queries are NaN. With chunk
        files (inputs.chunks, the workflow) they are assembled; otherwise the engine computes the scores here."""
        opts = method_options(method_cfg)
        if getattr(inputs, "chunks", None):
            queries = inputs.queries()
            selected = selected_queries({name: len(images) for name, images in queries.items()}, opts["max_queries"])
            return [(None, assemble(inputs.chunks, queries, len(inputs.train_images()), selected))]
        return super().compute(method_cfg, inputs, lambdas)

    def check(self, name, method_cfg, config):
        """It needs its fixed-seed ground truth, made with the full model's seed (replicate 0)."""
        if "fixed_seed" not in config:
            raise ValueError(
                f"scores.methods.{name}: a metagradient method needs the section fixed_seed "
                "(loo_sets, loo_fraction: its fixed-seed ground truth)"
            )
        if method_cfg.get("replicate", 0) != 0:
            raise ValueError(
                f"scores.methods.{name}.replicate: the fixed-seed ground truth retrains with the full "
                "model's seed (replicate 0); other replicates are library-only"
            )

    def notes(self, method_cfg):
        return notes(method_cfg)

    def settings(self, method_cfg, config):
        return settings(method_cfg, config)
