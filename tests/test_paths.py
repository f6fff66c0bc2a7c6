"""Artefact paths and per-job configurations (workflow_scripts.paths): what decides which jobs rerun."""
import json

import pytest

from workflow_scripts import paths


def test_curvature_variant_resolves_method_overrides(base_config):
    methods = base_config["scores"]["methods"]
    variants = {paths.curvature_variant(base_config, m) for m, c in methods.items() if c["family"] == "kfac"}
    assert variants == {"mc-expand", "mc-reduce", "empirical-expand", "empirical-reduce", "mc-expand-ekfac"}
    assert paths.curvature_variant(base_config, "kfac_float32") == "mc-expand"  # quantisation needs no other fit


@pytest.mark.parametrize("variant", ["mc-expand", "empirical-reduce", "mc-reduce-ekfac", "type-2-expand"])
def test_curvature_variant_round_trip(variant):
    parsed = paths.parse_curvature_variant(variant)
    assert f"{parsed['fisher_type']}-{parsed['kfac_approx']}" + ("-ekfac" if parsed["ekfac"] else "") == variant
    args = paths.curvature_variant_args(variant).split()
    assert args[args.index("--fisher-type") + 1] == parsed["fisher_type"]
    assert ("--ekfac" in args) == parsed["ekfac"] and ("--no-ekfac" in args) != parsed["ekfac"]


@pytest.mark.parametrize("bad", ["mc", "kfac-expand", "mc-expand-ekfac-x", "MC-expand"])
def test_bad_curvature_variant_is_named(bad):
    with pytest.raises(ValueError, match=bad):
        paths.parse_curvature_variant(bad)


def test_scores_config_holds_only_its_method(base_config):
    cfg = json.loads(paths.scores_config(base_config, "trak"))
    assert cfg["scores"]["methods"] == {"trak": base_config["scores"]["methods"]["trak"]}
    assert cfg["scores"]["lambda_grid"] == base_config["scores"]["lambda_grid"]
    assert "kfac" not in cfg and "model" not in cfg  # a kfac setting must not rerun TRAK
    kfac = json.loads(paths.scores_config(base_config, "kfac"))
    for key in paths.SCORER_SECTIONS["kfac"]:
        section, *rest = key.split(".")
        assert section in kfac and (not rest or rest[0] in kfac[section])
    assert kfac["seeds"] == {"gradients": base_config["seeds"]["gradients"], "measure": base_config["seeds"]["measure"]}


def test_kfac_method_reads_model_and_its_curvature(base_config):
    inputs = paths.method_model_inputs(base_config, "ekfac")
    assert inputs == {"model": "results/digits/models/full/model.pt", "curvature": "results/digits/curvature/mc-expand-ekfac.pt"}
    assert paths.method_model_args(base_config, "ekfac") == \
        "--model results/digits/models/full/model.pt --curvature results/digits/curvature/mc-expand-ekfac.pt"
    assert paths.method_model_inputs(base_config, "trak") == {}


def test_curvature_config_ignores_scoring_keys(base_config):
    """Changing how K-FAC scores (lambda grid, quantisation, gradient draws) must not refit the curvature."""
    import copy

    other = copy.deepcopy(base_config)
    other["kfac"].update(lambda_grid=[1.0], quantization="float32", gradient_draws=3, query_draws=5, fisher_type="empirical")
    assert paths.stage_config(other, "curvature") == paths.stage_config(base_config, "curvature")
    other["kfac"]["draws"] = 65
    assert paths.stage_config(other, "curvature") != paths.stage_config(base_config, "curvature")
