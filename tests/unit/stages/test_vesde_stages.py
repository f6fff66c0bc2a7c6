"""The VE-SDE family through the workflow's stages (train, sample, measure, regenerate, likelihood_sanity), run by
their command-line entry with the JSON configuration the rules pass, and the config-time refusals."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from fakes import TINY_MODEL

from workflow_scripts.__main__ import main
from workflow_scripts.core.common import ArtefactError, load_npz, load_torch
from workflow_scripts.dag import paths
from workflow_scripts.dag.config import ConfigError, check_workflow_support, load_config, validate_config
from workflow_scripts.families import vesde as V

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def config(repo):
    config = copy.deepcopy(load_config(repo / "params.yaml", repo / "configs" / "vesde.yaml"))
    config["data"].update(n_train=24, n_heldout=3)
    config["model"] = {**TINY_MODEL, "family": "vesde"}
    config["train"].update(steps=6, batch_size=8, checkpoint_every=3, resume_every=3)
    config["sample"].update(n_generated=3, num_inference_steps=3)
    config["measure"]["likelihood"] = {"solver": "euler", "n_steps": 2, "batch_size": 8}
    config["compute"] = {"device": "cpu", "threads": 1}
    validate_config(config)
    check_workflow_support(config)
    return config


def cli(config, stage, *args):
    assert main([stage, "--config", paths.stage_config(config, stage), *map(str, args)]) == 0


@pytest.fixture(scope="module")
def run_dir(config, tmp_path_factory):
    d = tmp_path_factory.mktemp("vesde_stages")
    cli(config, "data", "--dataset-out", d / "dataset.npz", "--subsets-out", d / "subsets.npz")
    cli(
        config,
        "train",
        "--dataset",
        d / "dataset.npz",
        "--subset",
        -1,
        "--out",
        d / "full.pt",
        "--checkpoints",
        d / "step0000003.pt",
        d / "step0000006.pt",
    )
    cli(config, "sample", "--model", d / "full.pt", "--out", d / "generated.npz")
    cli(
        config,
        "measure",
        "--model",
        d / "full.pt",
        "--dataset",
        d / "dataset.npz",
        "--samples",
        d / "generated.npz",
        "--subset",
        0,
        "--replicate",
        0,
        "--out",
        d / "measurement.npz",
    )
    return d


# ---------------------------------------------------------------- configuration
def test_vesde_overlay_is_supported_and_ddpm_default_unchanged(repo, base_config):
    config = load_config(repo / "params.yaml", repo / "configs" / "vesde.yaml")
    check_workflow_support(config)
    check_workflow_support(base_config)
    assert config["model"]["family"] == "vesde"
    assert {m["family"] for m in config["scores"]["methods"].values()} <= {"pixel", "clip", "embedding", "nda"}
    assert set(config["counterfactual"]["methods"]) | set(config["figures"]["methods"]) <= set(
        config["scores"]["methods"]
    )
    # measure reads the data's name (its number of levels) for both families; vesde regenerate reads it too
    assert json.loads(paths.stage_config(base_config, "measure"))["data"] == {"dataset": "digits"}
    assert "data" not in json.loads(paths.stage_config(base_config, "regenerate"))
    assert json.loads(paths.stage_config(config, "measure"))["data"] == {"dataset": "digits"}
    assert paths.family_targets(base_config) == []
    assert paths.family_targets(config) == [
        "results/digits-vesde/tables/bpd_sanity.md",
        "results/digits-vesde/figures/bpd_sanity.png",
    ]


@pytest.mark.parametrize(
    "method",
    [
        {"family": "trak", "output_function": "loss"},
        {"family": "das", "form": "vector", "output_directions": 4, "leverage": True},
        {"family": "kfac"},
        {"family": "journey", "output_function": "loss"},
        {"family": "tracin", "output_function": "loss", "similarity": "dot"},
    ],
)
def test_ddpm_scorers_are_refused_naming_method_and_reason(config, method):
    bad = copy.deepcopy(config)
    bad["scores"]["methods"]["extra"] = method
    validate_config(bad)  # valid for the schema: only the workflow cannot honour it
    with pytest.raises(
        ConfigError,
        match=rf"scores\.methods\.extra \(family {method['family']}\) cannot run with "
        r"model\.family vesde: .*extra: null",
    ):
        check_workflow_support(bad)


@pytest.mark.parametrize("measurements", [["loss"], ["likelihood", "elbo"]])
def test_vesde_measurements_other_than_likelihood_are_refused(config, measurements):
    bad = copy.deepcopy(config)
    bad["measure"]["measurements"] = measurements
    with pytest.raises(ConfigError, match="measure.measurements"):
        validate_config(bad)
        check_workflow_support(bad)


def test_null_in_an_overlay_removes_a_method(repo, tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("scores: {methods: {d_trak_l1: null, pixel_dot: null}}\n")
    config = load_config(repo / "params.yaml", overlay)
    assert "d_trak_l1" not in config["scores"]["methods"] and "pixel_dot" not in config["scores"]["methods"]
    assert "d_trak" in config["scores"]["methods"]


# ---------------------------------------------------------------- stages
def test_train_stage_trains_the_score_model(config, run_dir):
    from workflow_scripts.core.data import load_dataset
    from workflow_scripts.families.ddpm import load_model
    from workflow_scripts.families.registry import load_family_model

    payload = load_torch(run_dir / "full.pt")
    assert payload["kind"] == "vesde-unet" and payload["step"] == 6 and payload["config"]["family"] == "vesde"
    model, _ = load_family_model(run_dir / "full.pt", config["model"])
    assert isinstance(model, V.VEScoreNet)
    images = load_dataset(run_dir / "dataset.npz")["train_images"]
    direct = V.train_vesde(config, images, np.arange(len(images)), 0, device=torch.device("cpu"))
    for (k, a), b in zip(model.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), k  # the stage is train_vesde with the workflow's seeds
    for step in (3, 6):
        checkpoint = load_torch(run_dir / f"step{step:07d}.pt")
        assert checkpoint["kind"] == "vesde-unet" and checkpoint["step"] == step and checkpoint["lr"] > 0
    with pytest.raises(ArtefactError, match="not a DDPM UNet checkpoint"):
        load_model(run_dir / "full.pt", config["model"])
    ddpm_model = {k: v for k, v in config["model"].items() if k != "family"}
    with pytest.raises(ArtefactError, match="not a DDPM UNet checkpoint"):
        load_family_model(run_dir / "full.pt", ddpm_model)


def test_sample_stage_uses_the_probability_flow_ode_per_image(config, run_dir):
    from workflow_scripts.families.registry import generate_images, load_family_model

    samples = load_npz(run_dir / "generated.npz", ("images", "trajectories", "timesteps", "seeds"))
    assert samples["images"].shape == (3, 1, 8, 8) and np.abs(samples["images"]).max() <= 1
    assert samples["trajectories"].shape == (3, 4, 1, 8, 8)
    sigma_min, sigma_max = V.std_range(V.vesde_settings(config["model"]))
    assert samples["timesteps"][0] == pytest.approx(sigma_max) and np.all(np.diff(samples["timesteps"]) < 0)
    assert samples["trajectories"][:, 0].std() > 0.5 * sigma_max  # starts from N(0, sigma_1^2 I)
    model, payload = load_family_model(run_dir / "full.pt", config["model"])
    alone = generate_images(model, payload["image_shape"], config, "cpu", 1, indices=[2])
    np.testing.assert_allclose(alone["images"][0], samples["images"][2], atol=1e-4)  # image 2 is its own seed's
    np.testing.assert_array_equal(alone["seeds"], samples["seeds"][2:])


def test_measure_stage_writes_exact_likelihood_and_load_targets_reads_it(config, run_dir):
    from workflow_scripts.core.data import load_dataset
    from workflow_scripts.families.likelihood import load_targets
    from workflow_scripts.families.likelihood import measure_generated_query as measure_query
    from workflow_scripts.families.registry import load_family_model

    arrays = load_npz(run_dir / "measurement.npz")
    assert str(arrays["measurement"]) == "likelihood"
    assert sorted(k for k in arrays if "__" in k) == ["generated__likelihood", "heldout__likelihood"]
    model, _ = load_family_model(run_dir / "full.pt", config["model"])
    queries = {
        "generated": load_npz(run_dir / "generated.npz")["images"],
        "heldout": load_dataset(run_dir / "dataset.npz")["heldout_images"],
    }
    for stream, name in enumerate(("generated", "heldout")):
        direct = V.measure_likelihood(
            model,
            queries[name],
            config["model"],
            config["measure"]["likelihood"],
            17,
            config["seeds"]["measure"],
            stream,
        )["nats"]
        np.testing.assert_allclose(arrays[f"{name}__likelihood"], direct, rtol=1e-6)
    targets = load_targets([run_dir / "measurement.npz"], 1, 1)
    np.testing.assert_array_equal(targets["heldout"][0, 0], arrays["heldout__likelihood"])
    # the counterfactual's measurement of one query uses exactly that query's draws
    q = 1
    one = measure_query(model, queries["generated"][q : q + 1], config, q, "cpu")
    assert one == pytest.approx(float(arrays["generated__likelihood"][q]), rel=1e-6)


# ---------------------------------------------------------------- bits/dim sanity check
def test_sanity_images_are_what_they_claim(run_dir):
    from workflow_scripts.core.data import load_dataset
    from workflow_scripts.stages.likelihood_sanity import CATEGORIES, sanity_images

    dataset = load_dataset(run_dir / "dataset.npz")
    train = dataset["train_images"]
    images = sanity_images(dataset, 5, 17, seed=4)
    assert tuple(images) == CATEGORIES
    assert all(v.shape == (5, 1, 8, 8) for k, v in images.items() if k != "heldout") and len(images["heldout"]) == 3
    flat = train.reshape(len(train), -1)
    for x, r in zip(images["train"], images["rotated"]):
        assert any(np.array_equal(x.ravel(), t) for t in flat)
        np.testing.assert_array_equal(np.rot90(x, 1, axes=(1, 2)), r)
    means = 0.5 * (flat[:, None] + flat[None])
    distinct = ~np.eye(len(flat), dtype=bool)
    for a in images["averaged"]:  # the mean of two different training images
        assert (np.abs(means - a.ravel()).max(-1)[distinct] < 1e-6).any()
    assert set(np.unique(np.round((images["noise"] + 1) * 8, 6))) <= set(range(17))
    again = sanity_images(dataset, 5, 17, seed=4)
    assert all(np.array_equal(images[k], again[k]) for k in CATEGORIES)


def test_sanity_verdict_names_the_broken_pairs():
    from workflow_scripts.stages.likelihood_sanity import broken_pairs, markdown, summary_table

    bpd = {
        "train": np.array([1.0, 1.2]),
        "heldout": np.array([1.5, 1.4]),
        "rotated": np.array([3.0, 3.2]),
        "averaged": np.array([2.0, 2.2]),
        "noise": np.array([5.0, 5.1]),
    }
    table = summary_table(bpd)
    assert table.loc[table["category"] == "train", "mean_bpd"].item() == pytest.approx(1.1)
    assert table.loc[table["category"] == "train", "se_bpd"].item() == pytest.approx(0.1)
    assert broken_pairs(table) == [("rotated", "averaged")]
    assert "does NOT hold: rotated >= averaged" in markdown(table, 17, "")
    bpd["averaged"] = np.array([4.0, 4.2])
    assert broken_pairs(summary_table(bpd)) == []
    assert "train < rotated < averaged < noise: holds" in markdown(summary_table(bpd), 17, "")


def test_sanity_stage_writes_table_and_figure(config, run_dir):
    import pandas as pd
    from PIL import Image

    cli(
        config,
        "likelihood_sanity",
        "--model",
        run_dir / "full.pt",
        "--dataset",
        run_dir / "dataset.npz",
        "--table",
        run_dir / "bpd_sanity",
        "--figure",
        run_dir / "fig" / "bpd_sanity",
    )
    table = pd.read_csv(run_dir / "bpd_sanity.csv")
    assert list(table["category"]) == ["train", "heldout", "rotated", "averaged", "noise"]
    assert (table["n"] == 3).all()  # as many images per category as held-out queries
    assert table["mean_bpd"].map(math.isfinite).all() and (table["mean_bpd"] > 0).all()
    assert "Paper's ordering" in (run_dir / "bpd_sanity.md").read_text()
    image = Image.open(run_dir / "fig" / "bpd_sanity.png")
    assert image.size[0] > 400 and len(set(image.convert("L").tobytes())) > 10
    assert (run_dir / "fig" / "bpd_sanity.pdf").stat().st_size > 1000
    ddpm = copy.deepcopy(config)
    ddpm["model"].pop("family")
    with pytest.raises(ValueError, match="does not run for model.family ddpm"):
        paths.stage_config(ddpm, "likelihood_sanity")
