"""Engine of the `metagradient` scorer: the scores of every attributed query computed in this process by the
metagradient engine (engines/magic.py), checked against the full model's checkpoint when the inputs name it. The
workflow computes them in chunk jobs instead (stage metagradient) and the scorer assembles those."""

from __future__ import annotations

import numpy as np

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import ArtefactError, load_torch, log, select_device
from workflow_scripts.engines.magic import attribute, model_inputs
from workflow_scripts.families.registry import checkpoint_identity, is_conditional
from workflow_scripts.scorers.metagradient import method_options, selected_queries


def check_full_model(model_path: str, config: dict, dataset, replicate: int, params: dict) -> float:
    """The checkpoint must come from the training we differentiated (dataset: the model inputs, magic.model_inputs);
    returns the max |param difference|."""
    payload = load_torch(model_path)
    dataset = model_inputs(dataset)
    expected = checkpoint_identity(config, dataset, np.arange(len(dataset["train_images"])), replicate)
    if payload.get("config") != expected:
        raise ArtefactError(
            f"{model_path}: not the model of this training (seed, data, train settings or base differ); the "
            "metagradient differentiates the family's training on all training examples"
        )
    diff = max(float((payload["state_dict"][n].to(p.dtype) - p.cpu()).abs().max()) for n, p in params.items())
    log.info("metagradient: recomputed final parameters vs %s: max |difference| %.3g", model_path, diff)
    if not diff < 1e-3:
        raise ArtefactError(
            f"{model_path}: the recomputed training ends {diff:.3g} away from this checkpoint "
            f"(another torch version or device?); scores would not belong to this model"
        )
    return diff


def compute(method_cfg: dict, inputs, lambdas) -> list:
    """[(None, {query set: (n_query, n_train) float32})]; rows of queries beyond max_queries are NaN."""
    opts = method_options(method_cfg)
    config = getattr(inputs, "config", None)
    if not config:
        raise ArtefactError("the metagradient scorer needs the full configuration in its inputs (ScorerInputs.config)")
    # a conditional family's replay reads the captions and labels of its model inputs, its queries their captions
    conditional = is_conditional(config["model"])
    dataset = core_data.load_dataset(inputs.dataset) if conditional else inputs.train_images()
    conditions = core_data.load_conditions(inputs.dataset, inputs.samples, inputs.extra) if conditional else None
    train = model_inputs(dataset)["train_images"]
    queries = inputs.queries()
    selected = selected_queries({name: len(images) for name, images in queries.items()}, opts["max_queries"])
    device = select_device(config["compute"])
    result = attribute(
        config,
        dataset,
        queries,
        selected,
        replicate=int(opts["replicate"]),
        every=opts["checkpoint_every"],
        device=device,
        conditions=conditions,
    )
    if getattr(inputs, "model_path", None):
        check_full_model(inputs.model_path, config, dataset, int(opts["replicate"]), result.final_params)
    info = result.info
    log.info(
        "metagradient: forward %.1f s, query gradients %.1f s, reverse %.1f s (recompute %.1f s); peak RSS %.0f MB",
        info["time_forward"],
        info["time_query_gradients"],
        info["time_reverse"],
        info["time_recompute"],
        info["peak_rss_mb"],
    )
    matrices = {}
    for name, images in queries.items():
        scores = np.full((len(images), len(train)), np.nan, dtype=np.float32)
        if name in result.scores:
            scores[result.indices[name]] = result.scores[name].astype(np.float32)
        if not np.isfinite(scores[selected[name]]).all():
            raise FloatingPointError(f"metagradient: non-finite scores for attributed {name} queries")
        matrices[name] = scores
    return [(None, matrices)]
