"""ArtBench-10 and CelebA loaders (workflow_scripts/core/artbench.py, celeba.py, data.make_dataset) on small files
written in their exact on-disk formats (tests/image_files.py)."""

import numpy as np
import pytest
from image_files import artbench_md5s, solid_jpeg, write_artbench, write_artbench_batches, write_celeba
from PIL import Image

from workflow_scripts.core import artbench, celeba, data, datasets
from workflow_scripts.dag.config import ConfigError, deep_merge, validate_config

GREY = {style: 10 + 20 * i for i, style in enumerate(artbench.STYLES)}  # image_files.write_artbench's grey levels


def unit(level):
    return level / 255.0 * 2 - 1


@pytest.fixture()
def artbench_root(tmp_path, monkeypatch):
    rows = write_artbench(tmp_path, n_train=4, n_test=2, size=(32, 24))
    artbench_md5s(monkeypatch, tmp_path)
    return tmp_path, rows


def cfg(root, dataset="artbench2", **keys):
    return {"dataset": dataset, "root": str(root), "n_train": 8, "n_heldout": 4, "resolution": 16, **keys}


# ------------------------------------------------------------------------------------------------ ArtBench
def test_artbench2_shapes_range_balance_captions_and_styles(artbench_root):
    root, rows = artbench_root
    d = data.make_dataset(cfg(root), split_seed=0)
    assert d["train_images"].shape == (8, 3, 16, 16) and d["heldout_images"].shape == (4, 3, 16, 16)
    assert d["train_images"].dtype == np.float32
    assert d["train_images"].min() >= -1 and d["train_images"].max() <= 1
    assert np.bincount(d["train_labels"]).tolist() == [4, 4] and np.bincount(d["heldout_labels"]).tolist() == [2, 2]
    assert d["captions"].tolist() == ["a post impressionism painting", "a ukiyo e painting"]
    styles = ("post_impressionism", "ukiyo_e")
    for part, split in (("train", "train"), ("heldout", "test")):
        for image, label, index in zip(d[f"{part}_images"], d[f"{part}_labels"], d[f"{part}_index"]):
            row = rows[index]  # *_index = the row of ArtBench-10.csv
            assert row["split"] == split and row["label"] == styles[label]
            np.testing.assert_allclose(image, unit(GREY[row["label"]]), atol=0.05)  # the file's own pixels
    assert np.all(np.diff(d["train_index"]) > 0)


def test_artbench5_and_10_classes_in_canonical_order(artbench_root):
    root, _ = artbench_root
    five = data.make_dataset(cfg(root, "artbench5", n_train=10, n_heldout=5), split_seed=0)
    assert five["captions"].tolist() == [
        "a baroque painting",
        "a post impressionism painting",
        "a renaissance painting",
        "a romanticism painting",
        "a ukiyo e painting",
    ]
    assert np.bincount(five["train_labels"]).tolist() == [2] * 5
    ten = data.make_dataset(cfg(root, "artbench10", n_train=40, n_heldout=20), split_seed=0)
    assert [c.split(" ", 1)[1].rsplit(" ", 1)[0] for c in ten["captions"]] == [
        s.replace("_", " ") for s in artbench.STYLES
    ]
    assert np.bincount(ten["train_labels"]).tolist() == [4] * 10  # every training image of the small files


def test_artbench_draw_is_seeded(artbench_root):
    root, _ = artbench_root
    config = cfg(root, n_train=4, n_heldout=2)
    a, b, c = data.make_dataset(config, 3), data.make_dataset(config, 3), data.make_dataset(config, 4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["train_index"], c["train_index"])


def test_artbench_default_resolution_is_256(tmp_path, monkeypatch):
    write_artbench(tmp_path, n_train=1, n_test=1, size=(256, 256))
    artbench_md5s(monkeypatch, tmp_path)
    d = data.make_dataset({"dataset": "artbench2", "root": str(tmp_path), "n_train": 2, "n_heldout": 2}, 0)
    assert d["train_images"].shape == (2, 3, 256, 256)


def test_artbench_centre_crop_then_resize(artbench_root):
    """A 48x32 image whose outer 8-pixel columns are black and centre white: the centre crop keeps the white 32x32."""
    root, rows = artbench_root
    pixels = np.full((32, 48, 3), 255, dtype=np.uint8)
    pixels[:, :8] = pixels[:, -8:] = 0
    for row in rows:
        if row["label"] == "ukiyo_e":
            path = root / artbench.IMAGEFOLDER / row["split"] / row["label"] / row["name"]
            Image.fromarray(pixels).save(path, format="JPEG", quality=95)
    d = data.make_dataset(cfg(root), split_seed=0)
    ukiyo = d["train_images"][d["train_labels"] == 1]
    assert ukiyo.shape == (4, 3, 16, 16) and ukiyo.min() > 0.9  # no black column survives


def test_artbench_batches_format(tmp_path, monkeypatch):
    written = write_artbench_batches(tmp_path, per_batch=20, n_test=20)
    artbench_md5s(monkeypatch, tmp_path)
    config = {"dataset": "artbench2", "root": str(tmp_path), "format": "batches", "n_train": 10, "n_heldout": 4}
    d = data.make_dataset(config, split_seed=0)
    assert d["train_images"].shape == (10, 3, 32, 32) and d["heldout_images"].shape == (4, 3, 32, 32)
    assert np.bincount(d["train_labels"]).tolist() == [5, 5]
    assert d["captions"].tolist() == ["a post impressionism painting", "a ukiyo e painting"]
    # *_index = position in the batches; the pixels are the pickle's CHW rows, scaled
    np.testing.assert_allclose(d["train_images"], unit(written["train_images"][d["train_index"]]), atol=1e-6)
    styles = np.array(artbench.STYLES)[written["train_labels"][d["train_index"]]]
    assert styles.tolist() == np.array(["post_impressionism", "ukiyo_e"])[d["train_labels"]].tolist()
    np.testing.assert_allclose(d["heldout_images"], unit(written["test_images"][d["heldout_index"]]), atol=1e-6)


def test_artbench_batches_that_are_not_the_official_ones_are_reported_corrupt(tmp_path):
    write_artbench_batches(tmp_path, per_batch=4, n_test=4)
    config = {"dataset": "artbench2", "root": str(tmp_path), "format": "batches", "n_train": 2, "n_heldout": 2}
    with pytest.raises(datasets.DataNotFound, match=r"corrupt .*artbench-10-batches-py/data_batch_1 \(md5 differs"):
        data.make_dataset(config, 0)


def test_artbench_missing_csv_is_named_with_how_to_get_it(tmp_path):
    with pytest.raises(datasets.DataNotFound) as info:
        data.make_dataset(cfg(tmp_path / "nowhere"), 0)
    message = str(info.value)
    assert "missing" in message and "nowhere/ArtBench-10.csv" in message
    assert "artbench-10-imagefolder-split.tar" in message and artbench.TAR_MD5 in message and "wget" in message


def test_artbench_csv_md5_is_checked(tmp_path):
    write_artbench(tmp_path, n_train=1, n_test=1)  # without the patched md5: the small CSV is not the official one
    with pytest.raises(datasets.DataNotFound, match=r"corrupt .*ArtBench-10.csv \(md5 [0-9a-f]{32} differs .*cc8e5df4"):
        data.make_dataset(cfg(tmp_path, n_train=2, n_heldout=2), 0)


def test_artbench_tarball_md5_is_checked_when_present(artbench_root):
    root, _ = artbench_root
    (root / artbench.TAR_NAME).write_bytes(b"not the official tarball")
    with pytest.raises(datasets.DataNotFound, match=r"corrupt .*artbench-10-imagefolder-split.tar \(md5 differs"):
        data.make_dataset(cfg(root), 0)


def test_artbench_missing_images_are_named_first_few_and_counted(artbench_root):
    root, rows = artbench_root
    gone = [root / artbench.IMAGEFOLDER / r["split"] / r["label"] / r["name"] for r in rows if r["label"] == "realism"]
    for path in gone:
        path.unlink()  # a style the data set does not use: every CSV row's file must still be there
    with pytest.raises(datasets.DataNotFound) as info:
        data.make_dataset(cfg(root), 0)
    message = str(info.value)
    assert f"{len(gone)} missing image files: {gone[0]}" in message and f"and {len(gone) - 5} more" in message
    assert "ArtBench-10.csv lists" in message and "wget" in message


def test_artbench_corrupt_image_is_named(artbench_root):
    root, rows = artbench_root
    row = next(r for r in rows if r["label"] == "ukiyo_e" and r["split"] == "train")
    path = root / artbench.IMAGEFOLDER / "train" / "ukiyo_e" / row["name"]
    path.write_bytes(path.read_bytes()[:40])  # a truncated JPEG
    with pytest.raises(datasets.DataNotFound, match=r"1 unreadable or corrupt image file: .*" + row["name"]):
        data.make_dataset(cfg(root), 0)  # n_train 8 = every training image of the two styles


def test_artbench_csv_without_its_columns_is_refused(tmp_path, monkeypatch):
    (tmp_path / artbench.CSV_NAME).write_text("name,style\na.jpg,baroque\n")
    artbench_md5s(monkeypatch, tmp_path)
    with pytest.raises(datasets.DataNotFound, match=r"ArtBench-10.csv: lacks the columns \['artist'"):
        data.make_dataset(cfg(tmp_path), 0)


def test_artbench_too_many_images_of_a_style_is_refused(artbench_root):
    root, _ = artbench_root
    with pytest.raises(ValueError, match="data.n_heldout = 6 is too large for artbench2's test split"):
        data.make_dataset(cfg(root, n_heldout=6), 0)


# ------------------------------------------------------------------------------------------------ CelebA
PARTITIONS = [0] * 12 + [1] * 6 + [2] * 3


@pytest.fixture()
def celeba_root(tmp_path):
    return tmp_path, write_celeba(tmp_path, PARTITIONS)


def test_celeba_shapes_partitions_labels_and_crop(celeba_root):
    root, _ = celeba_root
    d = data.make_dataset({"dataset": "celeba", "root": str(root), "n_train": 8, "n_heldout": 4}, split_seed=0)
    assert d["train_images"].shape == (8, 3, 64, 64) and d["heldout_images"].shape == (4, 3, 64, 64)
    assert d["train_images"].dtype == np.float32 and d["train_images"].min() >= -1 and d["train_images"].max() <= 1
    assert "captions" not in d
    assert not d["train_labels"].any() and not d["heldout_labels"].any()
    partitions = np.array(PARTITIONS)
    assert (partitions[d["train_index"]] == 0).all() and (partitions[d["heldout_index"]] == 1).all()
    for image, index in zip(d["train_images"], d["train_index"]):  # index = line of list_eval_partition.txt
        np.testing.assert_allclose(image, unit(5 * (index % 50)), atol=0.05)
    again = data.make_dataset({"dataset": "celeba", "root": str(root), "n_train": 8, "n_heldout": 4}, split_seed=0)
    np.testing.assert_array_equal(again["train_index"], d["train_index"])


def test_celeba_centre_crop_140(celeba_root):
    """Outside the centre 140x140 of a 178x218 face the pixels are black; the crop keeps only the white centre."""
    root, folder = celeba_root
    pixels = np.zeros((218, 178, 3), dtype=np.uint8)
    pixels[39 + 4 : 179 - 4, 19 + 4 : 159 - 4] = 255  # torchvision's centre crop: top 39, left 19; 4 px margin
    for name in sorted(p.name for p in folder.iterdir())[:12]:  # partition 0
        Image.fromarray(pixels).save(folder / name, format="JPEG", quality=95)
    d = data.make_dataset({"dataset": "celeba", "root": str(root), "n_train": 12, "n_heldout": 1}, split_seed=0)
    centre = d["train_images"][:, :, 4:-4, 4:-4]
    assert centre.min() > 0.9


def test_celeba_resolution_key(celeba_root):
    root, _ = celeba_root
    config = {"dataset": "celeba", "root": str(root), "n_train": 4, "n_heldout": 2, "resolution": 32}
    assert data.make_dataset(config, 0)["train_images"].shape == (4, 3, 32, 32)


def test_celeba_missing_partition_file_is_named_with_how_to_get_it(tmp_path):
    with pytest.raises(datasets.DataNotFound) as info:
        celeba.open_source({"dataset": "celeba", "root": str(tmp_path)})
    message = str(info.value)
    assert f"missing {tmp_path}/celeba/list_eval_partition.txt" in message
    assert "torchvision.datasets.CelebA(" in message and "download=True" in message and "Google Drive" in message


def test_celeba_missing_images_are_named(celeba_root):
    root, folder = celeba_root
    (folder / "000002.jpg").unlink()
    (folder / "000020.jpg").unlink()  # partition 2: not used, not required
    with pytest.raises(datasets.DataNotFound, match=r"1 missing image file: .*000002.jpg \(of partitions 0 and 1\)"):
        celeba.open_source({"dataset": "celeba", "root": str(root)})


def test_celeba_corrupt_image_is_named(celeba_root):
    root, folder = celeba_root
    (folder / "000003.jpg").write_bytes(b"GIF89a not a jpeg")
    with pytest.raises(datasets.DataNotFound, match=r"unreadable or corrupt image file: .*000003.jpg"):
        data.make_dataset({"dataset": "celeba", "root": str(root), "n_train": 12, "n_heldout": 1}, 0)


def test_celeba_malformed_partition_line_is_named(celeba_root):
    root, _ = celeba_root
    path = root / "celeba" / "list_eval_partition.txt"
    path.write_text(path.read_text() + "000099.jpg train\n")
    with pytest.raises(datasets.DataNotFound, match=r"list_eval_partition.txt line 22: '000099.jpg train'"):
        celeba.open_source({"dataset": "celeba", "root": str(root)})


def test_celeba_partition_file_with_windows_line_ends(celeba_root):
    root, _ = celeba_root
    path = root / "celeba" / "list_eval_partition.txt"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert len(celeba.open_source({"dataset": "celeba", "root": str(root)}).index["train"]) == 12


def test_solid_jpeg_helper_decodes_near_its_level(tmp_path):
    solid_jpeg(tmp_path / "a.jpg", (8, 8), 200)
    assert abs(np.asarray(Image.open(tmp_path / "a.jpg")).astype(int) - 200).max() <= 2


# ------------------------------------------------------------------------------------------------ configuration
def test_n_levels_and_the_schema_know_the_new_data_sets(base_config):
    for name in ("artbench2", "artbench5", "artbench10", "celeba"):
        assert data.N_LEVELS[name] == 256
        validate_config(
            deep_merge(base_config, {"data": {"dataset": name, "n_train": 100, "n_heldout": 10, "root": "x"}})
        )


@pytest.mark.parametrize(
    "change, match",
    [
        (
            {"dataset": "artbench2", "n_train": 10001, "n_heldout": 10, "root": "x"},
            "exceeds artbench2's 10000 training",
        ),
        ({"dataset": "artbench5", "n_train": 100, "n_heldout": 5001, "root": "x"}, "exceeds artbench5's 5000 test"),
        ({"dataset": "celeba", "n_train": 100, "n_heldout": 20000, "root": "x"}, "19867 validation \\(partition 1\\)"),
        ({"dataset": "celeba", "n_train": 100, "n_heldout": 10}, "data.root is required"),
        ({"dataset": "celeba", "n_train": 100, "n_heldout": 10, "root": "x", "format": "batches"}, "data.format"),
        ({"dataset": "cifar2", "n_train": 100, "n_heldout": 10, "root": "x", "resolution": 64}, "data.resolution"),
        (
            {
                "dataset": "artbench2",
                "n_train": 100,
                "n_heldout": 10,
                "root": "x",
                "format": "batches",
                "resolution": 64,
            },
            "batches holds 32x32",
        ),
        ({"dataset": "artbench2", "n_train": 100, "n_heldout": 10, "root": "x", "format": "png"}, "data.format"),
    ],
)
def test_config_checks_of_the_new_data_sets(base_config, change, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(deep_merge(base_config, {"data": change}))


def test_image_size_follows_format_and_resolution():
    from workflow_scripts.dag.config import image_size

    assert image_size({"dataset": "artbench2"}) == 256
    assert image_size({"dataset": "artbench5", "format": "batches"}) == 32
    assert image_size({"dataset": "artbench10", "resolution": 64}) == 64
    assert image_size({"dataset": "celeba"}) == 64 and image_size({"dataset": "cifar2"}) == 32
