"""Loading, merging and validating params.yaml (the single configuration)."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).parent / "schemas" / "params.schema.yaml"
N_DIGITS = 1797  # images in scikit-learn's bundled digits
# measure.measurements each model family can compute (workflow_scripts/likelihood.py, vesde.py)
MEASUREMENTS_BY_FAMILY = {"ddpm": ("loss", "elbo", "timestep_loss", "trajectory"), "vesde": ("likelihood",)}
DEFAULT_MEASUREMENTS = {"ddpm": ["loss"], "vesde": ["likelihood"]}


class ConfigError(ValueError):
    """A configuration value is missing, misspelled or out of range."""


def deep_merge(base: dict, overlay: dict) -> dict:
    """Overlay wins key by key; nested dicts merge, everything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(path: str | Path = "params.yaml", *overlays: str | Path) -> dict:
    config = yaml.safe_load(Path(path).read_text())
    for overlay in overlays:
        config = deep_merge(config, yaml.safe_load(Path(overlay).read_text()) or {})
    validate_config(config)
    return config


def _field(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate_config(config: dict) -> None:
    """Raise ConfigError naming the first bad field (schema first, then cross-field rules)."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_field(e)}: {e.message}" for e in errors[:10]]
        raise ConfigError("invalid configuration (params.yaml + overlays):\n" + "\n".join(lines))
    _check_consistency(config)


def _check_consistency(config: dict) -> None:
    data, lds, model = config["data"], config["lds"], config["model"]
    if data["dataset"] == "digits" and data["n_train"] + data["n_heldout"] > N_DIGITS:
        raise ConfigError(f"data.n_train + data.n_heldout must be at most {N_DIGITS} for digits")
    if lds["n_tuning"] > lds["n_subsets"] - 2:
        raise ConfigError("lds.n_tuning must leave at least 2 evaluation subsets (lds.n_subsets - 2)")
    if len(model["attention"]) != len(model["block_out_channels"]):
        raise ConfigError("model.attention needs one entry per model.block_out_channels entry")
    for width in model["block_out_channels"]:
        if width % model["norm_num_groups"]:
            raise ConfigError(f"model.block_out_channels entry {width} is not divisible by model.norm_num_groups")
    if config["gradients"]["sjlt_nonzeros"] > config["gradients"]["projection_dim"]:
        raise ConfigError("gradients.sjlt_nonzeros must be at most gradients.projection_dim")
    if config["train"]["resume_every"] > config["train"]["steps"]:
        raise ConfigError("train.resume_every must be at most train.steps")
    family = model.get("family", "ddpm")
    for name in config["measure"].get("measurements", DEFAULT_MEASUREMENTS[family]):
        if name not in MEASUREMENTS_BY_FAMILY[family]:
            needs = [f for f, names in MEASUREMENTS_BY_FAMILY.items() if name in names]
            raise ConfigError(f"measure.measurements: {name!r} needs model.family {' or '.join(needs)} "
                              f"(model.family is {family})")
    T = config["diffusion"]["num_train_timesteps"]
    for t in config["measure"].get("timestep_loss", {}).get("timesteps", []):
        if t >= T:
            raise ConfigError(f"measure.timestep_loss.timesteps: timestep {t} must be below diffusion.num_train_timesteps {T}")
    _check_counterfactual(config)
    _check_figures(config)
    _check_metagradient(config)


def check_workflow_support(config: dict) -> None:
    """Refuse settings the library accepts but the Snakemake stages do not use yet (never silently ignore them).

    The likelihood measurements and the VE-SDE family (workflow_scripts/likelihood.py, vesde.py) are tested
    library code; the train / measure rules still train DDPMs and measure the simple loss only."""
    family = config["model"].get("family", "ddpm")
    if family != "ddpm":
        raise ConfigError(f"model.family {family!r}: the workflow's train/sample/measure rules support 'ddpm' only so "
                          "far (the VE-SDE family is library code: workflow_scripts/vesde.py)")
    measurements = config["measure"].get("measurements", ["loss"])
    if list(measurements) != ["loss"]:
        raise ConfigError(f"measure.measurements {list(measurements)}: the measure rule computes 'loss' only so far "
                          "(ELBO, timestep loss and trajectory log-prob are library code: workflow_scripts/likelihood.py)")


def removal_count(k: int | float, n_train: int) -> int:
    """Training examples a counterfactual removes: k itself (a count, integer >= 1) or round(k * n_train)
    (a fraction, 0 < k < 1). It must leave at least one training example."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ConfigError(f"counterfactual.k must be a fraction (0 < k < 1) or a count (integer >= 1), got {k!r}")
    if isinstance(k, int):
        count = k
        if count < 1:
            raise ConfigError(f"counterfactual.k = {k} removes nothing; use a count >= 1 or a fraction in (0, 1)")
    elif 0 < k < 1:
        count = int(round(k * n_train))
        if count < 1:
            raise ConfigError(f"counterfactual.k = {k} of {n_train} training examples rounds to 0 removed; use a larger fraction")
    else:
        raise ConfigError(f"counterfactual.k must be a fraction (0 < k < 1) or a count (integer >= 1), got {k!r}")
    if count >= n_train:
        raise ConfigError(f"counterfactual.k = {k} removes {count} of {n_train} training examples; "
                          "at least one must remain")
    return count


def _check_counterfactual(config: dict) -> None:
    cf, methods = config["counterfactual"], config["scores"]["methods"]
    if cf["queries"] > config["sample"]["n_generated"]:
        raise ConfigError(f"counterfactual.queries = {cf['queries']} exceeds sample.n_generated = "
                          f"{config['sample']['n_generated']} (the counterfactual queries are the first generated ones)")
    for method in cf["methods"]:
        if method == "random":
            raise ConfigError("counterfactual.methods: 'random' is the built-in baseline (always run); remove it")
        if method not in methods:
            raise ConfigError(f"counterfactual.methods: {method!r} is not in scores.methods")
        if methods[method]["family"] == "clip" and not methods[method].get("weights"):
            raise ConfigError(f"counterfactual.methods: {method!r} has no scores without CLIP weights "
                              f"(scores.methods.{method}.weights is null)")
    removal_count(cf["k"], config["data"]["n_train"])


def _check_figures(config: dict) -> None:
    fig, methods = config["figures"], config["scores"]["methods"]
    for q in fig["queries"]:
        if q >= config["sample"]["n_generated"]:
            raise ConfigError(f"figures.queries: generated query {q} does not exist "
                              f"(sample.n_generated = {config['sample']['n_generated']})")
    for method in fig["methods"]:
        if method not in methods:
            raise ConfigError(f"figures.methods: {method!r} is not in scores.methods")


def config_hash(section: dict) -> str:
    """A short stable hash of a (sub)configuration, stored beside artefacts to detect mismatches."""
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()[:16]


def _check_metagradient(config: dict) -> None:
    """A metagradient method needs its fixed-seed ground truth, made with the full model's seed (replicate 0)."""
    for method, m in config["scores"]["methods"].items():
        if m["family"] != "metagradient":
            continue
        if "fixed_seed" not in config:
            raise ConfigError(f"scores.methods.{method}: a metagradient method needs the section fixed_seed "
                              "(loo_sets, loo_fraction: its fixed-seed ground truth)")
        if m.get("replicate", 0) != 0:
            raise ConfigError(f"scores.methods.{method}.replicate: the fixed-seed ground truth retrains with the full "
                              "model's seed (replicate 0); other replicates are library-only")
