"""Every artefact path as a pure function of the configuration and wildcards.

Imported by the Snakefile (so keep it free of heavy imports) and by tests.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from workflow_scripts.core.contracts import (  # the rules read them from here
    RESIDUAL,
    has_extra_queries,
    measurement_sets,
    query_sets,
    store_splits,
)
from workflow_scripts.core.store import PROVENANCE_KEYS
from workflow_scripts.scorers import StoreNeed, get_scorer
from workflow_scripts.scorers.base import ensemble_size, member_roles

SECTIONS = {  # the config keys each stage reads; a rule reruns exactly when one of them changes
    "queries": ("queries", "data.dataset"),  # data.dataset: the intensity levels the extra queries are brought to
    "data": ("data", "lds.n_subsets", "lds.n_tuning", "lds.fraction", "seeds.split", "seeds.subsets"),
    "train": ("data", "model", "diffusion", "train", "seeds.train", "compute"),
    "classifier": ("classifier", "seeds.classifier", "compute"),
    "sample": ("model", "diffusion", "sample", "seeds.sample", "compute"),
    "measure": ("model", "diffusion", "measure", "seeds.measure", "data.dataset", "compute"),  # dataset: ELBO levels
    "gradients": ("model", "diffusion", "gradients", "seeds.gradients", "seeds.projection", "compute"),
    # Journey-TRAK's store: the gradients stage's keys (+ the sampler's guidance for the latent family, below)
    "gradients_journey": ("model", "diffusion", "gradients", "seeds.gradients", "seeds.projection", "compute"),
    # query features of a likelihood measurement (a TRAK-family query_measurement): also the measurement's draws
    "gradients_measurement": (
        "model",
        "diffusion",
        "gradients",
        "seeds.gradients",
        "seeds.projection",
        "measure",
        "seeds.measure",
        "data.dataset",
        "compute",
    ),
    # the variant (fisher_type, kfac_approx, ekfac) comes from the wildcard; scoring keys do not refit
    "curvature": (
        "model",
        "diffusion",
        "kfac.draws",
        "kfac.fisher_mc_samples",
        "kfac.separate_weight_and_bias",
        "kfac.batch_size",
        "seeds.gradients",
        "compute",
    ),
    "scores": ("scores", "lds.n_subsets", "lds.n_seeds"),
    "evaluate": ("lds", "seeds.bootstrap"),  # the targets come from the measurement files (their 'targets')
    # counterfactual retraining: selection of the removed examples, regeneration + measurement, table
    "counterfactual": ("counterfactual.k", "seeds.counterfactual"),
    # regenerate measures the loss only: the other measure.* keys (likelihood targets) do not rerun it
    "regenerate": (
        "model",
        "diffusion",
        "sample",
        "seeds.sample",
        "measure.n_timesteps",
        "measure.n_noise",
        "measure.batch_size",
        "seeds.measure",
        "compute",
    ),
    "counterfactual_evaluate": ("counterfactual", "seeds.bootstrap", "compute"),
    "figures": ("figures", "lds.n_subsets", "lds.n_seeds"),
    # metagradient (MAGIC): one job per chunk of queries (the method's own keys are added per method,
    # metagradient_config), its fixed-seed ground truth (sets, then train_subset kind fixed_seed + measure), its table
    "metagradient": (
        "data",
        "model",
        "diffusion",
        "train",
        "seeds.train",
        "measure.n_timesteps",
        "measure.n_noise",
        "measure.batch_size",
        "seeds.measure",
        "compute",
    ),  # the loss target only, as regenerate
    "fixed_seed": ("fixed_seed", "seeds.subsets"),
    # the latent family: the miniature base pipeline (model.pipeline null) and the data set's VAE latents
    "base_pipeline": ("data", "model.pipeline", "base", "diffusion", "seeds.train", "compute"),
    "encode": ("data", "model.pipeline", "model.base_dtype", "measure.batch_size", "compute"),
    "metagradient_evaluate": ("lds", "seeds.bootstrap", "fixed_seed"),
}


# Extra keys a stage reads for a model family (vesde: the data's number of levels: bits/dim, dequantisation; measure
# reads it for every family); the ddpm stages' configurations stay as they are. likelihood_sanity runs for vesde only (rule all: family_targets).
FAMILY_SECTIONS = {
    # the journey store re-noises the guided x0-prediction its sampler stepped with
    "latent": {"gradients_journey": ("sample.guidance_scale",)},
    "vesde": {
        "regenerate": ("data.dataset",),
        "likelihood_sanity": ("data.dataset", "model", "measure", "seeds.measure", "compute"),
    },
}


def select(config: dict, keys) -> dict:
    """The sub-configuration holding exactly the given (dotted) keys; optional keys absent from config are left out."""
    selected: dict = {}
    for dotted in keys:
        *parents, leaf = dotted.split(".")
        source, target = config, selected
        for key in parents:
            source, target = source.get(key, {}), target.setdefault(key, {})
        if leaf in source:
            target[leaf] = source[leaf]
    return selected


def stage_keys(config: dict, stage: str) -> tuple[str, ...]:
    """The config keys a stage reads: SECTIONS plus those of the model family (FAMILY_SECTIONS)."""
    family = config["model"].get("family", "ddpm")
    extra = FAMILY_SECTIONS.get(family, {}).get(stage, ())
    if stage not in SECTIONS and not extra:
        raise ValueError(f"stage {stage!r} does not run for model.family {family}")
    return (*SECTIONS.get(stage, ()), *extra)


def stage_config(config: dict, stage: str) -> str:
    """JSON of the keys a stage reads (passed on its command line as --config)."""
    return json.dumps(select(config, stage_keys(config, stage)), sort_keys=True, separators=(",", ":"))


def family_targets(config: dict) -> list[str]:
    """Extra targets of rule all for the model family: the bits/dim sanity check of a vesde model."""
    if config["model"].get("family", "ddpm") != "vesde":
        return []
    return [table_file(config, "bpd_sanity"), figure_file(config, "bpd_sanity")]


def scores_config(config: dict, method: str) -> str:
    """JSON config of one method's scores job: the scores stage's keys with only this method, plus the keys its
    scorer declares (Scorer.config_keys); editing one method reruns only that method's job."""
    scorer = get_scorer(config["scores"]["methods"][method]["family"])
    # a method reading gradient stores also gets what it checks them against (core/store.py: store_provenance)
    provenance = PROVENANCE_KEYS if method_stores(config, method) else ()
    selected = select(config, (*SECTIONS["scores"], *scorer.config_keys, *provenance))
    selected["scores"] = {**selected["scores"], "methods": {method: config["scores"]["methods"][method]}}
    return json.dumps(selected, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------- scores jobs
#
# A method's scores come from rule `scores` (one job per method), unless its scorer declares shared_pass (K-FAC):
# then every method of that family is scored by ONE job of rule scores_<family>_family, whose outputs are each
# method's usual files (scores/<method>/...), so every reader of scores is the same either way.


def shared_pass_families(config: dict) -> dict[str, list[str]]:
    """{family: its methods, in scores.methods order} of the shared_pass scorer families the configuration uses."""
    out: dict[str, list[str]] = {}
    for method, m in config["scores"]["methods"].items():
        if get_scorer(m["family"]).shared_pass:
            out.setdefault(m["family"], []).append(method)
    return out


def separate_methods(config: dict) -> list[str]:
    """The methods rule `scores` computes, one job each: those of no shared_pass family."""
    shared = {m for methods in shared_pass_families(config).values() for m in methods}
    return [m for m in config["scores"]["methods"] if m not in shared]


def scores_method_pattern(config: dict) -> str:
    """Rule `scores`' {method} wildcard: exactly separate_methods (a pattern that matches nothing without any)."""
    methods = separate_methods(config)
    return "|".join(re.escape(m) for m in methods) if methods else "(?!)"


def family_scores_config(config: dict, family: str) -> str:
    """JSON config of a shared_pass family's job: scores_config's keys with every method of the family (editing one
    of them reruns the family's job)."""
    methods = shared_pass_families(config)[family]
    scorer = get_scorer(family)
    stores = [m for m in methods if method_stores(config, m)]
    if stores:  # the family job passes no per-method stores (its rule has no --features)
        raise ValueError(f"scores.methods {stores}: a shared_pass family ({family}) cannot read gradient stores")
    selected = select(config, (*SECTIONS["scores"], *scorer.config_keys))
    selected["scores"] = {**selected["scores"], "methods": {m: config["scores"]["methods"][m] for m in methods}}
    return json.dumps(selected, sort_keys=True, separators=(",", ":"))


def family_score_files(config: dict, family: str) -> dict[str, list[str]]:
    """The outputs of a shared_pass family's job, by kind (rule scores' outputs, for each of its methods)."""
    methods = shared_pass_families(config)[family]
    return {
        "matrices": score_matrices(config, methods),
        "sweep": [scores_file(config, m, "sweep.csv") for m in methods],
        "sweep_figure": [scores_file(config, m, "sweep.png") for m in methods],
        "chosen": chosen_files(config, methods),
    }


def family_model_inputs(config: dict, family: str) -> list[str]:
    """The model files of every method of a shared_pass family (each once)."""
    methods = shared_pass_families(config)[family]
    return sorted({f for m in methods for f in method_model_inputs(config, m).values()})


def family_scores_args(config: dict, family: str) -> str:
    """--method, --out-dir and the model-file options of a shared_pass family's job: an option whose file is the same
    for every method is given once, else once per method in --method order (the scores stage's per_method)."""
    methods = shared_pass_families(config)[family]
    args = [
        f"--method {' '.join(methods)}",
        "--out-dir " + " ".join(os.path.dirname(scores_file(config, m)) for m in methods),
    ]
    per_method = [method_model_inputs(config, m) for m in methods]
    for option in per_method[0]:
        files = [inputs[option] for inputs in per_method]
        args.append(f"--{option} " + " ".join(files if len(set(files)) > 1 else files[:1]))
    return " ".join(args)


def family_log_file(config: dict, family: str) -> str:
    return log_file(config, "scores_family").replace("{family}", family)


def root(config: dict) -> str:
    return f"results/{config['benchmark']}"


# ---------------------------------------------------------------- artefact paths, by kind
#
# The one place a path is spelled: the rules and the functions below call these. A wildcard argument left at its
# default ("{method}", ...) gives the rules' wildcard template; a value gives a concrete path.


# data
def dataset_file(config: dict) -> str:
    return f"{root(config)}/data/dataset.npz"


def latents_file(config: dict) -> str:
    """The latent family's model inputs: dataset.npz's arrays with the images replaced by VAE latents (rule encode)."""
    return f"{root(config)}/data/latents.npz"


def model_inputs_file(config: dict) -> str:
    """What the model trains on and is differentiated at: the data stage's images, or the latent family's latents."""
    return latents_file(config) if config["model"].get("family") == "latent" else dataset_file(config)


def extra_queries_file(config: dict) -> str:
    """The user's own query images (queries.extra) at the data set's resolution (rule extra_queries)."""
    return f"{root(config)}/data/extra_queries.npz"


def extra_latents_file(config: dict) -> str:
    """The latent family's extra queries: their VAE latents and caption indices (rule encode_extra)."""
    return f"{root(config)}/data/extra_latents.npz"


def extra_inputs(config: dict) -> list[str]:
    """The extra queries as the model takes them (the latent family: latents), as a rule's input: [] without
    queries.extra, so every rule reads the same either way."""
    if not has_extra_queries(config):
        return []
    return [extra_latents_file(config) if config["model"].get("family") == "latent" else extra_queries_file(config)]


def extra_images(config: dict) -> list[str]:
    """The extra queries as images (what the figures show and image-space scorers compare): [] without them."""
    return [extra_queries_file(config)] if has_extra_queries(config) else []


def extra_arg(files, flag: str = "--extra-queries") -> str:
    """A stage's command-line option for an extra-queries input (extra_inputs / extra_images): '' when empty."""
    files = list(files)
    return f"{flag} {files[0]}" if files else ""


def extra_scores_args(extra, extra_images) -> str:
    """The scores stage's options for the extra queries: as the model takes them and as images."""
    return " ".join(a for a in (extra_arg(extra), extra_arg(extra_images, "--extra-images")) if a)


def base_pipeline_dir(config: dict) -> str:
    """The latent family's base pipeline: model.pipeline (a local diffusers directory), or the miniature base the
    DAG pretrains (rule base_pipeline) when it is null."""
    return config["model"].get("pipeline") or f"{root(config)}/base_pipeline"


def base_pipeline_inputs(config: dict) -> list[str]:
    """The encode rule's dependency on the base: the rule base_pipeline's directory, or nothing for a given one
    (a missing model.pipeline directory fails the encode job, naming it and how to fetch it)."""
    return [] if config["model"].get("pipeline") else [base_pipeline_dir(config)]


def subsets_file(config: dict) -> str:
    return f"{root(config)}/data/subsets.npz"


# models
def full_model(config: dict) -> str:
    return f"{root(config)}/models/full/model.pt"


def full_checkpoint(config: dict, checkpoint: str) -> str:
    """An intermediate checkpoint of the full model: checkpoint 'step<N>' (checkpoint_name)."""
    return f"{root(config)}/models/full/checkpoints/{checkpoint}.pt"


def ensemble_member_model(config: dict, member: str = "{member}") -> str:
    """Ensemble member k (member<k>, k >= 1; member 0 is the full model): the full training set, training seed
    seeds.train + k (rule train_member; scorers/base.py ensembles)."""
    return f"{root(config)}/models/ensemble/{member}/model.pt"


def ensemble_members(config: dict) -> list[str]:
    """member1 .. member<K-1> for the largest `ensemble: K` of any method ([] without ensembles)."""
    size = max((ensemble_size(m) for m in config["scores"]["methods"].values() if m), default=1)
    return member_roles(size)[1:]


def member_replicate(member: str) -> int:
    m = re.fullmatch(r"member(\d+)", member)
    if m is None or int(m[1]) < 1:
        raise ValueError(f"bad ensemble member {member!r}: expected member<k> with k >= 1")
    return int(m[1])


def classifier_model(config: dict) -> str:
    return f"{root(config)}/models/classifier.pt"


def retraining_file(config: dict, kind: str, name: str, file: str) -> str:
    """A file in a retraining's directory ("retrainings" below): its model.pt, a counterfactual one's members.npy."""
    return f"{root(config)}/{kind}/{name}/{file}"


def retrained_model(config: dict, kind: str = "{kind}", name: str = "{name}") -> str:
    return retraining_file(config, kind, name, "model.pt")


def subset_model_name(subset: str | int = "{subset}", replicate: str | int = "{replicate}") -> str:
    return f"subset{subset}_seed{replicate}"


def subset_model(config: dict, name: str = subset_model_name()) -> str:
    """An LDS retraining's model (retraining kind models)."""
    return retrained_model(config, "models", name)


# samples
def samples_file(config: dict) -> str:
    return f"{root(config)}/samples/generated.npz"


# measurements
def measurement_file(config: dict, name: str = subset_model_name()) -> str:
    """The measurement of an LDS retraining (rule measure)."""
    return f"{root(config)}/measurements/{name}.npz"


# gradients: a store is a directory of <split>.npy features with <split>.json sidecars (core/store.py)
def gradients_dir(config: dict, checkpoint: str = "{checkpoint}", tag: str = "{tag}") -> str:
    return f"{root(config)}/gradients/{checkpoint}/{tag}"


def measurement_gradients_dir(
    config: dict, checkpoint: str = "{checkpoint}", tag: str = "{tag}", target: str = "{target}"
) -> str:
    """Query features of a likelihood measurement, inside the loss store whose projection they share."""
    return f"{gradients_dir(config, checkpoint, tag)}/measurement_{target}"


def store_file(directory: str, split: str, ext: str = "npy") -> str:
    return f"{directory}/{split}.{ext}"


def gradients_file(
    config: dict, split: str, ext: str = "npy", checkpoint: str = "{checkpoint}", tag: str = "{tag}"
) -> str:
    return store_file(gradients_dir(config, checkpoint, tag), split, ext)


def measurement_gradients_file(
    config: dict,
    split: str,
    ext: str = "npy",
    checkpoint: str = "{checkpoint}",
    tag: str = "{tag}",
    target: str = "{target}",
) -> str:
    return store_file(measurement_gradients_dir(config, checkpoint, tag, target), split, ext)


# curvature
def curvature_file(config: dict, variant: str = "{variant}") -> str:
    return f"{root(config)}/curvature/{variant}.pt"


# scores
def scores_file(config: dict, method: str = "{method}", name: str = "chosen.json") -> str:
    """A file of a method's scores job: chosen.json (what every consumer waits for), sweep.csv, sweep.png, the
    <query set>.npy matrices."""
    return f"{root(config)}/scores/{method}/{name}"


def score_matrix_files(config: dict, method: str = "{method}") -> list[str]:
    """The score matrices <query_set>.npy the scores stage writes beside chosen.json (all NaN: a method it could not
    run, whose chosen.json says why)."""
    return [scores_file(config, method, f"{name}.npy") for name in query_sets(config)]


def metagradient_chunk_file(config: dict, method: str = "{method}", chunk: str = "{chunk}") -> str:
    """The scores of one chunk job (chunk<NNN>) of a metagradient method, which its scores job assembles."""
    return scores_file(config, method, f"chunks/{chunk}.npz")


# tables
def table_stem(config: dict, name: str) -> str:
    """A table without extension: a stage writes its formats side by side (the rules' multiext)."""
    return f"{root(config)}/tables/{name}"


def table_file(config: dict, name: str, ext: str = ".md") -> str:
    return table_stem(config, name) + ext


# figures
def figure_file(config: dict, name: str, ext: str = ".png") -> str:
    return f"{root(config)}/figures/{name}{ext}"


# counterfactual: everything of one query lives in its retraining's directory (kind counterfactual)
def counterfactual_file(config: dict, name: str, method: str = "{method}", query: str = "q{query}") -> str:
    return retraining_file(config, "counterfactual", f"{method}/{query}", name)


# fixed_seed
def fixed_seed_sets_file(config: dict) -> str:
    return f"{root(config)}/fixed_seed/sets.npz"


def fixed_seed_measurement(config: dict, name: str = "{name}") -> str:
    return f"{root(config)}/fixed_seed/{name}/measurement.npz"


# logs, by rule (gradients_journey writes the gradients one: their tags never overlap)
LOGS = {
    "data": "data",
    "classifier": "classifier",
    "train_full": "train/full",
    "train_member": "train/models/{member}",  # beside the LDS retrainings' logs: the same DVC stage's outs
    "train_subset": "train/{kind}/{name}",
    "sample": "sample",
    "measure": f"measure/{subset_model_name()}",
    "measure_subset": "measure/subset{subset}",  # jobs.measure: subset
    "train_subset_seeds": "train/models/subset{subset}",  # jobs.train: subset
    "gradients": "gradients/{checkpoint}/{tag}",
    "gradients_measurement": "gradients/{checkpoint}/{tag}/measurement_{target}",
    "curvature": "curvature/{variant}",
    "scores": "scores/{method}",
    "scores_family": "scores/{family}_family",
    "metagradient": "scores/{method}/{chunk}",
    "counterfactual": "counterfactual/{method}/q{query}.select",
    "regenerate": "counterfactual/{method}/q{query}.regenerate",
    "counterfactual_evaluate": "counterfactual/evaluate",
    "evaluate": "evaluate",
    "figures": "figures",
    "likelihood_sanity": "likelihood_sanity",
    "fixed_seed_sets": "fixed_seed/sets",
    "measure_fixed_seed": "fixed_seed/{name}.measure",
    "metagradient_evaluate": "metagradient_evaluate",
    "base_pipeline": "base_pipeline",
    "encode": "encode",
    "extra_queries": "extra_queries",
    "encode_extra": "encode_extra",
}


def log_file(config: dict, rule: str) -> str:
    """The log of a rule's jobs (a template in the rule's wildcards)."""
    return f"{root(config)}/logs/{LOGS[rule]}.log"


def chosen_files(config: dict, methods) -> list[str]:
    return [scores_file(config, method) for method in methods]


def score_matrices(config: dict, methods) -> list[str]:
    """The score matrices of the given methods (the stages that read them declare them as inputs)."""
    return [f for method in methods for f in score_matrix_files(config, method)]


def measure_per_subset(config: dict) -> bool:
    """jobs.measure: subset -- one measure job per LDS subset, measuring every seed (rules/measure.smk)."""
    return config.get("jobs", {}).get("measure", "model") == "subset"


def train_per_subset(config: dict) -> bool:
    """jobs.train: subset -- one job per LDS subset trains every seed's model (rules/train.smk)."""
    return config.get("jobs", {}).get("train", "model") == "subset"


def retraining_kind_pattern(config: dict) -> str:
    """The retraining kinds of rule train_subset: all, or all but the LDS models when they are packed per subset."""
    return r"counterfactual|fixed_seed" if train_per_subset(config) else RETRAINING_KIND_PATTERN


def subset_seed_names(config: dict, subset: str = "{subset}") -> list[str]:
    """The LDS retrainings of one subset, one per seed (a template in {subset} by default)."""
    return [subset_model_name(subset, s) for s in range(config["lds"]["n_seeds"])]


def subset_model_names(config: dict) -> list[str]:
    """Retrained models, subset-major: subset000_seed0, subset000_seed1, ..."""
    lds = config["lds"]
    return [subset_model_name(f"{j:03d}", s) for j in range(lds["n_subsets"]) for s in range(lds["n_seeds"])]


def checkpoint_steps(config: dict) -> list[int]:
    """Intermediate checkpoints of the full model (the final step included), for TracInCP."""
    every, steps = config["train"]["checkpoint_every"], config["train"]["steps"]
    return sorted({*range(every, steps + 1, every), steps})


def full_checkpoints(config: dict) -> list[str]:
    return [full_checkpoint(config, name) for name in checkpoint_names(config)]


def measurement_files(config: dict) -> list[str]:
    return [measurement_file(config, name) for name in subset_model_names(config)]


# ---------------------------------------------------------------- retrainings (rule train_subset)
#
# One rule trains every model that is not the full one: results/<benchmark>/<kind>/<name>/model.pt with
#   kind models,         name subset<j>_seed<s>:  LDS subset j (membership from data/subsets.npz), seed seeds.train + s
#   kind counterfactual, name <method>/q<NNN>:    the training set without what `method` names for generated query
#                                                 NNN (membership from its members.npy), the full model's seed
# (Two wildcards, so that a cluster profile can group the two kinds separately: "retrain-{kind}".)
#   kind fixed_seed,     name subset<j> | loo<k>: the metagradient's ground truth: ALL training examples, those outside
#                                                 LDS subset j / leave-out set k weighted 0 (fixed_seed/sets.npz), the
#                                                 full model's seed and data order
RETRAINING_KIND_PATTERN = r"models|counterfactual|fixed_seed"


RETRAINING_NAME_PATTERN = r"subset\d+_seed\d+|[A-Za-z0-9_-]+/q\d+|subset\d+|loo\d+"


_LDS_RETRAINING = re.compile(r"subset(?P<subset>\d+)_seed(?P<replicate>\d+)")


_COUNTERFACTUAL_RETRAINING = re.compile(r"(?P<method>[A-Za-z0-9_-]+)/q(?P<query>\d+)")


_FIXED_SEED_RETRAINING = re.compile(r"subset\d+|loo\d+")


RANDOM_BASELINE = "random"  # the counterfactual baseline: k random training examples removed


def _retraining(kind: str, name: str):
    pattern = {
        "models": _LDS_RETRAINING,
        "counterfactual": _COUNTERFACTUAL_RETRAINING,
        "fixed_seed": _FIXED_SEED_RETRAINING,
    }.get(kind)
    match = pattern.fullmatch(name) if pattern else None
    if match is None:
        raise ValueError(
            f"unknown retraining {kind}/{name}; expected models/subset<j>_seed<s>, "
            "counterfactual/<method>/q<NNN> or fixed_seed/<subset<j>|loo<k>>"
        )
    return match


def retraining_inputs(config: dict, kind: str, name: str) -> dict[str, str]:
    """{dataset, membership} files of a retraining (membership: subsets.npz, its members.npy or fixed_seed/sets.npz)."""
    _retraining(kind, name)
    membership = {"models": subsets_file(config), "fixed_seed": fixed_seed_sets_file(config)}.get(
        kind, retraining_file(config, kind, name, "members.npy")
    )
    return {"dataset": model_inputs_file(config), "membership": membership}


def retraining_args(kind: str, name: str, membership: str) -> str:
    """The train stage's membership options of a retraining."""
    m = _retraining(kind, name)
    if kind == "models":
        return f"--subsets {membership} --subset {int(m['subset'])} --replicate {int(m['replicate'])}"
    if kind == "fixed_seed":  # all examples, the others weighted 0, the full model's seed and data order
        return f"--fixed-seed-sets {membership} --fixed-seed-set {name} --replicate 0"
    return f"--members {membership} --replicate 0"  # the full model's seed: same init, same (t, eps) stream


# ---------------------------------------------------------------- counterfactual retraining
#
# results/<benchmark>/counterfactual/<method>/q<NNN>/selection.json  what was removed for query NNN (rule counterfactual)
#                                           .../members.npy          the training examples kept
#                                           .../model.pt             the retrained model (rule train_subset)
#                                           .../regenerated.npz      query NNN regenerated by the full and the retrained
#                                                                    model, and its loss under both (rule regenerate)
def counterfactual_methods(config: dict) -> list[str]:
    """The selected methods, then the random baseline."""
    return [*config["counterfactual"]["methods"], RANDOM_BASELINE]


def counterfactual_queries(config: dict) -> list[str]:
    """q000, q001, ...: the first counterfactual.queries generated queries."""
    return [f"q{q:03d}" for q in range(config["counterfactual"]["queries"])]


def counterfactual_files(config: dict, name: str) -> list[str]:
    """<name> (selection.json, regenerated.npz, ...) of every (method, query) of the counterfactual retraining."""
    return [
        counterfactual_file(config, name, m, q)
        for m in counterfactual_methods(config)
        for q in counterfactual_queries(config)
    ]


def counterfactual_scores(config: dict, method: str) -> list[str]:
    """The scores job output a method's selection reads ([] for the random baseline)."""
    return [] if method == RANDOM_BASELINE else [scores_file(config, method), *score_matrix_files(config, method)]


def counterfactual_clip_weights(config: dict) -> list[str]:
    """The CLIP weights file of the counterfactual's embedding cosine, when configured and present ([] otherwise:
    the classifier's features are used)."""
    weights = config["counterfactual"]["clip_weights"]
    return [os.path.expanduser(weights)] if weights and os.path.isfile(os.path.expanduser(weights)) else []


CHECKPOINT_PATTERN = r"full|step\d+|member\d+"


SPLIT_STORE_PATTERN = r"[a-z0-9-]+_(?:avg|unitnorm|sketch\d+)_K\d+_(?:gaussian|rademacher|sjlt)\d+"


JOURNEY_STORE_PATTERN = r"[a-z0-9-]+_journey_K\d+_(?:gaussian|rademacher|sjlt)\d+"


_TAG = re.compile(
    r"(?P<fn>[a-z0-9-]+)_(?P<kind>avg|unitnorm|sketch(?P<r>\d+)|journey)_K(?P<k>\d+)"
    r"_(?P<projection>gaussian|rademacher|sjlt)(?P<dim>\d+)"
)


def checkpoint_name(step: int) -> str:
    return f"step{step:07d}"


def checkpoint_names(config: dict) -> list[str]:
    return [checkpoint_name(s) for s in checkpoint_steps(config)]


def checkpoint_model(config: dict, checkpoint: str) -> str:
    """The model file of a store's checkpoint: 'full' (the final model), 'step<N>' (intermediate) or 'member<k>' (an
    ensemble member)."""
    if checkpoint == "full":
        return full_model(config)
    if re.fullmatch(r"member\d+", checkpoint):
        return ensemble_member_model(config, checkpoint)
    if not re.fullmatch(r"step\d+", checkpoint):
        raise ValueError(f"unknown checkpoint {checkpoint!r}; expected 'full', 'step<N>' or 'member<k>'")
    return full_checkpoint(config, checkpoint)


def feature_tag(
    config: dict, output_function: str, timesteps: int | None = None, kind: str = "avg", directions: int | None = None
) -> str:
    g = config["gradients"]
    k = g["timesteps"] if timesteps is None else timesteps
    if kind == "sketch":
        if not directions:
            raise ValueError("a sketch store needs the number of output directions")
        kind = f"sketch{directions}"
    elif kind not in ("avg", "unitnorm", "journey"):
        raise ValueError(f"unknown feature kind {kind!r}")
    return f"{output_function}_{kind}_K{k}_{g['projection']}{g['projection_dim']}"


def parse_feature_tag(tag: str) -> dict:
    """The store specification a tag names (inverse of feature_tag)."""
    m = _TAG.fullmatch(tag)
    if m is None:
        raise ValueError(
            f"bad gradient store tag {tag!r}: expected <output function>_<avg|unitnorm|sketch<r>|journey>"
            "_K<timesteps>_<gaussian|rademacher><dim>"
        )
    kind = "sketch" if m["r"] else m["kind"]
    return {
        "output_function": m["fn"],
        "kind": kind,
        "timesteps": int(m["k"]),
        "projection": m["projection"],
        "projection_dim": int(m["dim"]),
        "output_directions": int(m["r"]) if m["r"] else None,
    }


def feature_dir(
    config: dict,
    output_function: str,
    checkpoint: str = "full",
    timesteps: int | None = None,
    kind: str = "avg",
    directions: int | None = None,
) -> str:
    return gradients_dir(config, checkpoint, feature_tag(config, output_function, timesteps, kind, directions))


# A TRAK-family method with query_measurement m (not loss) reads its query features from
# gradients/<checkpoint>/<tag>/measurement_<m>/{generated,heldout,extra}.npy: P^T grad m(x_q) with the store's projection
# (rule gradients_measurement); trajectory exists for generated queries only (held-out: the loss features).
MEASUREMENT_PATTERN = r"elbo|timestep_loss_t\d+"  # both query sets (rule gradients_measurement_trajectory: generated)


def measurement_splits(config: dict, target: str) -> list[str]:
    """The query sets with features of a measurement target (contracts.measurement_sets)."""
    return measurement_sets(target, query_sets(config))


def store_files(config: dict, directory: str, kind: str) -> list[str]:
    if kind.startswith("measurement_"):
        names = measurement_splits(config, kind[len("measurement_") :])
    else:
        names = ["generated"] if kind == "journey" else [*store_splits(config), RESIDUAL]
    return [store_file(directory, name, ext) for name in names for ext in ("npy", "json")]


def store_directory(config: dict, need: StoreNeed, checkpoint: str = "full") -> str:
    """The directory of a store a scorer declares (scorers/base.py: StoreNeed) at one checkpoint."""
    if (
        need.kind == "measurement"
    ):  # query features of a likelihood target, beside the loss store they share a space with
        tag = feature_tag(config, need.output_function, need.timesteps)
        return measurement_gradients_dir(config, checkpoint, tag, need.target)
    if need.kind == "journey":  # K = the sampling steps of the stored trajectory
        steps = need.timesteps if need.timesteps is not None else config["sample"]["num_inference_steps"]
        return feature_dir(config, need.output_function, checkpoint, steps, "journey")
    return feature_dir(config, need.output_function, checkpoint, need.timesteps, need.kind, need.directions)


def method_stores(config: dict, method: str) -> dict[str, tuple[str, str]]:
    """{role: (store directory, kind)} of the gradient stores a method's scorer declares ({} for methods that need none).

    Roles: 'final' (final model), one per intermediate checkpoint 'step<N>' (a 'checkpoints' need: TracInCP / GAS),
    'journey' (Journey-TRAK's generated-query features) and 'query' (query features of a query_measurement)."""
    return {role: (directory, kind) for role, (directory, kind, _) in _method_store_entries(config, method).items()}


def _method_store_entries(config: dict, method: str) -> dict[str, tuple[str, str, str]]:
    """{role: (store directory, kind, checkpoint name)} of method_stores."""
    m = config["scores"]["methods"][method]
    stores = {}
    for need in get_scorer(m["family"]).all_stores(m):
        kind = f"measurement_{need.target}" if need.kind == "measurement" else need.kind
        if need.role == "checkpoints":
            stores.update({c: (store_directory(config, need, c), kind, c) for c in checkpoint_names(config)})
        else:
            stores[need.role] = (store_directory(config, need, need.checkpoint), kind, need.checkpoint)
    return stores


def method_store_checkpoints(config: dict, method: str) -> dict[str, str]:
    """{role: the model file its store was computed at}: the scores stage checks each store's checkpoint identity."""
    return {role: checkpoint_model(config, c) for role, (_, _, c) in _method_store_entries(config, method).items()}


def method_store_checkpoint_args(config: dict, method: str) -> str:
    """Command-line option of the scores stage naming each store role's checkpoint ('' for methods without stores)."""
    files = method_store_checkpoints(config, method)
    return "--store-checkpoints " + " ".join(f"{role}={f}" for role, f in files.items()) if files else ""


def method_feature_stores(config: dict, method: str) -> list[str]:
    """The gradient store files (.npy + .json sidecar) a method reads ([] for methods that need none)."""
    return [
        f for directory, kind in method_stores(config, method).values() for f in store_files(config, directory, kind)
    ]


def method_feature_args(config: dict, method: str) -> str:
    """Command-line option of the scores stage naming each store by its role ('' for methods without stores)."""
    stores = method_stores(config, method)
    return "--features " + " ".join(f"{role}={d}" for role, (d, _) in stores.items()) if stores else ""


def parse_stores(items: list[str] | None, option: str = "--features", value: str = "DIRECTORY") -> dict[str, str]:
    """The scores stage's reading of --features (method_feature_args): {role: store directory}; also of
    --store-checkpoints (method_store_checkpoint_args): {role: checkpoint file}."""
    stores = {}
    for item in items or []:
        role, sep, directory = item.partition("=")
        if not sep or not role or not directory:
            raise ValueError(f"{option} entries are ROLE={value}, got {item!r}")
        stores[role] = directory
    return stores


# ---------------------------------------------------------------- curvature (K-FAC influence)
#
# One fit per variant <fisher_type>-<kfac_approx>[-ekfac] of the final model: results/<benchmark>/curvature/<variant>.pt.
# A kfac method's settings are kfac.<key> overridden by the method's own fisher_type / kfac_approx / ekfac.
VARIANT_PATTERN = r"(?:mc|empirical|type-2)-(?:expand|reduce)(?:-ekfac)?"


_VARIANT = re.compile(r"(?P<fisher_type>mc|empirical|type-2)-(?P<kfac_approx>expand|reduce)(?P<ekfac>-ekfac)?")


def format_curvature_variant(fisher_type: str, kfac_approx: str, ekfac: bool) -> str:
    return f"{fisher_type}-{kfac_approx}" + ("-ekfac" if ekfac else "")


def curvature_variant(config: dict, method: str) -> str:
    m, k = config["scores"]["methods"][method], config["kfac"]
    return format_curvature_variant(*(m.get(key, k[key]) for key in ("fisher_type", "kfac_approx", "ekfac")))


def parse_curvature_variant(variant: str) -> dict:
    m = _VARIANT.fullmatch(variant)
    if m is None:
        raise ValueError(f"bad curvature variant {variant!r}: expected <mc|empirical|type-2>-<expand|reduce>[-ekfac]")
    return {"fisher_type": m["fisher_type"], "kfac_approx": m["kfac_approx"], "ekfac": bool(m["ekfac"])}


def curvature_variant_args(variant: str) -> str:
    """Command-line options of the curvature stage that select a variant."""
    v = parse_curvature_variant(variant)
    return f"--fisher-type {v['fisher_type']} --kfac-approx {v['kfac_approx']} --{'' if v['ekfac'] else 'no-'}ekfac"


def model_input_file(config: dict, method: str, name: str) -> str:
    """The file of a model input a scorer declares (Scorer.model_inputs)."""
    if name == "classifier":
        return classifier_model(config)
    if name == "model":
        return full_model(config)
    if name == "curvature":
        return curvature_file(config, curvature_variant(config, method))
    raise ValueError(f"scores.methods.{method}: unknown model input {name!r} (classifier, model or curvature)")


def method_model_inputs(config: dict, method: str) -> dict[str, str]:
    """Model files a model-based method reads, keyed by the scores-stage option that names them."""
    method_cfg = config["scores"]["methods"][method]
    scorer = get_scorer(method_cfg["family"])
    return {name: model_input_file(config, method, name) for name in scorer.method_model_inputs(method_cfg)}


def method_model_args(config: dict, method: str) -> str:
    return " ".join(f"--{option} {path}" for option, path in method_model_inputs(config, method).items())


# ---------------------------------------------------------------- metagradient (MAGIC)
#
# results/<benchmark>/scores/<method>/chunks/chunk<NNN>.npz   scores of one chunk of queries (rule metagradient; the
#                                                             scores rule assembles them, NaN rows = not attributed)
# results/<benchmark>/fixed_seed/sets.npz                     the fixed-seed sets: evaluation subsets + leave-out sets
# results/<benchmark>/fixed_seed/<name>/model.pt              retrained with the others weighted 0 (rule train_subset)
# results/<benchmark>/fixed_seed/<name>/measurement.npz       its measurement (rule measure_fixed_seed); name `full`:
#                                                             the full model's (w = 1)
# Attributed queries: the first max_queries of each set (generated, then held-out), queries_per_job per job.


FIXED_SEED_NAME_PATTERN = r"full|subset\d+|loo\d+"


def metagradient_methods(config: dict) -> list[str]:
    """The methods whose scores come from chunk jobs (Scorer.chunk_jobs: the metagradient)."""
    return [m for m, c in config["scores"]["methods"].items() if get_scorer(c["family"]).chunk_jobs]


def metagradient_queries(config: dict, method: str) -> list[tuple[str, int]]:
    """(query set, index) of every attributed query: the first max_queries of each set (null: all)."""
    limit = config["scores"]["methods"][method].get("max_queries")
    sizes = {"generated": config["sample"]["n_generated"], "heldout": config["data"]["n_heldout"]}
    return [(name, q) for name, n in sizes.items() for q in range(n if limit is None else min(n, limit))]


def metagradient_chunks(config: dict, method: str) -> list[list[tuple[str, int]]]:
    """The attributed queries split into jobs of queries_per_job (one forward + reverse pass each)."""
    queries = metagradient_queries(config, method)
    size = config["scores"]["methods"][method].get("queries_per_job") or len(queries)
    return [queries[i : i + size] for i in range(0, len(queries), size)]


def metagradient_chunk_files(config: dict, method: str) -> list[str]:
    if not get_scorer(config["scores"]["methods"][method]["family"]).chunk_jobs:
        return []
    return [
        metagradient_chunk_file(config, method, f"chunk{k:03d}")
        for k in range(len(metagradient_chunks(config, method)))
    ]


def metagradient_chunk_args(config: dict, method: str, chunk: str) -> str:
    """--queries SET=i,j,... of one chunk job (chunk = 'chunk<NNN>')."""
    m = re.fullmatch(r"chunk(\d+)", chunk)
    chunks = metagradient_chunks(config, method)
    if m is None or int(m[1]) >= len(chunks):
        raise ValueError(f"{method}: no chunk {chunk!r} (the method has {len(chunks)})")
    by_set: dict[str, list[int]] = {}
    for name, q in chunks[int(m[1])]:
        by_set.setdefault(name, []).append(q)
    return "--queries " + " ".join(f"{name}={','.join(map(str, qs))}" for name, qs in by_set.items())


def parse_query_selection(items: list[str]) -> dict[str, np.ndarray]:
    """The metagradient stage's reading of --queries (metagradient_chunk_args): ['generated=0,1', 'heldout=0'] ->
    {set: indices}."""

    selection = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name or not values:
            raise ValueError(f"--queries entries are SET=i,j,..., got {item!r}")
        selection[name] = np.array([int(v) for v in values.split(",")], dtype=np.int64)
    return selection


def metagradient_config(config: dict, method: str) -> str:
    """JSON config of a chunk job: the training, measurement and compute keys plus this method only."""
    selected = select(config, SECTIONS["metagradient"])
    selected["scores"] = {"methods": {method: config["scores"]["methods"][method]}}
    return json.dumps(selected, sort_keys=True, separators=(",", ":"))


def metagradient_chunk_option(config: dict, method: str) -> str:
    """The scores stage's --chunks option of a metagradient method ('' for any other method)."""
    files = metagradient_chunk_files(config, method)
    return "--chunks " + " ".join(files) if files else ""


def fixed_seed_names(config: dict) -> list[str]:
    """The fixed-seed retrainings: every EVALUATION subset and fixed_seed.loo_sets leave-out sets; none without a
    metagradient method (nothing would use them)."""
    if not metagradient_methods(config):
        return []
    lds = config["lds"]
    return [f"subset{j:03d}" for j in range(lds["n_tuning"], lds["n_subsets"])] + [
        f"loo{k:03d}" for k in range(config["fixed_seed"]["loo_sets"])
    ]


def fixed_seed_model(config: dict, name: str) -> str:
    """The model a fixed-seed measurement reads: the full model for `full` (w = 1), else the retraining."""
    if name == "full":
        return full_model(config)
    _retraining("fixed_seed", name)
    return retrained_model(config, "fixed_seed", name)


def fixed_seed_measurements(config: dict) -> list[str]:
    """The full model's measurement first, then one per fixed-seed retraining ([] without a metagradient method)."""
    names = fixed_seed_names(config)
    return [fixed_seed_measurement(config, name) for name in (["full", *names] if names else [])]
