"""MNIST / CIFAR-10 / CIFAR-2 loaders (workflow_scripts/core/datasets.py, data.make_dataset) on small files written in
torchvision's on-disk formats (tests/torchvision_files.py), read by torchvision 0.29's own loaders."""

import numpy as np
import pytest
from torchvision_files import official_cifar_md5s, write_cifar10, write_mnist

from workflow_scripts.core import data, datasets
from workflow_scripts.dag.config import ConfigError, validate_config


@pytest.fixture()
def mnist_root(tmp_path):
    return tmp_path, write_mnist(tmp_path, n_train=60, n_test=20)


@pytest.fixture()
def cifar_root(tmp_path, monkeypatch):
    arrays = write_cifar10(tmp_path, per_batch=30, n_test=40)
    official_cifar_md5s(monkeypatch, tmp_path)
    return tmp_path, arrays


def test_mnist_shapes_scaling_and_pixels(mnist_root):
    root, written = mnist_root
    split = datasets.load("mnist", root)
    assert split["train_images"].shape == (60, 1, 28, 28) and split["test_images"].shape == (20, 1, 28, 28)
    assert split["train_images"].dtype == np.float32
    # exact affine map of the uint8 pixels: 0 -> -1, 255 -> 1
    np.testing.assert_allclose(split["train_images"][:, 0], written["train_images"] / 255.0 * 2 - 1, atol=1e-6)
    np.testing.assert_array_equal(split["test_labels"], written["t10k_labels"])
    assert split["train_images"].min() >= -1 and split["train_images"].max() <= 1


def test_cifar10_channel_order_and_labels(cifar_root):
    root, written = cifar_root
    split = datasets.load("cifar10", root)
    assert split["train_images"].shape == (150, 3, 32, 32) and split["test_images"].shape == (40, 3, 32, 32)
    # CHW rows of the pickle come back as the same CHW images (torchvision converts to HWC; we convert back)
    np.testing.assert_allclose(split["train_images"], written["train_images"] / 255.0 * 2 - 1, atol=1e-6)
    np.testing.assert_array_equal(split["train_labels"], written["train_labels"])
    np.testing.assert_array_equal(split["test_index"], np.arange(40))


def test_cifar2_keeps_automobile_and_horse(cifar_root):
    root, written = cifar_root
    split = datasets.load("cifar2", root)
    keep = np.flatnonzero(np.isin(written["train_labels"], [1, 7]))
    np.testing.assert_array_equal(split["train_index"], keep)
    np.testing.assert_array_equal(split["train_labels"], (written["train_labels"][keep] == 7).astype(int))
    np.testing.assert_allclose(split["train_images"], written["train_images"][keep] / 255.0 * 2 - 1, atol=1e-6)
    assert set(split["test_labels"]) == {0, 1}


def test_cifar2_dataset_split_sizes_balance_and_determinism(cifar_root):
    root, _ = cifar_root
    cfg = {"dataset": "cifar2", "n_train": 20, "n_heldout": 6, "root": str(root)}
    a = data.make_dataset(cfg, split_seed=0)
    assert a["train_images"].shape == (20, 3, 32, 32) and a["heldout_images"].shape == (6, 3, 32, 32)
    assert np.bincount(a["train_labels"]).tolist() == [10, 10]  # 2500 + 2500 at full scale
    assert np.bincount(a["heldout_labels"]).tolist() == [3, 3]
    assert np.all(np.diff(a["train_index"]) > 0) and np.all(np.diff(a["heldout_index"]) > 0)
    b = data.make_dataset(cfg, split_seed=0)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = data.make_dataset(cfg, split_seed=1)
    assert not np.array_equal(a["train_index"], c["train_index"])


def test_mnist_dataset_draws_train_from_train_split_and_heldout_from_test_split(mnist_root):
    root, written = mnist_root
    d = data.make_dataset({"dataset": "mnist", "n_train": 30, "n_heldout": 10, "root": str(root)}, split_seed=0)
    np.testing.assert_allclose(
        d["train_images"][:, 0], written["train_images"][d["train_index"]] / 255.0 * 2 - 1, atol=1e-6
    )
    np.testing.assert_allclose(
        d["heldout_images"][:, 0], written["t10k_images"][d["heldout_index"]] / 255.0 * 2 - 1, atol=1e-6
    )
    assert np.bincount(d["train_labels"]).tolist() == [3] * 10


def test_data_stage_cli_writes_the_dataset(mnist_root, tmp_path):
    import json
    import subprocess
    import sys

    root, _ = mnist_root
    config = {
        "data": {"dataset": "mnist", "n_train": 20, "n_heldout": 10, "root": str(root)},
        "lds": {"n_subsets": 4, "n_tuning": 2, "fraction": 0.5},
        "seeds": {"split": 0, "subsets": 1},
    }
    out = tmp_path / "out"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "workflow_scripts",
            "data",
            "--config",
            json.dumps(config),
            "--dataset-out",
            str(out / "dataset.npz"),
            "--subsets-out",
            str(out / "subsets.npz"),
        ],
        check=True,
        cwd=data.__file__.rsplit("/workflow_scripts", 1)[0],
    )
    written = data.load_dataset(out / "dataset.npz")
    assert written["train_images"].shape == (20, 1, 28, 28)
    assert data.load_subsets(out / "subsets.npz")["masks"].shape == (4, 20)


def test_too_many_images_of_a_class_is_refused(mnist_root):
    root, _ = mnist_root
    with pytest.raises(ValueError, match="data.n_heldout = 30 is too large"):
        data.make_dataset({"dataset": "mnist", "n_train": 10, "n_heldout": 30, "root": str(root)}, split_seed=0)


def test_missing_files_error_names_them_and_the_command(tmp_path):
    with pytest.raises(datasets.DataNotFound) as info:
        datasets.load("cifar2", tmp_path / "nowhere")
    message = str(info.value)
    assert "missing" in message and "cifar-10-batches-py/data_batch_1" in message and "test_batch" in message
    assert "torchvision.datasets.CIFAR10(" in message and "download=True" in message
    assert "cifar-10-python.tar.gz" in message
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(
        datasets.DataNotFound, match=r"missing .*t10k-labels-idx1-ubyte[\s\S]*torchvision.datasets.MNIST\("
    ):
        datasets.load("mnist", tmp_path)


def test_cifar_files_that_are_not_the_official_ones_are_reported_corrupt(tmp_path):
    # without the patched checksums torchvision's md5 check rejects the small files: so do we, naming them
    write_cifar10(tmp_path, per_batch=10, n_test=10)
    with pytest.raises(datasets.DataNotFound, match=r"corrupt .*data_batch_1 \(md5 differs"):
        datasets.load("cifar10", tmp_path)


def test_n_levels_of_real_data_sets_is_256():
    assert all(data.N_LEVELS[name] == 256 for name in ("mnist", "cifar10", "cifar2"))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"data": {"dataset": "cifar2", "n_train": 5000, "n_heldout": 1000}}, "data.root is required"),
        ({"data": {"dataset": "cifar2", "n_train": 10001, "n_heldout": 1000, "root": "x"}}, "exceeds cifar2's 10000"),
        ({"data": {"dataset": "mnist", "n_train": 100, "n_heldout": 10001, "root": "x"}}, "exceeds mnist's 10000 test"),
        (
            {
                "data": {"dataset": "mnist", "n_train": 100, "n_heldout": 10, "root": "x"},
                "model": {"block_out_channels": [8, 16, 16, 16], "attention": [False] * 4},
            },
            "28 is not divisible by 8",
        ),
    ],
)
def test_config_checks_of_real_data_sets(base_config, change, match):
    from workflow_scripts.dag.config import deep_merge

    with pytest.raises(ConfigError, match=match):
        validate_config(deep_merge(base_config, change))
