"""data.dataset folder end to end through Snakemake, in a scratch copy: the smoke overlay on a tiny folder of PNG and
JPEG files the test writes (two class subfolders), with one method per scorer family so that every kind of job
(retrainings, measurements, gradients, every scorer family, the metagradient's fixed-seed ground truth, LDS,
counterfactual, figures) runs on it in a few minutes, with a folder of the user's own queries (queries.extra) as a
third query set; and a corrupt file that fails the first job, named."""

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from report_browser import rendered_results
from workflow_runs import copy_repo, snakemake

# one method per scorer family (the smoke overlay's others null), loss measurements only, 4 subsets x 2 seeds
KEEP = {"pixel_dot", "trak", "grad_dot", "tracincp", "relative_if", "journey_trak", "das_vector", "clip_dot"}
KEEP |= {"embedding_dot", "nda", "kfac", "metagradient"}


def overlay(config: dict, root, extra=None) -> dict:
    methods = {name: None for name in config["scores"]["methods"] if name not in KEEP}
    methods["gradient_similarity_trajectory"] = None  # the smoke overlay's trajectory method
    return {
        "benchmark": "folder-tiny",
        "data": {"dataset": "folder", "root": str(root), "resolution": 8, "n_train": 40, "n_heldout": 4},
        "queries": {"extra": None if extra is None else str(extra)},
        "figures": {"queries": [0], "methods": ["trak", "pixel_dot"], "n_influencers": 2, "extra_queries": 2},
        "lds": {"n_subsets": 4, "n_tuning": 2, "n_seeds": 2, "bootstrap_samples": 20},
        "measure": {"measurements": ["loss"]},
        "scores": {"methods": methods},
        "classifier": {"steps": 20},
    }


def write_folder(root) -> list[str]:
    """cats/ and dogs/, 24 images each (PNG and JPEG, 12x10 and 10x14: cropped and resized to 8x8), one grey."""
    generator = np.random.default_rng(0)
    names = []
    for c, animal in enumerate(("cats", "dogs")):
        (root / animal).mkdir(parents=True)
        for i in range(24):
            size = (12, 10) if i % 2 else (10, 14)
            pixels = generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) // 2 + 100 * c
            image = Image.fromarray(pixels.astype(np.uint8))
            if i == 5:
                image = image.convert("L")  # converted to RGB by the loader
            name = f"{animal}/{animal[:-1]}{i:02d}.{'jpg' if i % 3 == 0 else 'png'}"
            image.save(root / name)
            names.append(name)
    return names


def write_queries(root) -> list[str]:
    """Three query images of the user's own: two sizes, one grey (converted to RGB, cropped and resized to 8x8)."""
    generator = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i, size in enumerate(((16, 16), (20, 12), (9, 11))):
        pixels = generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).convert("L" if i == 2 else "RGB").save(root / f"mine{i}.png")
    return [f"mine{i}.png" for i in range(3)]


@pytest.fixture(scope="module")
def folder_run(repo, base_config, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("folder")
    names = write_folder(scratch / "my-images")
    write_queries(scratch / "my-queries")
    workdir = copy_repo(repo, scratch / "repo")
    config = overlay(base_config, scratch / "my-images", scratch / "my-queries")
    (workdir / "folder.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "--configfile", "configs/smoke.yaml", "folder.yaml")
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir / "results" / "folder-tiny", names


@pytest.mark.slow
def test_every_scorer_family_reaches_the_lds_and_counterfactual_tables(folder_run):
    results, _ = folder_run
    lds = pd.read_csv(results / "tables" / "lds.csv")
    assert set(lds["method"]) == KEEP | {"noise ceiling (seed-to-seed)"}
    assert set(lds["query_set"]) == {"generated", "heldout", "extra"}
    # no CLIP weights here: a "not run" row; the metagradient leaves the extra queries out (noted)
    ran = lds[(lds["method"] != "clip_dot") & ~((lds["method"] == "metagradient") & (lds["query_set"] == "extra"))]
    assert np.isfinite(ran["lds"].to_numpy(float)).all(), ran[["method", "query_set", "lds"]]
    skipped = lds[(lds["method"] == "metagradient") & (lds["query_set"] == "extra")]
    assert "extra queries are not attributed" in skipped["note"].iloc[0]
    table = (results / "tables" / "counterfactual.md").read_text()
    assert "trak" in table and "random" in table


@pytest.mark.slow
def test_the_dataset_holds_the_folder_images_and_names_them(folder_run):
    results, names = folder_run
    with np.load(results / "data" / "dataset.npz") as d:
        assert d["train_images"].shape == (40, 3, 8, 8) and d["heldout_images"].shape == (4, 3, 8, 8)
        files = list(d["train_files"]) + list(d["heldout_files"])
        assert len(set(files)) == 44 and set(files) <= set(names)
        assert all(label == name.startswith("dogs/") for name, label in zip(d["train_files"], d["train_labels"]))
    with np.load(results / "samples" / "generated.npz") as samples:
        assert samples["images"].shape[1:] == (3, 8, 8)


@pytest.mark.slow
def test_the_extra_queries_are_scored_measured_and_shown(folder_run):
    results, _ = folder_run
    with np.load(results / "data" / "extra_queries.npz") as extra:
        assert list(extra["files"]) == ["mine0.png", "mine1.png", "mine2.png"]
        assert extra["images"].shape == (3, 3, 8, 8)
    for method in KEEP - {"clip_dot", "metagradient"}:
        scores = np.load(results / "scores" / method / "extra.npy")
        assert scores.shape == (3, 40) and np.isfinite(scores).all(), method
    with np.load(results / "measurements" / "subset000_seed0.npz") as measured:
        assert measured["extra"].shape == (3,) and np.isfinite(measured["extra"]).all()
    gallery = results / "figures" / "extra_influencers.png"
    assert gallery.stat().st_size > 5_000  # a drawn figure (an empty one is ~2 kB)


@pytest.mark.slow
def test_the_report_shows_the_gallery_of_the_extra_queries_in_a_browser(folder_run, tmp_path):
    results, _ = folder_run
    workdir, report = results.parent.parent, results / "report.html"
    result = snakemake(workdir, "--configfile", "configs/smoke.yaml", "folder.yaml", "--report", str(report))
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    gallery = rendered_results(report, tmp_path)["extra_influencers.png"]
    assert gallery["naturalWidth"] > 100 and gallery["shownWidth"] > 50, gallery  # decoded and laid out
    assert 0.005 < gallery["inkFraction"] < 0.99 and gallery["caption"] > 100, gallery  # drawn, explained


def test_a_corrupt_image_fails_the_first_job_and_is_named(repo, base_config, tmp_path):
    write_folder(tmp_path / "my-images")
    (tmp_path / "my-images" / "dogs" / "dog07.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    workdir = copy_repo(repo, tmp_path / "repo")
    (workdir / "folder.yaml").write_text(yaml.safe_dump(overlay(base_config, tmp_path / "my-images")))
    result = snakemake(workdir, "--configfile", "configs/smoke.yaml", "folder.yaml")
    assert result.returncode != 0
    log = (workdir / "results" / "folder-tiny" / "logs" / "data.log").read_text()
    assert f"{tmp_path / 'my-images' / 'dogs' / 'dog07.png'} (unreadable" in log
    assert "Error in rule data" in result.stdout + result.stderr
    assert not (workdir / "results" / "folder-tiny" / "data" / "dataset.npz").exists()
    assert not (workdir / "results" / "folder-tiny" / "models").exists()  # nothing after the data job ran


def test_a_corrupt_extra_query_fails_its_job_and_is_named(repo, base_config, tmp_path):
    write_folder(tmp_path / "my-images")
    write_queries(tmp_path / "my-queries")
    (tmp_path / "my-queries" / "mine1.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    workdir = copy_repo(repo, tmp_path / "repo")
    config = overlay(base_config, tmp_path / "my-images", tmp_path / "my-queries")
    (workdir / "folder.yaml").write_text(yaml.safe_dump(config))
    # the extra queries' job and the jobs it needs only: the error, not the rest of the run, is under test
    result = snakemake(workdir, "--configfile", "configs/smoke.yaml", "folder.yaml", "--until", "extra_queries")
    assert result.returncode != 0
    log = (workdir / "results" / "folder-tiny" / "logs" / "extra_queries.log").read_text()
    assert f"{tmp_path / 'my-queries' / 'mine1.png'} (unreadable" in log
    assert "Error in rule extra_queries" in result.stdout + result.stderr
    assert not (workdir / "results" / "folder-tiny" / "data" / "extra_queries.npz").exists()


# ------------------------------------------------------------------------------------------------ latent family
# configs/latent.yaml on the folder with its captions CSV and a base pipeline directory (model.pipeline) the test
# builds itself: the miniature's parts for 3 channels, pretrained for a few steps only (the DAG's own miniature base
# is for the digits). Three scorers: the tables, not every scorer again, are what this run adds.
LATENT = {
    "benchmark": "folder-latent-tiny",
    "lds": {"n_subsets": 4, "n_tuning": 2, "n_seeds": 2, "bootstrap_samples": 20},
    "train": {"steps": 10, "batch_size": 16, "checkpoint_every": 10, "resume_every": 10},
    "sample": {"n_generated": 2, "num_inference_steps": 3},
    "measure": {"n_timesteps": 10, "n_noise": 1, "batch_size": 10},
    "gradients": {"timesteps": 2, "projection_dim": 64, "batch_size": 8, "timestep_chunk": 100},
    "scores": {"lambda_grid": [0.01, 1.0]},
    "classifier": {"steps": 20, "channels": [8, 16], "feature_dim": 16},
    "counterfactual": {"queries": 1, "methods": ["trak"], "k": 0.1, "bootstrap_samples": 20},
    "figures": {"queries": [0], "methods": ["trak"], "n_influencers": 2},
}
LATENT_KEEP = {"trak", "das_vector", "pixel_dot"}


def write_pipeline(base_config: dict, out) -> None:
    from workflow_scripts.families.latent_miniature import build_and_pretrain

    config = {**base_config, "base": {"resolution": 16, "vae_steps": 5, "unet_steps": 5}}
    images = np.random.default_rng(1).uniform(-1, 1, (20, 3, 16, 16)).astype(np.float32)
    build_and_pretrain(config, images, np.arange(20) % 10, out)


@pytest.fixture(scope="module")
def latent_folder_run(repo, base_config, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("folder-latent")
    names = write_folder(scratch / "my-images")
    rows = [
        f"{name},a {'dog' if name.startswith('dogs') else 'cat'}{' in grey' if '05' in name else ''}" for name in names
    ]
    (scratch / "captions.csv").write_text("file,caption\n" + "\n".join(rows) + "\n")
    write_pipeline(base_config, scratch / "pipeline")
    queries = write_queries(scratch / "my-queries")
    captions = ["a dog", "a cat in grey", "a cat"]  # captions of the training table (the model holds their embeddings)
    rows = "".join(f"{name},{caption}\n" for name, caption in zip(queries, captions))
    (scratch / "query-captions.csv").write_text("file,caption\n" + rows)
    workdir = copy_repo(repo, scratch / "repo")
    latent = yaml.safe_load((repo / "configs" / "latent.yaml").read_text())
    methods = set(base_config["scores"]["methods"]) | {m for m, v in latent["scores"]["methods"].items() if v}
    data = {"dataset": "folder", "root": str(scratch / "my-images"), "captions": str(scratch / "captions.csv")}
    tiny = {
        **LATENT,
        "data": {**data, "resolution": 16, "n_train": 40, "n_heldout": 2},
        "model": {"pipeline": str(scratch / "pipeline")},
        "queries": {"extra": str(scratch / "my-queries"), "extra_captions": str(scratch / "query-captions.csv")},
        "scores": {**LATENT["scores"], "methods": {m: None for m in methods - LATENT_KEEP}},
    }
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    result = snakemake(workdir, "--configfile", "configs/latent.yaml", "tiny.yaml")
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir / "results" / "folder-latent-tiny"


@pytest.mark.slow
def test_the_latent_family_runs_on_the_folder_captions(latent_folder_run):
    lds = pd.read_csv(latent_folder_run / "tables" / "lds.csv")
    assert set(lds["method"]) == LATENT_KEEP | {"noise ceiling (seed-to-seed)"}
    assert set(lds["query_set"]) == {"generated", "heldout", "extra"}
    assert np.isfinite(lds["lds"].to_numpy(float)).all(), lds[["method", "query_set", "lds"]]
    with np.load(latent_folder_run / "data" / "extra_latents.npz") as extra:
        # caption indices into the sorted training table: a cat 0, a cat in grey 1, a dog 2, a dog in grey 3
        assert extra["labels"].tolist() == [2, 1, 0] and extra["images"].shape[0] == 3
    with np.load(latent_folder_run / "data" / "latents.npz") as latents:
        assert list(latents["captions"]) == ["a cat", "a cat in grey", "a dog", "a dog in grey"]
        captions = latents["captions"][latents["train_labels"]]
        for name, caption in zip(latents["train_files"], captions):
            assert caption.startswith("a dog" if name.startswith("dogs/") else "a cat"), (name, caption)
    with np.load(latent_folder_run / "samples" / "generated.npz") as samples:
        assert list(samples["prompts"]) == ["a cat", "a cat in grey"]  # query i: caption i mod 4
        assert samples["decoded"].shape == (2, 3, 16, 16)
    assert "trak" in (latent_folder_run / "tables" / "counterfactual.md").read_text()
