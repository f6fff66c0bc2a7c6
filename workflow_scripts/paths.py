"""Every artefact path as a pure function of the configuration and wildcards.

Imported by the Snakefile (so keep it free of heavy imports) and by tests.
"""
from __future__ import annotations

import json

SECTIONS = {  # the config keys each stage reads; a rule reruns exactly when one of them changes
    "data": ("data", "lds.n_subsets", "lds.n_tuning", "lds.fraction", "seeds.split", "seeds.subsets"),
    "train": ("data", "model", "diffusion", "train", "seeds.train", "compute"),
    "sample": ("model", "diffusion", "sample", "seeds.sample", "compute"),
    "measure": ("model", "diffusion", "measure", "seeds.measure", "compute"),
    "gradients": ("model", "diffusion", "gradients", "seeds.gradients", "seeds.projection", "compute"),
    "scores": ("scores", "lds.n_subsets", "lds.n_seeds"),
    "evaluate": ("lds", "seeds.bootstrap"),
}


def stage_config(config: dict, stage: str) -> str:
    """JSON of the keys a stage reads (passed on its command line as --config)."""
    selected: dict = {}
    for dotted in SECTIONS[stage]:
        *parents, leaf = dotted.split(".")
        source, target = config, selected
        for key in parents:
            source, target = source[key], target.setdefault(key, {})
        target[leaf] = source[leaf]
    return json.dumps(selected, sort_keys=True, separators=(",", ":"))


def root(config: dict) -> str:
    return f"results/{config['benchmark']}"


def subset_model_names(config: dict) -> list[str]:
    """Retrained models, subset-major: subset000_seed0, subset000_seed1, ..."""
    lds = config["lds"]
    return [f"subset{j:03d}_seed{s}" for j in range(lds["n_subsets"]) for s in range(lds["n_seeds"])]


def checkpoint_steps(config: dict) -> list[int]:
    """Intermediate checkpoints of the full model (the final step included), for TracInCP."""
    every, steps = config["train"]["checkpoint_every"], config["train"]["steps"]
    return sorted({*range(every, steps + 1, every), steps})


def full_checkpoints(config: dict) -> list[str]:
    return [f"{root(config)}/models/full/checkpoints/step{s:07d}.pt" for s in checkpoint_steps(config)]


def measurement_files(config: dict) -> list[str]:
    return [f"{root(config)}/measurements/{name}.npz" for name in subset_model_names(config)]


def feature_tag(config: dict, output_function: str) -> str:
    g = config["gradients"]
    return f"{output_function}_K{g['timesteps']}_{g['projection']}{g['projection_dim']}"


def feature_dir(config: dict, output_function: str, checkpoint: str = "full") -> str:
    return f"{root(config)}/gradients/{checkpoint}/{feature_tag(config, output_function)}"


STORE_SPLITS = ("train", "generated", "heldout")


def method_feature_stores(config: dict, method: str) -> list[str]:
    """The gradient stores (.npy + .json sidecar per split) a method reads ([] for methods that need none)."""
    method_cfg = config["scores"]["methods"][method]
    if "output_function" not in method_cfg:
        return []
    directory = feature_dir(config, method_cfg["output_function"])
    return [f"{directory}/{split}.{ext}" for split in STORE_SPLITS for ext in ("npy", "json")]


