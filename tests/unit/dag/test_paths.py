"""Artefact paths and per-job configurations (workflow_scripts.dag.paths): what decides which jobs rerun."""

import copy
import json
import re
import tokenize

import pytest

from workflow_scripts.dag import paths
from workflow_scripts.scorers import get_scorer


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
    assert "kfac" not in cfg  # a kfac setting must not rerun TRAK
    # TRAK checks its stores against the run's model and projector (core/store.py store_provenance), nothing more
    assert cfg["gradients"] == {
        k: base_config["gradients"][k] for k in ("projection", "projection_dim", "sjlt_nonzeros")
    }
    assert cfg["model"] == base_config["model"] and set(cfg["seeds"]) == {"gradients", "projection"}
    assert "model" not in json.loads(paths.scores_config(base_config, "pixel_cosine"))  # a method without stores
    kfac = json.loads(paths.scores_config(base_config, "kfac"))
    for key in get_scorer("kfac").config_keys:
        section, *rest = key.split(".")
        assert section in kfac and (not rest or rest[0] in kfac[section])
    assert kfac["seeds"] == {"gradients": base_config["seeds"]["gradients"], "measure": base_config["seeds"]["measure"]}


def test_kfac_method_reads_model_and_its_curvature(base_config):
    inputs = paths.method_model_inputs(base_config, "ekfac")
    assert inputs == {
        "model": "results/digits/models/full/model.pt",
        "curvature": "results/digits/curvature/mc-expand-ekfac.pt",
    }
    assert (
        paths.method_model_args(base_config, "ekfac")
        == "--model results/digits/models/full/model.pt --curvature results/digits/curvature/mc-expand-ekfac.pt"
    )
    assert paths.method_model_inputs(base_config, "trak") == {}


def test_kfac_family_is_one_job(base_config):
    """The kfac methods leave rule `scores` for one family job: its --method / --out-dir list every method in order,
    --model once (shared), --curvature once per method (their variants differ), and its config holds exactly them."""
    methods = base_config["scores"]["methods"]
    kfac = [m for m, c in methods.items() if c["family"] == "kfac"]
    assert paths.shared_pass_families(base_config) == {"kfac": kfac}
    assert paths.separate_methods(base_config) == [m for m in methods if m not in kfac]
    args = paths.family_scores_args(base_config, "kfac").split(" --")
    assert args[0] == "--method " + " ".join(kfac)
    assert args[1] == "out-dir " + " ".join(f"results/digits/scores/{m}" for m in kfac)
    assert args[2] == "model results/digits/models/full/model.pt"
    assert args[3] == "curvature " + " ".join(
        paths.curvature_file(base_config, paths.curvature_variant(base_config, m)) for m in kfac
    )
    assert sorted(paths.family_model_inputs(base_config, "kfac")) == sorted(
        {"results/digits/models/full/model.pt"}
        | {paths.curvature_file(base_config, paths.curvature_variant(base_config, m)) for m in kfac}
    )
    config = json.loads(paths.family_scores_config(base_config, "kfac"))
    assert sorted(config["scores"]["methods"]) == sorted(kfac) and "kfac" in config and "gradients" not in config
    only_float32 = copy.deepcopy(base_config)  # one variant: --curvature given once
    only_float32["scores"]["methods"] = {m: c for m, c in methods.items() if m in ("kfac", "kfac_float32", "trak")}
    assert paths.family_scores_args(only_float32, "kfac").endswith("--curvature results/digits/curvature/mc-expand.pt")
    assert re.fullmatch(paths.scores_method_pattern(only_float32), "trak")
    assert not re.fullmatch(paths.scores_method_pattern(only_float32), "kfac_float32")


def test_curvature_config_ignores_scoring_keys(base_config):
    """Changing how K-FAC scores (lambda grid, quantisation, gradient draws) must not refit the curvature."""
    import copy

    other = copy.deepcopy(base_config)
    other["kfac"].update(
        lambda_grid=[1.0], quantization="float32", gradient_draws=3, query_draws=5, fisher_type="empirical"
    )
    assert paths.stage_config(other, "curvature") == paths.stage_config(base_config, "curvature")
    other["kfac"]["draws"] = 65
    assert paths.stage_config(other, "curvature") != paths.stage_config(base_config, "curvature")


# ---------------------------------------------------------------- metagradient: chunk jobs, fixed-seed retrainings
def _with_magic(config, **method):
    import copy

    cfg = copy.deepcopy(config)
    cfg["scores"]["methods"] = {"trak": cfg["scores"]["methods"]["trak"], "magic": {"family": "metagradient", **method}}
    return cfg


def test_metagradient_chunks_split_the_first_queries_of_each_set(base_config):
    cfg = _with_magic(base_config, max_queries=3, queries_per_job=4)
    queries = paths.metagradient_queries(cfg, "magic")
    assert queries == [
        ("generated", 0),
        ("generated", 1),
        ("generated", 2),
        ("heldout", 0),
        ("heldout", 1),
        ("heldout", 2),
    ]
    assert paths.metagradient_chunks(cfg, "magic") == [queries[:4], queries[4:]]
    assert paths.metagradient_chunk_files(cfg, "magic") == [
        "results/digits/scores/magic/chunks/chunk000.npz",
        "results/digits/scores/magic/chunks/chunk001.npz",
    ]
    assert paths.metagradient_chunk_args(cfg, "magic", "chunk000") == "--queries generated=0,1,2 heldout=0"
    assert paths.metagradient_chunk_args(cfg, "magic", "chunk001") == "--queries heldout=1,2"
    with pytest.raises(ValueError, match="no chunk 'chunk002'"):
        paths.metagradient_chunk_args(cfg, "magic", "chunk002")
    assert paths.metagradient_chunk_option(cfg, "magic").split() == [
        "--chunks",
        *paths.metagradient_chunk_files(cfg, "magic"),
    ]
    assert paths.metagradient_chunk_files(cfg, "trak") == [] and paths.metagradient_chunk_option(cfg, "trak") == ""
    # null: every query, one job
    every = _with_magic(base_config, max_queries=None, queries_per_job=None)
    n = base_config["sample"]["n_generated"] + base_config["data"]["n_heldout"]
    assert [len(c) for c in paths.metagradient_chunks(every, "magic")] == [n]
    # a chunk job's config: training + measurement keys and only its method (a TRAK edit does not rerun it)
    job = json.loads(paths.metagradient_config(cfg, "magic"))
    assert job["scores"] == {"methods": {"magic": cfg["scores"]["methods"]["magic"]}}
    assert {"train", "model", "diffusion", "measure", "data", "compute"} <= set(job) and "lds" not in job
    assert job["seeds"] == {"train": cfg["seeds"]["train"], "measure": cfg["seeds"]["measure"]}


def test_fixed_seed_retrainings_are_a_retraining_kind(base_config):
    import re

    cfg = _with_magic(base_config, max_queries=1)
    names = paths.fixed_seed_names(cfg)
    lds, loo = cfg["lds"], cfg["fixed_seed"]["loo_sets"]
    assert names == [f"subset{j:03d}" for j in range(lds["n_tuning"], lds["n_subsets"])] + [
        f"loo{k:03d}" for k in range(loo)
    ]
    for name in ("subset012", "loo003"):
        assert re.fullmatch(paths.RETRAINING_KIND_PATTERN, "fixed_seed")
        assert re.fullmatch(paths.RETRAINING_NAME_PATTERN, name)
        inputs = paths.retraining_inputs(cfg, "fixed_seed", name)
        assert inputs == {
            "dataset": "results/digits/data/dataset.npz",
            "membership": "results/digits/fixed_seed/sets.npz",
        }
        assert (
            paths.retraining_args("fixed_seed", name, inputs["membership"])
            == f"--fixed-seed-sets results/digits/fixed_seed/sets.npz --fixed-seed-set {name} --replicate 0"
        )
        assert paths.fixed_seed_model(cfg, name) == f"results/digits/fixed_seed/{name}/model.pt"
    assert paths.fixed_seed_model(cfg, "full") == "results/digits/models/full/model.pt"  # w = 1 is the full model
    files = paths.fixed_seed_measurements(cfg)
    assert files[0] == "results/digits/fixed_seed/full/measurement.npz" and len(files) == len(names) + 1
    assert all(re.fullmatch(paths.FIXED_SEED_NAME_PATTERN, f.split("/")[-2]) for f in files)
    for kind, name in (
        ("fixed_seed", "subset003_seed0"),
        ("fixed_seed", "full"),
        ("models", "subset003"),
        ("fixed_seed", "trak/q000"),
    ):
        with pytest.raises(ValueError, match="unknown retraining"):
            paths.retraining_inputs(cfg, kind, name)
    # without a metagradient method nothing is retrained for it
    no_magic = _with_magic(base_config)
    no_magic["scores"]["methods"].pop("magic")
    assert paths.fixed_seed_names(no_magic) == [] == paths.fixed_seed_measurements(no_magic)


# ---------------------------------------------------------------- the rules spell no path
# a path with an artefact's extension (a bare file name such as scores_file's "sweep.csv" is not a path)
ARTEFACT = re.compile(r"/.*\.(?:npz|npy|pt|json|csv|md|png|pdf|html|log)\b")


def rule_strings(path):
    """The NAME and string tokens of a Snakefile (comments dropped; f-string pieces on Python >= 3.12)."""
    strings = {tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    with open(path) as f:
        tokens = list(tokenize.generate_tokens(f.readline))
    return [t.string for t in tokens if t.type == tokenize.NAME], [t.string for t in tokens if t.type in strings]


def test_rules_spell_no_artefact_path(repo):
    """Every path template lives in dag/paths.py: the Snakefile and rules/*.smk call it and spell none themselves."""
    files = [repo / "Snakefile", *sorted((repo / "rules").glob("*.smk"))]
    assert len(files) > 10
    for path in files:
        names, strings = rule_strings(path)
        assert "ROOT" not in names, path.name
        for s in strings:
            assert "results/" not in s and "{ROOT" not in s and not ARTEFACT.search(s), (
                f"{path.name} spells a path: {s}"
            )


def test_the_journey_store_reads_the_guidance_of_a_latent_sampler_only(base_config):
    # the latent family's Journey features re-noise the guided x0-prediction: its job must get (and be rerun on) the
    # guidance scale; a pixel family's journey job keeps exactly the gradients stage's configuration
    assert paths.stage_config(base_config, "gradients_journey") == paths.stage_config(base_config, "gradients")
    latent = copy.deepcopy(base_config)
    latent["model"]["family"] = "latent"
    latent["sample"]["guidance_scale"] = 3.0
    assert json.loads(paths.stage_config(latent, "gradients_journey"))["sample"] == {"guidance_scale": 3.0}
    assert "sample" not in json.loads(paths.stage_config(latent, "gradients"))
