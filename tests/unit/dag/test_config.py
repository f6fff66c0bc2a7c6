"""Unit tests of workflow_scripts.dag.config: schema validation, cross-field checks, overlays, deep_merge."""

import copy

import pytest
import yaml

from workflow_scripts.core.contracts import config_hash
from workflow_scripts.dag.config import N_DIGITS, ConfigError, deep_merge, load_config, validate_config


def _with(config: dict, dotted: str, value) -> dict:
    """A deep copy of config with the value at a dotted path replaced (or added)."""
    out = copy.deepcopy(config)
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node[key]
    node[last] = value
    return out


def _without(config: dict, dotted: str) -> dict:
    out = copy.deepcopy(config)
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node[key]
    del node[last]
    return out


# ---------------------------------------------------------------- valid configurations


def test_params_yaml_loads(repo, base_config):
    config = load_config(repo / "params.yaml")
    assert config == base_config
    assert config["benchmark"] == "digits"
    assert config["data"]["dataset"] == "digits"


def test_params_plus_smoke_overlay_loads(repo, base_config, smoke_config):
    smoke = yaml.safe_load((repo / "configs" / "smoke.yaml").read_text())
    assert smoke_config["benchmark"] == smoke["benchmark"]
    # overlaid values win ...
    assert smoke_config["train"]["steps"] == smoke["train"]["steps"]
    assert smoke_config["model"]["block_out_channels"] == smoke["model"]["block_out_channels"]
    # ... keys the overlay does not mention keep the params.yaml value
    assert smoke_config["train"]["lr"] == base_config["train"]["lr"]
    assert smoke_config["diffusion"] == base_config["diffusion"]
    # (the overlay only adds methods: every params.yaml method is kept as it is)
    assert smoke_config["scores"]["methods"] == {
        **base_config["scores"]["methods"],
        **smoke["scores"].get("methods", {}),
    }


def test_empty_overlay_is_a_no_op(repo, tmp_path, base_config):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(repo / "params.yaml", empty) == base_config


def test_overlay_with_bad_value_is_rejected(repo, tmp_path):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text("train: {batch_size: 0}\n")
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(repo / "params.yaml", overlay)


def test_later_overlay_wins(repo, tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("train: {steps: 400, batch_size: 4}\n")
    second.write_text("train: {steps: 500}\n")
    config = load_config(repo / "params.yaml", first, second)
    assert config["train"]["steps"] == 500
    assert config["train"]["batch_size"] == 4


# ---------------------------------------------------------------- schema errors name the bad field


@pytest.mark.parametrize(
    "dotted, value, field",
    [
        ("train.steps", "ten", "train.steps"),  # wrong type
        ("train.lr", "1e-3", "train.lr"),  # a string, not a number
        ("model.block_out_channels", 32, "model.block_out_channels"),  # scalar, not a list
        ("model.attention", [False, "yes"], "model.attention.1"),  # wrong item type
        ("lds.fraction", 1.5, "lds.fraction"),  # out of range (exclusive maximum 1)
        ("lds.fraction", 0, "lds.fraction"),  # out of range (exclusive minimum 0)
        ("lds.ci", 1.0, "lds.ci"),
        ("train.batch_size", 0, "train.batch_size"),  # minimum 1
        ("train.lr", 0, "train.lr"),
        ("train.warmup_fraction", 1.2, "train.warmup_fraction"),
        ("seeds.train", -1, "seeds.train"),
        ("data.n_train", 3, "data.n_train"),
        ("data.dataset", "cifar99", "data.dataset"),  # not in the enum
        ("gradients.projection", "sparse", "gradients.projection"),
        ("gradients.sjlt_nonzeros", 0, "gradients.sjlt_nonzeros"),
        ("compute.device", "tpu", "compute.device"),
        ("scores.lambda_grid", [], "scores.lambda_grid"),
        ("scores.lambda_grid", [0.1, -1.0], "scores.lambda_grid.1"),
        ("benchmark", "has space", "benchmark"),
    ],
)
def test_schema_error_names_field(base_config, dotted, value, field):
    with pytest.raises(ConfigError) as info:
        validate_config(_with(base_config, dotted, value))
    message = str(info.value)
    assert f"  {field}:" in message, message


def test_misspelled_key_is_named(base_config):
    bad = _without(base_config, "train.steps")
    bad["train"]["stepz"] = 10
    with pytest.raises(ConfigError) as info:
        validate_config(bad)
    message = str(info.value)
    assert "stepz" in message
    assert "train:" in message
    assert "'steps' is a required property" in message


def test_extra_key_alone_is_rejected(base_config):
    with pytest.raises(ConfigError, match="stepz"):
        validate_config(_with(base_config, "train.stepz", 10))


def test_unknown_top_level_section(base_config):
    with pytest.raises(ConfigError, match="trian"):
        validate_config(_with(base_config, "trian", {"steps": 1}))


def test_missing_section_is_named(base_config):
    with pytest.raises(ConfigError, match="'measure' is a required property"):
        validate_config(_without(base_config, "measure"))


def test_bad_method_entry_names_method(base_config):
    bad = _with(base_config, "scores.methods.bogus", {"family": "trak", "output_function": "cube"})
    with pytest.raises(ConfigError, match=r"scores\.methods\.bogus"):
        validate_config(bad)


@pytest.mark.parametrize(
    "entry, expected",
    [
        # a wrong value of a family's setting
        ({"family": "trak", "output_function": "cube"}, "scores.methods.bad.output_function: 'cube' is not one of"),
        # a misspelled setting: named, with the family's settings
        (
            {"family": "trak", "output_function": "loss", "timestep": 10},
            "scores.methods.bad.timestep: not a setting of family trak (its settings: ensemble, family, "
            "lambda_grid, output_function, query_measurement, timesteps)",
        ),
        # a required setting left out
        ({"family": "tracin", "similarity": "dot"}, "scores.methods.bad.output_function: missing (family tracin"),
        # inside a list
        (
            {"family": "trak", "output_function": "loss", "lambda_grid": [0.1, -1]},
            "scores.methods.bad.lambda_grid.1: -1 is less than or equal to the minimum of 0",
        ),
        # a family with two forms: the one the entry picks (form: vector) is the one checked
        (
            {"family": "das", "form": "vector", "leverage": True},
            "scores.methods.bad.output_directions: missing (family das requires",
        ),
        ({"family": "das", "form": "vektor", "leverage": True}, "scores.methods.bad.form: 'vektor' is not one of"),
        ({"family": "trakk"}, "scores.methods.bad.family: unknown scorer family 'trakk' (one of clip, das,"),
        ({"output_function": "loss"}, "scores.methods.bad: the entry has no family key"),
        ("trak", "scores.methods.bad: a method entry is a mapping with a family key, got 'trak'"),
    ],
)
def test_bad_method_entry_names_the_key_of_its_family(base_config, entry, expected):
    with pytest.raises(ConfigError) as info:
        validate_config(_with(base_config, "scores.methods.bad", entry))
    message = str(info.value)
    assert expected in message, message
    assert "is not valid under any of the given schemas" not in message


def test_error_message_lists_several_fields(base_config):
    bad = _with(_with(base_config, "train.steps", 0), "lds.fraction", 2.0)
    with pytest.raises(ConfigError) as info:
        validate_config(bad)
    assert "train.steps" in str(info.value) and "lds.fraction" in str(info.value)


# ---------------------------------------------------------------- cross-field checks


def test_too_many_digits(base_config):
    bad = _with(_with(base_config, "data.n_train", N_DIGITS), "data.n_heldout", 1)
    with pytest.raises(ConfigError, match=r"data\.n_train \+ data\.n_heldout"):
        validate_config(bad)
    # exactly all digits is fine
    validate_config(_with(_with(base_config, "data.n_train", N_DIGITS - 1), "data.n_heldout", 1))


def test_n_tuning_leaves_two_evaluation_subsets(base_config):
    n = base_config["lds"]["n_subsets"]
    with pytest.raises(ConfigError, match=r"lds\.n_tuning"):
        validate_config(_with(base_config, "lds.n_tuning", n - 1))
    validate_config(_with(base_config, "lds.n_tuning", n - 2))


def test_attention_length_must_match_blocks(base_config):
    with pytest.raises(ConfigError, match=r"model\.attention"):
        validate_config(_with(base_config, "model.attention", [False, True, True]))


def test_block_width_divisible_by_groups(base_config):
    bad = _with(base_config, "model.block_out_channels", [32, 36])
    with pytest.raises(ConfigError, match=r"model\.block_out_channels entry 36.*model\.norm_num_groups"):
        validate_config(bad)


def test_resume_every_at_most_steps(base_config):
    steps = base_config["train"]["steps"]
    with pytest.raises(ConfigError, match=r"train\.resume_every"):
        validate_config(_with(base_config, "train.resume_every", steps + 1))
    validate_config(_with(base_config, "train.resume_every", steps))


def test_sjlt_nonzeros_at_most_projection_dim(base_config):
    dim = base_config["gradients"]["projection_dim"]
    with pytest.raises(ConfigError, match=r"gradients\.sjlt_nonzeros"):
        validate_config(_with(base_config, "gradients.sjlt_nonzeros", dim + 1))
    validate_config(_with(_with(base_config, "gradients.sjlt_nonzeros", dim), "gradients.projection", "sjlt"))


def test_valid_config_is_not_mutated(base_config):
    before = copy.deepcopy(base_config)
    validate_config(base_config)
    assert base_config == before


# ---------------------------------------------------------------- deep_merge


def test_deep_merge_nested_overlay_wins_key_by_key():
    base = {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": 2}
    overlay = {"a": {"y": {"q": 3, "r": 4}}, "c": 5}
    assert deep_merge(base, overlay) == {"a": {"x": 1, "y": {"p": 1, "q": 3, "r": 4}}, "b": 2, "c": 5}


def test_deep_merge_replaces_lists_and_scalars():
    base = {"grid": [1, 2, 3], "name": "a", "d": {"k": 1}}
    merged = deep_merge(base, {"grid": [9], "name": None, "d": 7})
    assert merged == {"grid": [9], "name": None, "d": 7}
    # a dict overlaying a scalar replaces it as well
    assert deep_merge({"d": 1}, {"d": {"k": 2}}) == {"d": {"k": 2}}


def test_deep_merge_does_not_alias_or_mutate():
    base = {"a": {"x": [1, 2]}, "b": {"y": 1}}
    overlay = {"b": {"z": [3]}, "c": {"w": 1}}
    base_copy, overlay_copy = copy.deepcopy(base), copy.deepcopy(overlay)
    merged = deep_merge(base, overlay)
    merged["a"]["x"].append(99)
    merged["b"]["z"].append(99)
    merged["c"]["w"] = 2
    assert base == base_copy
    assert overlay == overlay_copy


def test_deep_merge_empty_overlay_is_identity():
    base = {"a": {"b": 1}}
    merged = deep_merge(base, {})
    assert merged == base and merged is not base


def test_config_hash_is_order_independent_and_sensitive():
    a = {"x": 1, "y": {"p": [1, 2], "q": "s"}}
    b = {"y": {"q": "s", "p": [1, 2]}, "x": 1}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16
    assert config_hash(a) != config_hash({**a, "x": 2})


@pytest.mark.parametrize(
    "section, key, value, field",
    [
        ("model", "family", "vesde", "model.family"),
    ],
)
def test_library_only_settings_are_refused_by_the_workflow(base_config, section, key, value, field):
    """Valid for the library, but the rules would ignore them: the Snakefile refuses, naming the field."""
    import copy

    from workflow_scripts.dag.config import ConfigError, check_workflow_support

    check_workflow_support(base_config)
    config = copy.deepcopy(base_config)
    config[section][key] = value
    with pytest.raises(ConfigError, match=field):
        check_workflow_support(config)


def test_full_overlay_is_valid_and_larger(repo, base_config):
    full = load_config(repo / "params.yaml", repo / "configs" / "full.yaml")
    assert full["benchmark"] != base_config["benchmark"]  # its own results directory
    assert (
        full["lds"]["n_subsets"] * full["lds"]["n_seeds"]
        > base_config["lds"]["n_subsets"] * base_config["lds"]["n_seeds"]
    )


def test_method_order_is_params_then_overlay_methods_by_name(repo):
    """The tables' row order must not depend on how an overlay was merged (local vs cluster job processes)."""
    from workflow_scripts.dag.config import order_methods

    base = list(load_config(repo / "params.yaml")["scores"]["methods"])
    for first in (True, False):  # overlay methods merged before or after params.yaml's
        extra = {"zz_extra": {"family": "pixel"}, "aa_extra": {"family": "pixel"}}
        methods = {**extra, **{m: {} for m in base}} if first else {**{m: {} for m in base}, **extra}
        config = {"scores": {"methods": methods}}
        order_methods(config, repo / "params.yaml")
        assert list(config["scores"]["methods"]) == base + ["aa_extra", "zz_extra"]


def test_metagradient8_overlay_attributes_8_plus_8_queries_in_4_jobs(repo):
    """configs/metagradient8.yaml (README, "Metagradient"): only the metagradient method's query count changes."""
    from workflow_scripts.dag import paths

    base = load_config(repo / "params.yaml")
    config = load_config(repo / "params.yaml", repo / "configs/metagradient8.yaml")
    assert paths.metagradient_queries(base, "metagradient") == [("generated", 0), ("heldout", 0)]
    chunks = paths.metagradient_chunks(config, "metagradient")
    assert [len(c) for c in chunks] == [4, 4, 4, 4]
    assert sorted(q for c in chunks for q in c) == sorted(
        [("generated", q) for q in range(8)] + [("heldout", q) for q in range(8)]
    )
    assert config["scores"]["methods"]["metagradient"]["family"] == "metagradient"  # merged key by key
    base["scores"]["methods"]["metagradient"].update(max_queries=8, queries_per_job=4)
    assert config == base
