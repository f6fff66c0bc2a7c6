"""data.dataset folder (workflow_scripts/core/folder.py, data.make_dataset): the user's own images, on tiny folders
the tests write (PNG and JPEG files, class subfolders, captions CSVs, broken files)."""

import numpy as np
import pytest
from PIL import Image

from workflow_scripts.core import data, datasets, folder
from workflow_scripts.dag.config import ConfigError, deep_merge, validate_config


def unit(level):
    return level / 255.0 * 2 - 1


def write(path, size=(24, 16), value=(40, 40, 40), mode="RGB", fmt=None):
    """A solid image of `value` (a level per band of `mode`); PNG unless the suffix says otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path, format=fmt)
    return path


def framed(path, size=(30, 18), centre=200, frame=0):
    """A landscape RGB PNG whose centred square is `centre` and whose side margins are `frame`: after the centre
    crop to the largest square only `centre` remains."""
    w, h = size
    image = Image.new("RGB", size, (frame,) * 3)
    image.paste(Image.new("RGB", (h, h), (centre,) * 3), ((w - h) // 2, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def cfg(root, **keys):
    return {"dataset": "folder", "root": str(root), "n_train": 6, "n_heldout": 2, "resolution": 8, **keys}


@pytest.fixture()
def classes(tmp_path):
    """cats/ (4 PNGs, grey 60) and dogs/ (4 JPEGs, grey 180, one in a nested folder): 8 images."""
    root = tmp_path / "images"
    for i in range(4):
        write(root / "cats" / f"cat{i}.png", value=(60, 60, 60))
        write(root / "dogs" / ("puppies" if i == 3 else "") / f"dog{i}.JPG", value=(180, 180, 180), fmt="JPEG")
    return root


def test_class_subfolders_give_labels_and_the_draws_never_overlap(classes):
    d = data.make_dataset(cfg(classes), split_seed=3)
    assert d["train_images"].shape == (6, 3, 8, 8) and d["heldout_images"].shape == (2, 3, 8, 8)
    assert d["train_images"].dtype == np.float32 and "captions" not in d
    files = list(d["train_files"]) + list(d["heldout_files"])
    assert len(set(files)) == 8  # the held-out draw leaves out the drawn training images: all 8, once each
    assert "dogs/puppies/dog3.JPG" in files
    for part in ("train", "heldout"):
        for name, label, index, image in zip(
            d[f"{part}_files"], d[f"{part}_labels"], d[f"{part}_index"], d[f"{part}_images"]
        ):
            assert label == (0 if name.startswith("cats/") else 1)  # sorted class names: cats 0, dogs 1
            assert index == sorted(files).index(name)  # position in the folder's sorted file list
            # JPEG of a solid grey decodes within a few levels; a wrong label / file pairing misses by 120 levels
            assert np.abs(image - unit(60 if label == 0 else 180)).max() < 4 / 255 * 2


def test_the_split_seed_decides_the_draw(classes):
    a, b = data.make_dataset(cfg(classes), split_seed=0), data.make_dataset(cfg(classes), split_seed=1)
    again = data.make_dataset(cfg(classes), split_seed=0)
    assert list(a["train_files"]) == list(again["train_files"])
    assert list(a["heldout_files"]) != list(b["heldout_files"]) or list(a["train_files"]) != list(b["train_files"])


def test_flat_folder_centre_crops_and_resizes_and_converts_grey_to_rgb(tmp_path):
    root = tmp_path / "flat"
    for i in range(3):
        framed(root / f"wide{i}.png", centre=200, frame=0)
    write(root / "grey.png", size=(8, 8), value=90, mode="L")  # mode L in an RGB data set: converted
    d = data.make_dataset(cfg(root, n_train=3, n_heldout=1), split_seed=0)
    images = np.concatenate([d["train_images"], d["heldout_images"]])
    names = list(d["train_files"]) + list(d["heldout_files"])
    assert set(d["train_labels"]) | set(d["heldout_labels"]) == {0}
    for name, image in zip(names, images):
        # the black margins are cropped away: any of them left would pull an edge pixel far below 200
        expected = 90 if name == "grey.png" else 200
        assert np.abs(image - unit(expected)).max() < 1e-6, name  # solid squares resize to themselves exactly


def test_one_channel_converts_every_image_to_grey(tmp_path):
    root = tmp_path / "flat"
    for i in range(4):
        write(root / f"c{i}.png", value=(255, 0, 0))  # pure red -> L = 299/1000 * 255 = 76 (ITU-R 601-2 luma)
    d = data.make_dataset(cfg(root, n_train=3, n_heldout=1, channels=1), split_seed=0)
    assert d["train_images"].shape == (3, 1, 8, 8)
    assert np.abs(d["train_images"] - unit(76)).max() < 1e-6


def test_captions_give_the_caption_table_and_each_image_its_caption(classes, tmp_path):
    csv = tmp_path / "captions.csv"
    rows = [f"cats/cat{i}.png,a grey cat" for i in range(4)]
    rows += [f'dogs/dog{i}.JPG,"a dog, light"' for i in range(3)] + ["dogs/puppies/dog3.JPG,a puppy"]
    csv.write_text("file,caption\n" + "\n".join(rows) + "\n")
    d = data.make_dataset(cfg(classes, captions=str(csv)), split_seed=0)
    assert d["captions"].tolist() == ["a dog, light", "a grey cat", "a puppy"]  # sorted distinct captions
    for part in ("train", "heldout"):
        for name, label in zip(d[f"{part}_files"], d[f"{part}_labels"]):
            caption = d["captions"][label]
            assert caption == (
                "a grey cat" if name.startswith("cats") else "a puppy" if "puppies" in name else "a dog, light"
            )


def test_a_captions_csv_inside_the_folder_is_not_an_image(classes):
    csv = classes / "cats" / "captions.csv"
    names = [f"cats/cat{i}.png" for i in range(4)] + [f"dogs/dog{i}.JPG" for i in range(3)] + ["dogs/puppies/dog3.JPG"]
    csv.write_text("file,caption\n" + "".join(f"{n},x\n" for n in names))
    d = data.make_dataset(cfg(classes, captions=str(csv)), split_seed=0)
    assert d["captions"].tolist() == ["x"]


def test_captions_problems_are_each_named(classes, tmp_path):
    csv = tmp_path / "captions.csv"
    csv.write_text(
        "file,caption\n"
        "cats/cat0.png,a cat\n"
        "cats/cat0.png,again\n"  # listed twice
        "cats/cat9.png,no such file\n"  # missing file
        "cats/cat1.png,\n"  # empty caption
        "cats/cat2.png,a cat\n"
        "dogs/dog0.JPG,a dog\ndogs/dog1.JPG,a dog\ndogs/dog2.JPG,a dog\n"
    )  # cats/cat3.png and dogs/puppies/dog3.JPG have no row
    with pytest.raises(datasets.DataNotFound) as error:
        data.make_dataset(cfg(classes, captions=str(csv)), split_seed=0)
    message = str(error.value)
    assert "line 3: 'cats/cat0.png' is listed twice" in message
    assert "line 4: 'cats/cat9.png' is a missing file" in message
    assert "line 5: 'cats/cat1.png' has an empty caption" in message
    assert "2 uncaptioned image files" in message and "cat3.png" in message and "dog3.JPG" in message
    assert "cat2.png" not in message


def test_a_captions_csv_needs_its_header(classes, tmp_path):
    csv = tmp_path / "captions.csv"
    csv.write_text("path,text\ncats/cat0.png,a cat\n")
    with pytest.raises(datasets.DataNotFound, match="header must be 'file,caption'"):
        data.make_dataset(cfg(classes, captions=str(csv)), split_seed=0)


def test_corrupt_truncated_and_wrong_mode_files_are_all_named(classes):
    (classes / "cats" / "garbage.png").write_bytes(b"not an image at all")
    good = (classes / "dogs" / "dog0.JPG").read_bytes()
    (classes / "dogs" / "cut.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    png = write(classes / "cats" / "full.png", size=(64, 64), value=(1, 2, 3)).read_bytes()
    (classes / "cats" / "cut.png").write_bytes(png[: len(png) - 30])  # truncated PNG (no IEND, short IDAT)
    write(classes / "cats" / "alpha.png", value=(1, 2, 3, 128), mode="RGBA")
    write(classes / "cats" / "deep.png", value=3000, mode="I;16")
    with pytest.raises(datasets.DataNotFound) as error:
        data.make_dataset(cfg(classes), split_seed=0)
    message = str(error.value)
    for name in ("garbage.png", "cut.jpg", "cut.png"):
        assert f"{name} (unreadable" in message, name
    assert "alpha.png (mode RGBA: an alpha channel" in message
    assert "deep.png (mode I;16: pixels that are not 8-bit" in message
    assert "5 unusable image files" in message and "full.png" not in message


def test_a_corrupt_file_is_named_even_when_the_draw_would_not_take_it(classes):
    (classes / "cats" / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(datasets.DataNotFound, match="zz.png"):
        data.make_dataset(cfg(classes, n_train=1, n_heldout=1), split_seed=0)


def test_layout_problems_are_named(classes, tmp_path):
    (classes / "notes.txt").write_text("x")
    with pytest.raises(datasets.DataNotFound, match=r"mixes files and subfolders.*notes\.txt"):
        data.make_dataset(cfg(classes), split_seed=0)
    (classes / "notes.txt").unlink()
    (classes / "cats" / "notes.txt").write_text("x")
    (classes / "empty").mkdir()
    with pytest.raises(datasets.DataNotFound) as error:
        data.make_dataset(cfg(classes), split_seed=0)
    assert "1 non-image file" in str(error.value) and "notes.txt" in str(error.value)
    assert f"no image files in {classes / 'empty'}" in str(error.value)
    with pytest.raises(datasets.DataNotFound, match="not a directory"):
        data.make_dataset(cfg(tmp_path / "absent"), split_seed=0)


def test_hidden_files_are_left_out(classes):
    (classes / "cats" / ".DS_Store").write_bytes(b"\0\0")
    d = data.make_dataset(cfg(classes, n_train=7, n_heldout=1), split_seed=0)
    assert len(d["train_files"]) + len(d["heldout_files"]) == 8


def test_too_many_images_asked_for_says_how_many_there_are(classes):
    with pytest.raises(
        ValueError, match=r"data.n_train = 9 is too large for folder's folder .* \(8 images\): it has 8"
    ):
        data.make_dataset(cfg(classes, n_train=9), split_seed=0)
    with pytest.raises(ValueError, match=r"data.n_heldout = 3 .* after the training draw: it has 2 images"):
        data.make_dataset(cfg(classes, n_train=6, n_heldout=3), split_seed=0)


def test_a_heldout_folder_gives_the_heldout_queries(classes, tmp_path):
    other = tmp_path / "heldout"
    write(other / "dogs" / "d.png", value=(180, 180, 180))
    write(other / "dogs" / "e.png", value=(180, 180, 180))
    d = data.make_dataset(cfg(classes, n_train=8, heldout_folder=str(other)), split_seed=0)
    assert len(d["train_files"]) == 8  # every training image: the held-out ones come from elsewhere
    assert sorted(d["heldout_files"]) == ["dogs/d.png", "dogs/e.png"] and list(d["heldout_labels"]) == [1, 1]
    write(other / "birds" / "b.png")
    with pytest.raises(datasets.DataNotFound, match=r"classes birds are not those of data.root"):
        data.make_dataset(cfg(classes, heldout_folder=str(other)), split_seed=0)


def test_a_heldout_folder_with_captions(classes, tmp_path):
    other = tmp_path / "heldout"
    write(other / "cats" / "c.png", value=(60, 60, 60))
    names = [f"cats/cat{i}.png" for i in range(4)] + [f"dogs/dog{i}.JPG" for i in range(3)] + ["dogs/puppies/dog3.JPG"]
    (tmp_path / "train.csv").write_text("file,caption\n" + "".join(f"{n},a pet\n" for n in names))
    (tmp_path / "heldout.csv").write_text("file,caption\ncats/c.png,a held-out cat\n")
    keys = {"captions": str(tmp_path / "train.csv"), "heldout_folder": str(other), "n_heldout": 1}
    d = data.make_dataset(cfg(classes, **keys, heldout_captions=str(tmp_path / "heldout.csv")), split_seed=0)
    assert d["captions"].tolist() == ["a held-out cat", "a pet"]
    assert list(d["heldout_labels"]) == [0] and set(d["train_labels"]) == {1}


def test_folder_module_lists_torchvision_image_extensions():
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert set(folder.EXTENSIONS) == set(IMG_EXTENSIONS)


# ------------------------------------------------------------------------------------------------ configuration
def test_the_schema_accepts_the_folder_keys(base_config):
    keys = {"captions": "c.csv", "heldout_folder": "h", "heldout_captions": "h.csv", "channels": 1}
    validate_config(deep_merge(base_config, {"data": cfg("my-images", resolution=32, **keys)}))
    assert data.N_LEVELS["folder"] == 256


@pytest.mark.parametrize(
    "change, match",
    [
        ({"root": None}, "data.root is required for data.dataset 'folder'"),
        ({"resolution": None}, "data.resolution is required for data.dataset 'folder'"),
        ({"channels": 2}, r"data.channels: 2 is not one of \[1, 3\]"),
        ({"heldout_captions": "h.csv"}, "data.heldout_captions needs data.heldout_folder"),
        ({"captions": "c.csv", "heldout_folder": "h"}, "data.heldout_captions is required"),
        ({"resolution": 9}, "9 is not divisible by"),
        ({"format": "batches"}, "data.format applies to the ArtBench data sets only"),
    ],
)
def test_config_checks_of_the_folder_keys(base_config, change, match):
    config = deep_merge(base_config, {"data": cfg("my-images", resolution=32)})
    for key, value in change.items():
        if value is None:
            del config["data"][key]
        else:
            config["data"][key] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(config)


def test_folder_keys_are_refused_for_other_data_sets(base_config):
    with pytest.raises(ConfigError, match="data.captions applies to data.dataset folder only"):
        validate_config(deep_merge(base_config, {"data": {"captions": "c.csv"}}))


def test_the_latent_family_needs_captions(base_config, repo):
    import yaml

    latent = yaml.safe_load((repo / "configs" / "latent.yaml").read_text())
    config = deep_merge(deep_merge(base_config, latent), {"data": cfg("my-images", resolution=16)})
    config["scores"]["methods"] = {k: v for k, v in config["scores"]["methods"].items() if v is not None}
    with pytest.raises(ConfigError, match="data.captions is required with model.family latent"):
        validate_config(config)
