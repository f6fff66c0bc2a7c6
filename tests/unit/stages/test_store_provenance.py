"""The scores stage checks every gradient store's sidecar against the run: its model, its projector and the
checkpoint of its role (core/store.py store_provenance). An edited sidecar, or a store of another run copied in,
is refused naming the file and the differing field."""

import copy
import json

import numpy as np
import pytest
import torch

from workflow_scripts.core import store as store_mod
from workflow_scripts.core.common import ArtefactError, save_torch
from workflow_scripts.core.contracts import STORE_SPLITS, config_hash
from workflow_scripts.dag import paths
from workflow_scripts.stages import gradients
from workflow_scripts.stages.scores import ScorerInputs

N = {"train": 6, "generated": 3, "heldout": 3}
EXPECT = {"kind": "avg", "output_function": "loss"}


def _checkpoint(path, smoke_config, step=20, lr=1e-3):
    payload = {"config": {"model": smoke_config["model"], "seed": 2}, "step": step, "lr": lr}
    save_torch({**payload, "state_dict": {"w": torch.ones(3)}}, path)
    return payload


def _stores(directory, config, payload, splits=STORE_SPLITS):
    rng = np.random.default_rng(0)
    for split in splits:
        identity = gradients.store_identity(config, payload, "loss", split, N[split])
        store_mod.write_store(
            rng.standard_normal(identity["shape"]).astype(np.float32), identity, directory / f"{split}.npy"
        )


@pytest.fixture
def run(tmp_path, smoke_config):
    """A run's final checkpoint, its loss store and the ScorerInputs of a method reading it."""
    checkpoint = tmp_path / "model.pt"
    payload = _checkpoint(checkpoint, smoke_config)
    store = tmp_path / "store"
    _stores(store, smoke_config, payload)

    def inputs(config=smoke_config, checkpoints=None):
        return ScorerInputs(
            "unused",
            "unused",
            {"final": str(store)},
            config=config,
            store_checkpoints=checkpoints or {"final": str(checkpoint)},
        )

    return store, checkpoint, inputs


def _edit_sidecar(path, edit):
    sidecar = json.loads(path.read_text())
    edit(sidecar)
    sidecar["config_hash"] = config_hash(sidecar["made_by"])  # a coherent edit: the hash agrees with made_by
    path.write_text(json.dumps(sidecar))


def test_untouched_stores_are_read(run):
    store, _, inputs = run
    reader = inputs()
    for split in STORE_SPLITS:
        assert reader.features("final", split, EXPECT).shape[0] == N[split]


@pytest.mark.parametrize(
    "field, edit",
    [
        ("made_by.model", lambda s: s["made_by"]["model"].update(channels=[64, 128])),
        ("made_by.checkpoint", lambda s: s["made_by"].update(checkpoint="0123456789abcdef")),
        ("made_by.seed_projection", lambda s: s["made_by"].update(seed_projection=s["made_by"]["seed_projection"] + 1)),
        ("checkpoint.lr", lambda s: s["checkpoint"].update(lr=0.5)),  # TracInCP weights checkpoints by it
        ("checkpoint.step", lambda s: s["checkpoint"].update(step=10)),
    ],
)
def test_edited_train_sidecar_is_refused_naming_the_field(run, field, edit):
    store, _, inputs = run
    _edit_sidecar(store / "train.json", edit)
    with pytest.raises(ArtefactError) as info:
        inputs().features("final", "train", EXPECT)
    message = str(info.value)
    assert f"{store / 'train.json'}: {field} is" in message and "rerun" in message
    inputs().features("final", "heldout", EXPECT)  # the untouched query store still reads


def test_query_store_of_another_projector_is_refused(run, tmp_path, smoke_config):
    """A held-out store copied from a run with another projection seed (a coherent store of that run)."""
    store, checkpoint, inputs = run
    other = copy.deepcopy(smoke_config)
    other["seeds"]["projection"] += 1
    _stores(store, other, _checkpoint(tmp_path / "other.pt", other), splits=["heldout"])
    inputs().features("final", "train", EXPECT)
    with pytest.raises(ArtefactError, match=r"heldout\.json: made_by\.seed_projection is"):
        inputs().features("final", "heldout", EXPECT)


def test_stores_of_another_checkpoint_are_refused(run, tmp_path, smoke_config):
    """The run's checkpoint is not the one the stores were computed at (e.g. retrained, stores kept)."""
    _, _, inputs = run
    retrained = tmp_path / "retrained.pt"
    _checkpoint(retrained, smoke_config, step=30)
    with pytest.raises(ArtefactError, match=r"train\.json: made_by\.checkpoint is"):
        inputs(checkpoints={"final": str(retrained)}).features("final", "train", EXPECT)


def test_run_with_another_configuration_refuses_the_stores(run, smoke_config):
    _, _, inputs = run
    config = copy.deepcopy(smoke_config)
    config["gradients"]["projection_dim"] *= 2
    with pytest.raises(ArtefactError, match=r"train\.json: made_by\.projection_dim is"):
        inputs(config=config).features("final", "train", EXPECT)


def test_store_role_without_checkpoint_is_an_error(run):
    _, _, inputs = run
    with pytest.raises(ArtefactError, match=r"gradient store 'final' .*no checkpoint.*--store-checkpoints"):
        inputs(checkpoints={"step0000010": "x.pt"}).features("final", "train", EXPECT)


def test_scores_jobs_name_the_checkpoint_of_every_store_role(smoke_config):
    methods = [m for m in smoke_config["scores"]["methods"] if paths.method_stores(smoke_config, m)]
    roles = set()
    for method in methods:
        stores, checkpoints = (
            paths.method_stores(smoke_config, method),
            paths.method_store_checkpoints(smoke_config, method),
        )
        assert set(checkpoints) == set(stores)
        for role, file in checkpoints.items():
            if role.startswith("step"):
                assert file == paths.full_checkpoint(smoke_config, role)
            elif role.startswith("member"):  # an ensemble member's own model
                assert file == paths.ensemble_member_model(smoke_config, role)
            else:
                assert file == paths.full_model(smoke_config)
        option = paths.method_store_checkpoint_args(smoke_config, method).split()
        assert option[0] == "--store-checkpoints"
        assert paths.parse_stores(option[1:], "--store-checkpoints", "FILE") == checkpoints
        config = json.loads(paths.scores_config(smoke_config, method))  # what the job checks the stores against
        assert {"model", "diffusion", "gradients.projection", "seeds.projection"} <= set(_dotted(config))
        roles |= set(stores)
    assert {"final", "journey", "query", "member1"} <= roles and any(r.startswith("step") for r in roles), roles


def _dotted(tree, prefix=""):
    for key, value in tree.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
