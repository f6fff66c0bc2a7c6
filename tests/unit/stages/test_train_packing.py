"""jobs.train: subset -- one train job trains every seed of an LDS subset. Each model must be the same bytes as from a
job of its own: exact equality catches any state (RNG, optimizer, caches) carried from one model to the next."""

from __future__ import annotations

import argparse
import copy
import hashlib

import pytest
import torch

from workflow_scripts.dag.config import validate_config
from workflow_scripts.stages import data as data_stage
from workflow_scripts.stages import train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, smoke_config):
    tmp = tmp_path_factory.mktemp("train_packing")
    config = copy.deepcopy(smoke_config)
    config["data"].update({"n_train": 12, "n_heldout": 3})
    config["train"].update({"steps": 3, "resume_every": 3, "checkpoint_every": 3})
    config["compute"] = {"device": "cpu", "threads": 1}
    validate_config(config)
    data_stage.run(argparse.Namespace(dataset_out=tmp / "dataset.npz", subsets_out=tmp / "subsets.npz"), config)
    return config, tmp


def _args(tmp, replicates, outs, **extra):
    base = {"dataset": str(tmp / "dataset.npz"), "subsets": str(tmp / "subsets.npz"), "subset": 2, "members": None}
    base.update({"fixed_seed_sets": None, "fixed_seed_set": None, "checkpoints": []})
    return argparse.Namespace(**{**base, **extra}, replicate=replicates, out=outs)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_seeds_in_one_job_are_the_bytes_of_two_jobs(inputs):
    config, tmp = inputs
    together = [tmp / "together0.pt", tmp / "together1.pt"]
    train.run(_args(tmp, [0, 1], [str(p) for p in together]), config)
    for replicate, packed in enumerate(together):
        alone = tmp / f"alone{replicate}.pt"
        train.run(_args(tmp, replicate, str(alone)), config)
        assert _digest(packed) == _digest(alone), f"seed {replicate}"
    assert _digest(together[0]) != _digest(together[1])  # two seeds, two different models


def test_several_models_need_a_subset_and_one_output_each(inputs):
    config, tmp = inputs
    with pytest.raises(ValueError, match="one value per model: got 2 and 1"):
        train.run(_args(tmp, [0, 1], [str(tmp / "x.pt")]), config)
    with pytest.raises(ValueError, match="give --subset"):
        train.run(_args(tmp, [0, 1], [str(tmp / "a.pt"), str(tmp / "b.pt")], subset=-1), config)
