"""Settings that look valid but fail late or mean nothing, refused by workflow_scripts.dag.config before any job
runs, naming the field: non-finite numbers, integers written as floats, LDS fractions that empty or fill every
subset, timestep budgets beyond the diffusion's timesteps, an overlay's empty scores.methods."""

import jsonschema
import pytest
import yaml

from workflow_scripts.core.data import make_subsets
from workflow_scripts.dag.config import ConfigError, check_overlay, full_schema, load_config, validate_config


def _load(repo, tmp_path, overlay_text: str) -> dict:
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(overlay_text)
    return load_config(repo / "params.yaml", repo / "configs" / "smoke.yaml", overlay)


# ---------------------------------------------------------------- NaN and infinity


@pytest.mark.parametrize(
    "overlay, named",
    [
        ("train: {lr: .nan}", "train.lr = nan"),
        ("train: {lr: .inf}", "train.lr = inf"),
        ("lds: {fraction: .nan}", "lds.fraction = nan"),
        ("diffusion: {beta_end: -.inf}", "diffusion.beta_end = -inf"),
        ("kfac: {lambda_grid: [1.0, .nan]}", "kfac.lambda_grid[1] = nan"),
        ("scores: {methods: {kfac_x: {family: kfac, lambda_grid: [.inf]}}}", "scores.methods.kfac_x.lambda_grid[0]"),
    ],
)
def test_non_finite_number_anywhere_is_refused_naming_its_key_path(repo, tmp_path, overlay, named):
    with pytest.raises(ConfigError, match="NaN or infinite") as error:
        _load(repo, tmp_path, overlay)
    assert named in str(error.value)


def test_schema_bounds_alone_let_nan_through(smoke_config):
    """Why the separate check: every comparison with NaN is false, so `exclusiveMinimum: 0` never fires."""
    config = yaml.safe_load(yaml.safe_dump(smoke_config))
    config["train"]["lr"] = float("nan")
    assert not list(jsonschema.Draft202012Validator(full_schema()).iter_errors(config))
    with pytest.raises(ConfigError, match=r"train\.lr = nan"):
        validate_config(config)


# ---------------------------------------------------------------- integers written as floats


@pytest.mark.parametrize(
    "overlay, field",
    [
        ("data: {n_train: 40.0}", "data.n_train"),
        ("train: {steps: 20.0}", "train.steps"),
        ("gradients: {timesteps: 2.0}", "gradients.timesteps"),
        ("seeds: {train: 2.0}", "seeds.train"),
    ],
)
def test_integer_written_as_float_is_refused_naming_the_field(repo, tmp_path, overlay, field):
    with pytest.raises(ConfigError) as error:
        _load(repo, tmp_path, overlay)
    assert f"{field}:" in str(error.value) and "'integer'" in str(error.value)


def test_float_integer_would_fail_late_without_the_check():
    """The fault the check prevents: plain JSON Schema accepts 40.0 as an integer, and the stages then fail."""
    assert jsonschema.Draft202012Validator({"type": "integer"}).is_valid(40.0)
    with pytest.raises(TypeError):
        make_subsets(40.0, {"fraction": 0.5, "n_subsets": 4, "n_tuning": 2}, 0)


# ---------------------------------------------------------------- LDS subsets


def test_lds_fraction_that_empties_every_subset_is_refused(repo, tmp_path):
    # the fault: round(0.01 * 40) = 0 examples per subset, every subset model would train on nothing
    assert make_subsets(40, {"fraction": 0.01, "n_subsets": 4, "n_tuning": 2}, 0)["masks"].sum() == 0
    with pytest.raises(ConfigError, match=r"lds\.fraction = 0\.01 of data\.n_train = 40 rounds to 0") as error:
        _load(repo, tmp_path, "lds: {fraction: 0.01}")
    assert "empty" in str(error.value)


def test_lds_fraction_that_makes_every_subset_the_full_set_is_refused(repo, tmp_path):
    # the fault: round(0.99 * 40) = 40, every subset is the full training set and every prediction is the same
    assert make_subsets(40, {"fraction": 0.99, "n_subsets": 4, "n_tuning": 2}, 0)["masks"].all()
    with pytest.raises(ConfigError, match=r"lds\.fraction = 0\.99 of data\.n_train = 40 rounds to all 40") as error:
        _load(repo, tmp_path, "lds: {fraction: 0.99}")
    assert "full training set" in str(error.value)


def test_lds_fraction_leaving_one_example_out_is_accepted(repo, tmp_path):
    assert _load(repo, tmp_path, "lds: {fraction: 0.975}")["lds"]["fraction"] == 0.975  # 39 of 40


# ---------------------------------------------------------------- timestep budgets


def test_gradient_timesteps_beyond_the_diffusion_timesteps_are_refused(repo, tmp_path):
    overlay = (
        "diffusion: {num_train_timesteps: 50}\ngradients: {timesteps: 64}\nmeasure: {timestep_loss: {timesteps: [10]}}"
    )
    with pytest.raises(ConfigError, match=r"gradients\.timesteps = 64 exceeds diffusion\.num_train_timesteps = 50"):
        _load(repo, tmp_path, overlay)


def test_a_methods_own_timesteps_beyond_the_diffusion_timesteps_are_refused(repo, tmp_path):
    # params.yaml's trak_k100 fixes 100 timesteps of its own
    overlay = "diffusion: {num_train_timesteps: 50}\nmeasure: {timestep_loss: {timesteps: [10]}}"
    with pytest.raises(ConfigError, match=r"scores\.methods\.trak_k100\.timesteps = 100 exceeds diffusion"):
        _load(repo, tmp_path, overlay)


def test_timesteps_equal_to_the_diffusion_timesteps_are_accepted(repo, tmp_path):
    overlay = (
        "diffusion: {num_train_timesteps: 100}\ngradients: {timesteps: 100}\n"
        "measure: {timestep_loss: {timesteps: [10]}}\n"
        "scores: {methods: {nda: {timesteps: [25, 50, 99]}, nda_multiscale: {timesteps: [25, 50, 99]}}}"
    )
    assert _load(repo, tmp_path, overlay)["gradients"]["timesteps"] == 100


def test_a_noise_timestep_sweep_beyond_the_diffusion_timesteps_is_refused(repo, tmp_path):
    # params.yaml's nda sweeps noise timesteps up to 400; the last training timestep is T - 1
    overlay = "diffusion: {num_train_timesteps: 300}\nmeasure: {timestep_loss: {timesteps: [10]}}"
    with pytest.raises(ConfigError, match=r"scores\.methods\.nda\.timesteps = \[25, 50, 100, 200, 400\] names"):
        _load(repo, tmp_path, overlay)


# ---------------------------------------------------------------- overlays


def test_overlay_with_empty_methods_is_refused(repo, tmp_path):
    with pytest.raises(ConfigError, match=r"overlay\.yaml: scores\.methods is empty .* changes nothing"):
        _load(repo, tmp_path, "scores: {methods: {}}")


def test_overlay_check_of_the_snakefile_sees_the_merged_command_line_overlays():
    """The Snakefile passes Snakemake's merged --configfile/--config values to check_overlay."""
    with pytest.raises(ConfigError, match="--configfile: scores.methods is empty"):
        check_overlay({"scores": {"methods": {}, "lambda_grid": [1.0]}}, "--configfile")
    check_overlay({"scores": {"methods": {"trak": None}}}, "--configfile")  # removing a method is fine
