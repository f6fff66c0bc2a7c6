"""Loading, merging and validating params.yaml (the single configuration)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import jsonschema
import yaml

from workflow_scripts.core.contracts import DEFAULT_MEASUREMENTS, MEASUREMENTS_BY_FAMILY, measured_targets
from workflow_scripts.scorers import SCORERS, get_scorer

SCHEMA_PATH = Path(__file__).parent / "schemas" / "params.schema.yaml"


N_DIGITS = 1797  # images in scikit-learn's bundled digits


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
        values = yaml.safe_load(Path(overlay).read_text()) or {}
        check_overlay(values, str(overlay))
        config = deep_merge(config, values)
    drop_removed_methods(config)
    order_methods(config, path)
    validate_config(config)
    return config


def check_overlay(overlay: dict, source: str) -> None:
    """Refuse an overlay entry that merges to nothing. `scores: {methods: {}}` reads as "no methods", but overlays
    merge key by key (here and in Snakemake's --configfile), so it changes nothing and every method of params.yaml
    still runs."""
    scores = overlay.get("scores")
    methods = scores.get("methods") if isinstance(scores, dict) else None
    if isinstance(methods, dict) and not methods:
        raise ConfigError(
            f"{source}: scores.methods is empty ({{}}), which changes nothing: overlays merge key by key, so every "
            "method of params.yaml would still run. Remove a method with `<name>: null` and list the methods to add "
            "or change"
        )


def drop_removed_methods(config: dict) -> None:
    """Delete the scores.methods entries an overlay set to null, in place. Overlays merge key by key (here and in
    Snakemake's --configfile), so null is how an overlay removes a method of params.yaml (configs/vesde.yaml)."""
    methods = config.get("scores", {}).get("methods")
    if isinstance(methods, dict):
        for name in [name for name, method in methods.items() if method is None]:
            del methods[name]


def order_methods(config: dict, base: str | Path = "params.yaml") -> None:
    """scores.methods in a fixed order, in place: those of `base` in its order, then the overlays' own by name.
    The order is the tables' row order, and Snakemake's merge of --configfile overlays orders new keys differently
    in the main process and in a cluster job's process (which re-reads them)."""
    methods = config.get("scores", {}).get("methods")
    if not isinstance(methods, dict):
        return
    base_order = list((yaml.safe_load(Path(base).read_text()) or {}).get("scores", {}).get("methods", {}))
    ordered = [name for name in base_order if name in methods] + sorted(set(methods) - set(base_order))
    config["scores"]["methods"] = {name: methods[name] for name in ordered}


def _field(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def full_schema() -> dict:
    """params.schema.yaml with the method entries of scores.methods taken from the scorers' declarations (each
    scorer module states the forms of its method entry: scorers/base.py, Scorer.schemas)."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    methods = schema["properties"]["scores"]["properties"]["methods"]
    methods["additionalProperties"] = {"oneOf": [form for scorer in SCORERS.values() for form in scorer.schemas]}
    return schema


def _strict_integer(checker, instance) -> bool:
    # JSON Schema counts 40.0 as an integer; the stages then fail on range(40.0) or an array shape, naming no field
    return isinstance(instance, int) and not isinstance(instance, bool)


# Draft 2020-12 with integers that must be written as integers (n_train: 40, not 40.0)
StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_integer),
)


def non_finite_values(value, path: str = "") -> list[str]:
    """Key paths (train.lr, kfac.lambda_grid[2]) of the NaN and infinite numbers anywhere in the configuration.
    YAML's .nan and .inf are floats; a schema bound (minimum, exclusiveMinimum) is never violated by NaN, since
    every comparison with it is false, so they are refused before the schema sees them."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{path or '<top level>'} = {value}"]
    if isinstance(value, dict):
        return [bad for key, v in value.items() for bad in non_finite_values(v, f"{path}.{key}" if path else str(key))]
    if isinstance(value, list):
        return [bad for i, v in enumerate(value) for bad in non_finite_values(v, f"{path}[{i}]")]
    return []


def validate_config(config: dict) -> None:
    """Raise ConfigError naming the first bad field (non-finite numbers, then the schema, then cross-field rules)."""
    bad = non_finite_values(config)
    if bad:
        raise ConfigError(
            "invalid configuration (params.yaml + overlays): NaN or infinite numbers are not settings:\n"
            + "\n".join(f"  {b}" for b in bad)
        )
    schema = full_schema()
    errors = sorted(StrictValidator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [line for e in errors for line in _error_lines(e, schema)]
        raise ConfigError("invalid configuration (params.yaml + overlays):\n" + "\n".join(lines[:10]))
    _check_consistency(config)


def _error_lines(error: jsonschema.ValidationError, schema: dict) -> list[str]:
    """The lines of one schema error. A method entry fails the oneOf over every scorer's forms, whose own message
    ("is not valid under any of the given schemas") names nothing: it is checked again against its family's forms."""
    path = list(error.absolute_path)
    if error.validator == "oneOf" and len(path) == 3 and path[:2] == ["scores", "methods"]:
        return _method_errors(path[2], error.instance, schema["definitions"])
    return [f"  {_field(error)}: {error.message}"]


def _method_errors(name: str, entry, definitions: dict) -> list[str]:
    """What is wrong with the entry scores.methods.<name>, from its family's declared forms (Scorer.schemas)."""
    field = f"scores.methods.{name}"
    if not isinstance(entry, dict):
        return [f"  {field}: a method entry is a mapping with a family key, got {entry!r}"]
    family = entry.get("family")
    if family is None:
        return [f"  {field}: the entry has no family key (one of {', '.join(sorted(SCORERS))})"]
    if not isinstance(family, str) or family not in SCORERS:
        return [f"  {field}.family: unknown scorer family {family!r} (one of {', '.join(sorted(SCORERS))})"]
    forms = SCORERS[family].schemas
    found = []
    for form in forms:
        validator = jsonschema.Draft202012Validator({**form, "definitions": definitions})
        found.append(sorted(validator.iter_errors(entry), key=lambda e: list(e.absolute_path)))
    # a family with several forms (das: scalar, vector): the form the entry is closest to
    form, errors = min(zip(forms, found), key=lambda pair: len(pair[1]))
    if not errors:  # valid under more than one form: the declarations overlap
        return [f"  {field}: matches more than one form of family {family} (scorers/{family}: Scorer.schemas)"]
    settings, required = sorted(form["properties"]), form.get("required", [])
    lines = []
    for e in errors:
        if e.validator == "additionalProperties" and not e.absolute_path:
            lines += [
                f"  {field}.{key}: not a setting of family {family} (its settings: {', '.join(settings)})"
                for key in entry
                if key not in form["properties"]
            ]
        elif e.validator == "required" and not e.absolute_path:
            lines += [
                f"  {field}.{key}: missing (family {family} requires {', '.join(required)})"
                for key in required
                if key not in entry
            ]
        elif e.validator == "const" and len(forms) > 1 and len(e.absolute_path) == 1:  # the key that picks the form
            key = e.absolute_path[0]
            accepted = [f["properties"].get(key, {}).get("const") for f in forms]
            lines.append(f"  {field}.{key}: {entry[key]!r} is not one of {accepted} (the forms of family {family})")
        else:
            lines.append(f"  {'.'.join([field, *(str(p) for p in e.absolute_path)])}: {e.message}")
    if len(forms) > 1:
        which = {k: v["const"] for k, v in form["properties"].items() if isinstance(v, dict) and "const" in v}
        lines.append(f"  ({field}: checked against family {family}'s form {which}, the closest of its {len(forms)})")
    return lines


def _check_consistency(config: dict) -> None:
    data, lds, model = config["data"], config["lds"], config["model"]
    if data["dataset"] == "digits" and data["n_train"] + data["n_heldout"] > N_DIGITS:
        raise ConfigError(f"data.n_train + data.n_heldout must be at most {N_DIGITS} for digits")
    if data["dataset"] == "folder":
        _check_folder_data(data, model)
    elif data["dataset"] != "digits":
        _check_torchvision_data(data, model)
    if data["dataset"] != "folder":
        stray = [key for key in FOLDER_KEYS if key in data]
        if stray:
            raise ConfigError(
                f"data.{stray[0]} applies to data.dataset folder only (data.dataset is {data['dataset']!r})"
            )
    if lds["n_tuning"] > lds["n_subsets"] - 2:
        raise ConfigError("lds.n_tuning must leave at least 2 evaluation subsets (lds.n_subsets - 2)")
    _check_subset_size(lds["fraction"], data["n_train"])
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
            raise ConfigError(
                f"measure.measurements: {name!r} needs model.family {' or '.join(needs)} (model.family is {family})"
            )
    T = config["diffusion"]["num_train_timesteps"]
    _check_timestep_budgets(config, T)
    for t in config["measure"].get("timestep_loss", {}).get("timesteps", []):
        if t >= T:
            raise ConfigError(
                f"measure.timestep_loss.timesteps: timestep {t} must be below diffusion.num_train_timesteps {T}"
            )
    _check_counterfactual(config)
    _check_figures(config)
    _check_query_measurements(config)
    _check_methods(config)


def _check_subset_size(fraction: float, n_train: int) -> None:
    """Each LDS subset holds round(lds.fraction * data.n_train) examples (core/data.make_subsets): none makes every
    subset model train on nothing, all makes every subset the full set (every prediction equal: LDS means nothing)."""
    size = int(round(fraction * n_train))
    if size < 1:
        raise ConfigError(
            f"lds.fraction = {fraction} of data.n_train = {n_train} rounds to 0 examples per LDS subset: every subset "
            "would be empty; raise lds.fraction or data.n_train"
        )
    if size >= n_train:
        raise ConfigError(
            f"lds.fraction = {fraction} of data.n_train = {n_train} rounds to all {n_train} examples per LDS subset: "
            "every subset would be the full training set and the LDS would measure nothing; lower lds.fraction"
        )


def _check_timestep_budgets(config: dict, T: int) -> None:
    """A timestep budget K takes the grid range(0, T, T // K) of the T training timesteps: K > T has no such grid
    (the gradients stage would fail after every model is trained)."""
    budgets = [("gradients.timesteps", config["gradients"]["timesteps"])]
    budgets += [
        (f"scores.methods.{name}.timesteps", method["timesteps"])
        for name, method in config["scores"]["methods"].items()
        if "timesteps" in method
    ]
    for key, k in budgets:
        if isinstance(k, list):  # a sweep over noise timesteps (nda): each must be a training timestep
            if any(t >= T for t in k):
                raise ConfigError(
                    f"{key} = {k} names timesteps beyond diffusion.num_train_timesteps = {T}: use timesteps below {T}"
                )
            continue
        if k > T:
            raise ConfigError(
                f"{key} = {k} exceeds diffusion.num_train_timesteps = {T}: at most one gradient timestep per "
                f"training timestep; use at most {T}"
            )


# training / held-out source split sizes of the real data sets (workflow_scripts/core/datasets.py, artbench.py,
# celeba.py): ArtBench 5000 / 1000 images per style; CelebA partitions 0 (train) and 1 (validation)
TORCHVISION_SPLITS = {
    "mnist": (60000, 10000),
    "cifar10": (50000, 10000),
    "cifar2": (10000, 2000),
    "artbench2": (10000, 2000),
    "artbench5": (25000, 5000),
    "artbench10": (50000, 10000),
    "celeba": (162770, 19867),
}
HELDOUT_SPLIT = {"celeba": "validation (partition 1)"}  # the others: "test"
ARTBENCH = ("artbench2", "artbench5", "artbench10")


IMAGE_SIZE = {"digits": 8, "mnist": 28, "cifar10": 32, "cifar2": 32}  # fixed sizes; the others: image_size()


def image_size(data: dict) -> int:
    """Side of the data set's square images: fixed, or data.resolution (default ArtBench imagefolder 256, ArtBench
    batches 32, CelebA 64; folder: required)."""
    if data["dataset"] in ARTBENCH:
        return data.get("resolution", 32 if data.get("format") == "batches" else 256)
    if data["dataset"] in ("celeba", "folder"):
        return data.get("resolution", 64)  # folder: required (_check_folder_data)
    return IMAGE_SIZE[data["dataset"]]


def _check_torchvision_data(data: dict, model: dict) -> None:
    name = data["dataset"]
    if "root" not in data:
        raise ConfigError(f"data.root is required for data.dataset {name!r}: the directory holding its files")
    if "format" in data and name not in ARTBENCH:
        raise ConfigError(f"data.format applies to the ArtBench data sets only (data.dataset is {name!r})")
    if "resolution" in data and name not in (*ARTBENCH, "celeba"):
        raise ConfigError(f"data.resolution applies to ArtBench and CelebA only; {name}'s size is fixed")
    if data.get("format") == "batches" and data.get("resolution", 32) != 32:
        raise ConfigError("data.resolution: data.format batches holds 32x32 images (omit the key or use imagefolder)")
    n_train, n_test = TORCHVISION_SPLITS[name]
    if data["n_train"] > n_train:
        raise ConfigError(f"data.n_train = {data['n_train']} exceeds {name}'s {n_train} training images")
    if data["n_heldout"] > n_test:
        raise ConfigError(
            f"data.n_heldout = {data['n_heldout']} exceeds {name}'s {n_test} {HELDOUT_SPLIT.get(name, 'test')} images"
        )
    _check_halvings(data, model)


def _check_halvings(data: dict, model: dict) -> None:
    # the UNet halves the resolution between blocks (not after the last); the up path must find the same sizes
    size, halvings = image_size(data), len(model["block_out_channels"]) - 1
    if size % 2**halvings:
        raise ConfigError(
            f"model.block_out_channels: {halvings + 1} blocks halve {data['dataset']}'s {size}x{size} images "
            f"{halvings} times; {size} is not divisible by {2**halvings} (use fewer blocks)"
        )


FOLDER_KEYS = ("channels", "captions", "heldout_folder", "heldout_captions")  # data.<key>: folder only


def _check_folder_data(data: dict, model: dict) -> None:
    """data.dataset folder (core/folder.py): what the folder's files cannot tell is checked here; the files
    themselves (and how many images there are) by the data stage."""
    if "root" not in data:
        raise ConfigError("data.root is required for data.dataset 'folder': the folder of your training images")
    if "resolution" not in data:
        raise ConfigError(
            "data.resolution is required for data.dataset 'folder': the side of the square images the model sees "
            "(each image is centre-cropped to a square and resized to it)"
        )
    if "format" in data:
        raise ConfigError("data.format applies to the ArtBench data sets only (data.dataset is 'folder')")
    if "heldout_captions" in data and "heldout_folder" not in data:
        raise ConfigError(
            "data.heldout_captions needs data.heldout_folder (without it the held-out images come from data.root "
            "and data.captions covers them)"
        )
    if "heldout_captions" in data and "captions" not in data:
        raise ConfigError("data.heldout_captions needs data.captions (the training images' captions)")
    if "captions" in data and "heldout_folder" in data and "heldout_captions" not in data:
        raise ConfigError(
            "data.heldout_captions is required with data.captions and data.heldout_folder: the CSV (header "
            "file,caption) of the held-out images"
        )
    if model.get("family") == "latent" and "captions" not in data:
        raise ConfigError(
            "data.captions is required with model.family latent (text-conditional): a CSV with header file,caption "
            "naming every image of data.root"
        )
    _check_halvings(data, model)


def check_workflow_support(config: dict) -> None:
    """Refuse settings the library accepts but the Snakemake stages do not use yet (never silently ignore them).

    Every DDPM measurement (loss, elbo, timestep_loss, trajectory) is computed by the measure rule;
    model.family vesde: see _check_vesde_support."""
    if config["model"].get("family", "ddpm") == "vesde":
        _check_vesde_support(config)
    _check_model_family_support(config)


def _check_query_measurements(config: dict) -> None:
    """A method's query_measurement (scorers that take one: Scorer.takes_query_measurement) must be a measured
    target: its lambda is tuned on it."""
    targets = measured_targets(config)
    takers = [family for family, scorer in SCORERS.items() if scorer.takes_query_measurement]
    for method, m in config["scores"]["methods"].items():
        target = m.get("query_measurement")
        if target is not None and not get_scorer(m["family"]).takes_query_measurement:
            raise ConfigError(
                f"scores.methods.{method}.query_measurement: family {m['family']} takes loss query "
                f"gradients only (query_measurement: {', '.join(takers)})"
            )
        if target is not None and target not in targets:
            raise ConfigError(
                f"scores.methods.{method}.query_measurement: {target!r} is not measured "
                f"(measure.measurements gives the targets {targets})"
            )


def _check_model_family_support(config: dict) -> None:
    """Every method's scorer runs on the configured model family (Scorer.model_families), else it is refused with
    the scorer's reason."""
    model_family = config["model"].get("family", "ddpm")
    runs = [family for family, scorer in SCORERS.items() if model_family in scorer.model_families]
    for name, method in config["scores"]["methods"].items():
        scorer = get_scorer(method["family"])
        if model_family not in scorer.model_families:
            raise ConfigError(
                f"scores.methods.{name} (family {method['family']}) cannot run with model.family "
                f"{model_family}: {scorer.refused_reason}. Remove it in the overlay ({name}: null); "
                f"{model_family} runs the families {', '.join(runs)}"
            )


def _check_vesde_support(config: dict) -> None:
    """What the workflow runs for model.family vesde: train (DSM), sample (probability-flow ODE), measure
    (exact bits/dim), the likelihood sanity check and the scorers that declare vesde; everything else is refused."""
    measurements = list(config["measure"].get("measurements", DEFAULT_MEASUREMENTS["vesde"]))
    if measurements != ["likelihood"]:
        raise ConfigError(
            f"measure.measurements {measurements}: with model.family vesde the measure rule computes "
            "['likelihood'] (exact bits/dim)"
        )


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
            raise ConfigError(
                f"counterfactual.k = {k} of {n_train} training examples rounds to 0 removed; use a larger fraction"
            )
    else:
        raise ConfigError(f"counterfactual.k must be a fraction (0 < k < 1) or a count (integer >= 1), got {k!r}")
    if count >= n_train:
        raise ConfigError(
            f"counterfactual.k = {k} removes {count} of {n_train} training examples; at least one must remain"
        )
    return count


def _check_counterfactual(config: dict) -> None:
    cf, methods = config["counterfactual"], config["scores"]["methods"]
    if cf["queries"] > config["sample"]["n_generated"]:
        raise ConfigError(
            f"counterfactual.queries = {cf['queries']} exceeds sample.n_generated = "
            f"{config['sample']['n_generated']} (the counterfactual queries are the first generated ones)"
        )
    for method in cf["methods"]:
        if method == "random":
            raise ConfigError("counterfactual.methods: 'random' is the built-in baseline (always run); remove it")
        if method not in methods:
            raise ConfigError(f"counterfactual.methods: {method!r} is not in scores.methods")
        reason = get_scorer(methods[method]["family"]).unavailable(method, methods[method])
        if reason:
            raise ConfigError(f"counterfactual.methods: {method!r} has no scores {reason}")
    removal_count(cf["k"], config["data"]["n_train"])


def _check_figures(config: dict) -> None:
    fig, methods = config["figures"], config["scores"]["methods"]
    for q in fig["queries"]:
        if q >= config["sample"]["n_generated"]:
            raise ConfigError(
                f"figures.queries: generated query {q} does not exist "
                f"(sample.n_generated = {config['sample']['n_generated']})"
            )
    for method in fig["methods"]:
        if method not in methods:
            raise ConfigError(f"figures.methods: {method!r} is not in scores.methods")


def _check_methods(config: dict) -> None:
    """Each method's own cross-field checks (Scorer.check), e.g. the metagradient's fixed-seed ground truth."""
    for name, method in config["scores"]["methods"].items():
        try:
            get_scorer(method["family"]).check(name, method, config)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
