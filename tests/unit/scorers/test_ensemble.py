"""Ensembles (`ensemble: K`, scorers/base.py): the scores are the mean of K members' scores, each member on its own
stores (role 'final' = the full model, member<k> = models/ensemble/member<k>), against dense per-member formulas; the
DAG names the members' stores and checkpoints; settings that cannot combine are refused naming the field."""

import numpy as np
import pytest
import yaml

from workflow_scripts.dag import paths
from workflow_scripts.dag.config import ConfigError, load_config
from workflow_scripts.scorers import das, get_scorer
from workflow_scripts.scorers.base import average_members, member_roles, with_members

QUERY_SETS = ("generated", "heldout")


def _features(n, d, q, seed):
    rng = np.random.default_rng(seed)
    scales = np.geomspace(1.0, 1e-2, d)  # anisotropic, as gradients are
    return (rng.normal(size=(n, d)) * scales).astype(np.float32), (rng.normal(size=(q, d)) * scales).astype(np.float32)


def dense_trak(train, queries, relative_lambda):
    phi = train.astype(np.float64)
    gram = phi.T @ phi
    lam = relative_lambda * np.trace(gram) / phi.shape[1]
    return queries.astype(np.float64) @ np.linalg.solve(gram + lam * np.eye(phi.shape[1]), phi.T)


class RoleInputs:
    """Stores by role, as the scores stage's ScorerInputs serves them."""

    query_sets = QUERY_SETS

    def __init__(self, stores: dict, residuals: dict | None = None):
        self.stores, self._residuals, self.read = stores, residuals or {}, []

    def features(self, role, split, expect=None):
        if role not in self.stores:
            raise KeyError(f"no store {role!r}")
        self.read.append(role)
        return self.stores[role][split]

    def residuals(self, role):
        return self._residuals[role]

    def sidecar(self, role, split):
        return {"made_by": {}}


def _member_stores(k, n=14, d=9, q=3):
    stores = {}
    for i, role in enumerate(member_roles(k)):
        train, gen = _features(n, d, q, seed=10 * i)
        _, held = _features(n, d, q + 1, seed=10 * i + 1)
        stores[role] = {"train": train, "generated": gen, "heldout": held}
    return stores


def test_trak_ensemble_is_the_mean_of_each_members_dense_scores():
    stores = _member_stores(3)
    inputs = RoleInputs(stores)
    cfg = {"family": "trak", "output_function": "loss", "ensemble": 3}
    lambdas = [0.01, 1.0]
    [(method, got)] = get_scorer("trak").compute_methods({"m": cfg}, {"m": inputs}, {"m": lambdas}).items()
    assert sorted(set(inputs.read)) == ["final", "member1", "member2"]
    for lam, matrices in got:
        for name in QUERY_SETS:
            expected = np.mean([dense_trak(s["train"], s[name], lam) for s in stores.values()], axis=0)
            # float32 output of float64 algebra (eigh vs solve): ~1e-6 relative; a member scored on another
            # member's store, a sum instead of a mean, or one member's lambda scale for all is off by O(1)
            np.testing.assert_allclose(matrices[name], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_one_model_is_the_plain_method():
    stores = _member_stores(1)
    plain = get_scorer("trak").compute({"family": "trak", "output_function": "loss"}, RoleInputs(stores), [0.1])
    one = get_scorer("trak").compute_ensemble(
        {"family": "trak", "output_function": "loss", "ensemble": 1}, RoleInputs(stores), [0.1]
    )
    for name in QUERY_SETS:
        np.testing.assert_array_equal(one[0][1][name], plain[0][1][name])


def test_das_ensemble_uses_each_members_residuals():
    rng = np.random.default_rng(3)
    n, r, d = 12, 4, 7
    stores, residuals = {}, {}
    for role in member_roles(2):
        stores[role] = {
            split: rng.normal(size=(size, r, d)).astype(np.float32)
            for split, size in (("train", n), ("generated", 2), ("heldout", 3))
        }
        residuals[role] = rng.normal(size=(n, r)).astype(np.float32)
    cfg = {"family": "das", "form": "vector", "output_directions": r, "leverage": True, "ensemble": 2}
    got = get_scorer("das").compute_ensemble(cfg, RoleInputs(stores, residuals), [0.1])
    # each member alone, with its own store in role 'final'
    alone = [
        das.compute(cfg, RoleInputs({"final": stores[role]}, {"final": residuals[role]}), [0.1])
        for role in member_roles(2)
    ]
    for name in QUERY_SETS:
        expected = (alone[0][0][1][name].astype(np.float64) + alone[1][0][1][name]) / 2
        # the same float64 algebra on the same inputs, then float32: a member read with another's residuals is O(1) off
        np.testing.assert_allclose(got[0][1][name], expected, rtol=1e-6)


def test_members_must_share_the_lambda_grid():
    a = [(0.1, {"generated": np.zeros((1, 2), np.float32)})]
    b = [(1.0, {"generated": np.zeros((1, 2), np.float32)})]
    with pytest.raises(ValueError, match="lambda"):
        average_members([a, b])


def test_with_members_repeats_the_full_models_stores_only():
    needs = get_scorer("trak").all_stores({"family": "trak", "output_function": "loss", "ensemble": 3})
    assert [(n.role, n.checkpoint) for n in needs] == [
        ("final", "full"),
        ("member1", "member1"),
        ("member2", "member2"),
    ]
    journey = get_scorer("journey").stores({"family": "journey", "output_function": "loss"})
    assert with_members(journey, 1) == journey


def test_the_dag_names_each_members_store_and_checkpoint(repo):
    config = load_config(repo / "params.yaml")
    config["scores"]["methods"]["trak_ens3"] = {"family": "trak", "output_function": "loss", "ensemble": 3}
    stores = paths.method_stores(config, "trak_ens3")
    assert sorted(stores) == ["final", "member1", "member2"]
    root = paths.root(config)
    tag = paths.feature_tag(config, "loss")
    assert stores["member2"] == (f"{root}/gradients/member2/{tag}", "avg")
    assert stores["final"] == (f"{root}/gradients/full/{tag}", "avg")
    checkpoints = paths.method_store_checkpoints(config, "trak_ens3")
    assert (
        checkpoints["member1"]
        == f"{root}/models/ensemble/member1/model.pt"
        == paths.checkpoint_model(config, "member1")
    )
    assert checkpoints["final"] == paths.full_model(config)
    assert paths.ensemble_members(config) == ["member1", "member2", "member3"]  # params.yaml's largest: 4 models
    assert paths.member_replicate("member3") == 3
    for bad in ("member0", "memberx", "full"):
        with pytest.raises(ValueError, match="member"):
            paths.member_replicate(bad)


def _overlay(repo, tmp_path, methods: dict) -> dict:
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"scores": {"methods": methods}}))
    return load_config(repo / "params.yaml", repo / "configs" / "smoke.yaml", overlay)


def test_ensemble_with_a_query_measurement_is_refused_naming_the_method(repo, tmp_path):
    method = {"family": "trak", "output_function": "loss", "ensemble": 2, "query_measurement": "elbo"}
    with pytest.raises((ConfigError, ValueError), match="trak_elbo_ens.*ensemble"):
        _overlay(repo, tmp_path, {"trak_elbo_ens": method})


def test_a_scorer_without_ensembles_refuses_the_key(repo, tmp_path):
    method = {"family": "tracin", "output_function": "loss", "similarity": "dot", "ensemble": 2}
    with pytest.raises((ConfigError, ValueError), match="ensemble"):
        _overlay(repo, tmp_path, {"tracin_ens": method})
