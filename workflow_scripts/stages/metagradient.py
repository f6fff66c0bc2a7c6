"""Stage `metagradient`: one job's chunk of queries attributed by the metagradient engine (engines/magic.py),
written to scores/<method>/chunks/chunk<NNN>.npz; the scores stage assembles the chunks.
"""

from __future__ import annotations

import time

import numpy as np

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import log, save_npz, select_device
from workflow_scripts.core.data import load_conditions, load_queries
from workflow_scripts.dag import paths
from workflow_scripts.engines.magic import Attribution, attribute
from workflow_scripts.engines.metagradient import check_full_model
from workflow_scripts.families.registry import is_conditional
from workflow_scripts.scorers.metagradient import method_options


# ----------------------------------------------------------------------------------------------------------------
# Stage `metagradient`: one job per chunk of queries (paths.metagradient_chunks); the scores stage assembles them
# ----------------------------------------------------------------------------------------------------------------
def save_chunk(path, method: str, result: Attribution) -> None:
    import json

    arrays = {}
    for name in result.scores:
        arrays[f"{name}_indices"] = result.indices[name]
        arrays[f"{name}_scores"] = result.scores[name].astype(np.float32)
        arrays[f"{name}_values"] = np.asarray(result.values[name], np.float64)
    info = {k: v for k, v in result.info.items() if isinstance(v, (int, float, str))}
    save_npz(
        path,
        method=np.array(method),
        query_sets=np.array(list(result.scores)),
        info=np.array(json.dumps(info)),
        **arrays,
    )


def add_arguments(parser) -> None:
    parser.add_argument("--method", required=True)
    parser.add_argument("--dataset", required=True, help="the model inputs: dataset.npz, or latents.npz (latent)")
    parser.add_argument("--samples", required=True)
    parser.add_argument("--model", help="the full model's checkpoint: the recomputed training must end there")
    parser.add_argument("--queries", nargs="+", required=True, metavar="SET=i,j,...", help="queries of this chunk")
    parser.add_argument("--out", required=True)


def run(args, config: dict) -> None:
    methods = config["scores"]["methods"]
    if args.method not in methods or methods[args.method]["family"] != "metagradient":
        raise ValueError(f"{args.method!r} is not a metagradient method of scores.methods")
    opts = method_options(methods[args.method])
    dataset, queries = core_data.load_dataset(args.dataset), load_queries(args.dataset, args.samples)
    # a conditional family's queries are measured under their captions, as in the measure stage
    conditions = load_conditions(args.dataset, args.samples) if is_conditional(config["model"]) else None
    selection = paths.parse_query_selection(args.queries)
    t0 = time.perf_counter()
    result = attribute(
        config,
        dataset,
        queries,
        selection,
        replicate=int(opts["replicate"]),
        every=opts["checkpoint_every"],
        device=select_device(config["compute"]),
        conditions=conditions,
    )
    if args.model:
        check_full_model(args.model, config, dataset, int(opts["replicate"]), result.final_params)
    for name, scores in result.scores.items():
        if not np.isfinite(scores).all():
            raise FloatingPointError(f"metagradient: non-finite scores for attributed {name} queries")
    result.info["time_total"] = time.perf_counter() - t0
    save_chunk(args.out, args.method, result)
    info = result.info
    log.info(
        "metagradient %s %s: %.1f s (forward %.1f s, reverse %.1f s of which recompute %.1f s); peak RSS %.0f MB",
        args.method,
        {k: v.tolist() for k, v in selection.items()},
        info["time_total"],
        info["time_forward"],
        info["time_reverse"],
        info["time_recompute"],
        info["peak_rss_mb"],
    )
