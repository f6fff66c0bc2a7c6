"""Scorers stream their training features: peak Python/numpy memory (tracemalloc) beyond the score matrices does not
grow with n_train. Real stores (.npy + sidecar, memory-mapped by scores.ScorerInputs) of synthetic features; the
chunk size is lowered so that chunking is exercised. The bound is far below the float64 training features that
a dense implementation holds (at CIFAR-10 scale, 50,000 x 4096 features: 1.6 GB)."""

import tracemalloc

import numpy as np
import pytest

from workflow_scripts.core.contracts import RESIDUAL, STORE_SPLITS
from workflow_scripts.core.store import write_store
from workflow_scripts.scorers import base, get_scorer
from workflow_scripts.stages.scores import ScorerInputs

D, N_QUERY, LAMBDAS = 128, 3, [0.1, 1.0]
MB = 2**20

METHODS = {
    "trak": ({"family": "trak", "output_function": "loss"}, "avg", None),
    "normalized_if": ({"family": "normalized_if", "output_function": "loss", "normalization": "relative"}, "avg", None),
    "gradient_similarity": (
        {"family": "gradient_similarity", "output_function": "loss", "similarity": "cosine"},
        "avg",
        None,
    ),
    "das_scalar": ({"family": "das", "form": "scalar", "output_function": "mean", "leverage": True}, "unitnorm", None),
    "das_vector": ({"family": "das", "form": "vector", "output_directions": 4, "leverage": True}, "sketch", 4),
}


def make_stores(directory, n_train, kind, rows, seed=0):
    g = np.random.default_rng(seed)
    made_by = {
        "kind": kind,
        "output_function": "eps" if kind == "sketch" else ("mean" if kind == "unitnorm" else "loss"),
        "output_directions": rows,
    }
    for split in STORE_SPLITS:
        n = n_train if split == "train" else N_QUERY
        shape = (n, *([rows] if rows else []), D)
        array = np.lib.format.open_memmap(directory / f"{split}.tmp.npy", mode="w+", dtype=np.float32, shape=shape)
        for start in range(0, n, 4096):  # written in chunks: the test itself must not hold the store
            block = g.standard_normal((min(4096, n - start), *shape[1:]), dtype=np.float32)
            array[start : start + len(block)] = block * np.geomspace(1, 0.01, D, dtype=np.float32)
        identity = {
            "split": split,
            "shape": list(shape),
            "dtype": "float32",
            "config_hash": "h",
            "made_by": made_by,
            "checkpoint": {"step": 1, "lr": None},
        }
        write_store(array, identity, directory / f"{split}.npy")
        del array
        (directory / f"{split}.tmp.npy").unlink()
    residual = g.uniform(0.5, 1.5, size=(n_train, *([rows] if rows else []))).astype(np.float32)
    write_store(
        residual,
        {
            "split": RESIDUAL,
            "shape": list(residual.shape),
            "dtype": "float32",
            "config_hash": "h",
            "made_by": made_by,
            "checkpoint": {"step": 1, "lr": None},
        },
        directory / f"{RESIDUAL}.npy",
    )


def peak_extra(method_cfg, directory, n_train):
    """Peak traced bytes of family.compute beyond the score matrices it returns."""
    inputs = ScorerInputs("unused.npz", "unused.npz", {"final": str(directory)})
    tracemalloc.start()
    tracemalloc.reset_peak()
    results = get_scorer(method_cfg["family"]).compute(method_cfg, inputs, LAMBDAS)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    returned = sum(m.nbytes for _, matrices in results for m in matrices.values())
    assert all(m.shape == (N_QUERY, n_train) for _, matrices in results for m in matrices.values())
    return peak - returned


@pytest.mark.parametrize("name", list(METHODS))
def test_scorer_memory_does_not_scale_with_n_train(name, tmp_path, monkeypatch):
    monkeypatch.setattr(base, "CHUNK_BYTES", MB // 4)
    method_cfg, kind, rows = METHODS[name]
    extra = {}
    for n in (4000, 32000):
        directory = tmp_path / str(n)
        directory.mkdir()
        make_stores(directory, n, kind, rows)
        extra[n] = peak_extra(method_cfg, directory, n)
    dense = 32000 * (rows or 1) * D * 8  # the float64 training features a dense solver would hold (32-131 MB)
    # beyond the returned matrices: a few float64 score-sized temporaries (n_query x n_train) and per-example
    # vectors, which grow with n_train; the training features must not
    per_train_example = 8 * (4 * N_QUERY + 6 + 2 * (rows or 1) ** 2)
    growth = extra[32000] - extra[4000]
    assert growth <= (32000 - 4000) * per_train_example + MB, (extra, growth)
    assert extra[32000] < dense / 8, (extra, dense)
