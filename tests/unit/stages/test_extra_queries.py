"""queries.extra: the user's own query images as a third query set (stage queries, core/folder.py read_query_folder,
core/data.py loaders, the scores stage's lambda choice, the DAG's jobs), on tiny folders the tests write."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import save_npz
from workflow_scripts.core.contracts import ALL_QUERY_SETS, QUERY_SETS, query_sets, query_stream, store_splits
from workflow_scripts.core.datasets import DataNotFound
from workflow_scripts.stages import encode, queries, scores


def write_queries(root, n=3):
    """n grey PNGs of different sizes and one RGB JPEG, flat (data.root's layout rules)."""
    generator = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(generator.integers(0, 256, (12 + i, 10), dtype=np.uint8)).save(root / f"q{i}.png")
    Image.fromarray(generator.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(root / "colour.jpg")
    return sorted([f"q{i}.png" for i in range(n)] + ["colour.jpg"])


def run_stage(tmp_path, queries_cfg, train_shape=(5, 1, 8, 8), dataset="digits"):
    save_npz(tmp_path / "dataset.npz", train_images=np.zeros(train_shape, np.float32), heldout_images=np.zeros((0,)))
    args = argparse.Namespace(dataset=str(tmp_path / "dataset.npz"), out=str(tmp_path / "extra.npz"))
    queries.run(args, {"queries": queries_cfg, "data": {"dataset": dataset}})
    return core_data.load_extra_queries(tmp_path / "extra.npz")


def test_the_stage_brings_every_image_to_the_training_images_shape_and_levels(tmp_path):
    files = write_queries(tmp_path / "mine")
    out = run_stage(tmp_path, {"extra": str(tmp_path / "mine")})
    assert list(out["files"]) == files  # sorted relative paths
    assert out["images"].shape == (4, 1, 8, 8) and out["images"].dtype == np.float32  # grey: the digits' 1 channel
    levels = (out["images"] + 1) / 2 * 16  # digits: 17 intensity levels
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-5)  # catches queries left at 256 levels
    assert out["images"].min() >= -1 and out["images"].max() <= 1 and out["images"].std() > 0.1
    assert "captions" not in out
    rgb = run_stage(tmp_path, {"extra": str(tmp_path / "mine")}, (5, 3, 8, 8), "cifar10")
    assert rgb["images"].shape == (4, 3, 8, 8)


def test_a_corrupt_query_image_and_a_missing_folder_are_named(tmp_path):
    write_queries(tmp_path / "mine")
    (tmp_path / "mine" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    with pytest.raises(DataNotFound, match=re.escape(str(tmp_path / "mine" / "broken.png")) + r" \(unreadable"):
        run_stage(tmp_path, {"extra": str(tmp_path / "mine")})
    with pytest.raises(DataNotFound, match=r"queries.extra .*nowhere: not a directory \(the folder of your own query"):
        run_stage(tmp_path, {"extra": str(tmp_path / "nowhere")})


def test_captions_are_read_per_file_and_checked(tmp_path):
    files = write_queries(tmp_path / "mine")
    csv = tmp_path / "captions.csv"
    csv.write_text("file,caption\n" + "".join(f"{f},a {i} digit\n" for i, f in enumerate(files)))
    out = run_stage(tmp_path, {"extra": str(tmp_path / "mine"), "extra_captions": str(csv)})
    assert list(out["captions"]) == [f"a {i} digit" for i in range(len(files))]
    csv.write_text("file,caption\n" + "".join(f"{f},a digit\n" for f in files[1:]))
    with pytest.raises(DataNotFound, match=r"queries.extra_captions .*uncaptioned image"):
        run_stage(tmp_path, {"extra": str(tmp_path / "mine"), "extra_captions": str(csv)})


def test_the_latent_family_maps_captions_to_the_training_caption_table():
    table = np.array(["a 0 digit", "a 1 digit", "a 2 digit"])
    labels = encode.caption_labels(np.array(["a 2 digit", "a 0 digit"]), table, "here")
    assert labels.tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"here: captions \['a cat'\] are not among the training captions"):
        encode.caption_labels(np.array(["a 1 digit", "a cat"]), table, "here")


def test_loaders_add_the_extra_set_after_the_two_and_only_when_given(tmp_path):
    save_npz(
        tmp_path / "dataset.npz",
        train_images=np.zeros((4, 1, 8, 8), np.float32),
        heldout_images=np.ones((2, 1, 8, 8), np.float32),
        train_labels=np.arange(4),
        heldout_labels=np.arange(2),
    )
    save_npz(tmp_path / "samples.npz", images=np.zeros((3, 1, 8, 8), np.float32), labels=np.arange(3))
    save_npz(
        tmp_path / "extra.npz",
        images=np.full((5, 1, 8, 8), 0.5, np.float32),
        files=np.array(list("abcde")),
        labels=np.array([2, 2, 1, 0, 1]),
    )
    paths = (tmp_path / "dataset.npz", tmp_path / "samples.npz")
    assert list(core_data.load_queries(*paths)) == list(QUERY_SETS)
    found = core_data.load_queries(*paths, tmp_path / "extra.npz")
    assert list(found) == list(ALL_QUERY_SETS) and found["extra"].shape == (5, 1, 8, 8)
    assert core_data.load_query_images(*paths, tmp_path / "extra.npz")["extra"].shape == (5, 1, 8, 8)
    conditions = core_data.load_conditions(*paths, tmp_path / "extra.npz")
    assert conditions["extra"].tolist() == [2, 2, 1, 0, 1] and conditions["heldout"].tolist() == [0, 1]
    assert core_data.load_conditions(*paths)["extra"] is None


def test_the_extra_set_is_configured_by_one_key_and_keeps_the_other_sets_noise():
    assert query_sets({"queries": {"extra": None}}) == QUERY_SETS and query_sets({}) == QUERY_SETS
    assert query_sets({"queries": {"extra": "/my/queries"}}) == (*QUERY_SETS, "extra")
    assert store_splits({"queries": {"extra": "/q"}}) == ("train", "generated", "heldout", "extra")
    # the generated and held-out draws do not move when extra queries are added
    assert [query_stream(n) for n in ALL_QUERY_SETS] == [0, 1, 2]


def test_the_extra_queries_never_tune_lambda():
    """Two lambdas: the extra set prefers the second, generated + held-out the first; the first is chosen."""
    table = pd.DataFrame(
        {
            "lambda": [0.1, 0.1, 0.1, 1.0, 1.0, 1.0],
            "query_set": ["generated", "heldout", "extra"] * 2,
            "lds_tuning": [0.5, 0.5, -1.0, 0.4, 0.4, 1.0],
            "lds_evaluation": [0.0] * 6,
        }
    )
    assert scores.choose([(0.1, {}), (1.0, {})], table) == 0  # with the extra rows averaged in, 1.0 would win


def test_dry_run_plans_the_extra_query_jobs_and_files(repo, tmp_path):
    """A dry run with queries.extra: one extra_queries job; every measure, gradients and scores job reads its file;
    every method writes extra.npy; the figures job draws the gallery."""
    from workflow_runs import copy_repo, snakemake

    write_queries(tmp_path / "mine")
    workdir = copy_repo(repo, tmp_path / "repo")
    (workdir / "extra.yaml").write_text(f"queries: {{extra: {tmp_path / 'mine'}}}\n")
    result = snakemake(workdir, "-n", "-p", "--configfile", "configs/smoke.yaml", "extra.yaml")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert re.search(r"^extra_queries\s+1$", out, re.M), out[-3000:]
    extra = "--extra-queries results/smoke/data/extra_queries.npz"
    for stage in ("measure", "gradients", "scores"):
        commands = [line for line in out.splitlines() if f"python -m workflow_scripts {stage} " in line]
        # the fixed-seed measurements and the Journey-TRAK stores are of the generated queries alone, by design
        of_every_set = [line for line in commands if "/fixed_seed/" not in line and "_journey_" not in line]
        assert of_every_set and all(extra in line for line in of_every_set), (stage, of_every_set[:1])
    assert "results/smoke/scores/trak/extra.npy" in out and "results/smoke/figures/extra_influencers.png" in out
    assert "--extra-images results/smoke/data/extra_queries.npz" in out
