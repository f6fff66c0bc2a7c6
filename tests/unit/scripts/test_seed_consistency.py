"""benchmarks/seed_consistency.py: the two-way decomposition of a run's LDS measurements into subset, seed and
interaction, against numpy's covariance (2 seeds) and on layouts whose components are known exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = next(p for p in Path(__file__).resolve().parents if (p / "Snakefile").is_file())


@pytest.fixture(scope="module")
def consistency():
    spec = importlib.util.spec_from_file_location("seed_consistency", REPO / "benchmarks" / "seed_consistency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_seeds_icc_is_twice_the_covariance_over_the_summed_variances(consistency):
    # with 2 seeds, MS_subset - MS_res = 2 cov(a, b) and MS_subset + MS_res = var a + var b (a, b: the two seeds'
    # columns); float64 throughout, so 1e-12 still catches a wrong degree of freedom (a factor 3/4 here)
    y = np.random.default_rng(0).normal(size=(5, 2, 1))
    a, b = y[:, 0, 0], y[:, 1, 0]
    cov = np.cov(a, b)
    expected = 2 * cov[0, 1] / (cov[0, 0] + cov[1, 1])
    assert consistency.decompose(y)["icc_median"] == pytest.approx(expected, abs=1e-12)


def test_a_seed_shift_shared_by_every_subset_is_not_noise(consistency):
    # subset effect + a per-seed shift, no interaction: the rankings over subsets agree exactly between seeds
    rng = np.random.default_rng(1)
    subset, seed = rng.normal(size=(8, 1, 3)), 10 * rng.normal(size=(1, 3, 3))
    d = consistency.decompose(subset + seed)
    assert d["icc_median"] == pytest.approx(1.0, abs=1e-12) and d["ceiling"] == pytest.approx(1.0)
    assert d["sd_interaction"] < 1e-12 and d["sd_seed"] > 1.0  # the shift is seen as the seed's main effect


def test_pure_interaction_has_no_consistency(consistency):
    # no subset effect at all: the ICC's expectation is 0; over 400 queries of 32 x 2 its median is within 0.1 of 0
    # (sd of one query's ICC ~ 0.18 -> sd of the median ~ 0.011), and it would be ~1 if the seed shift were counted
    rng = np.random.default_rng(2)
    y = rng.normal(size=(32, 2, 400)) + 5 * rng.normal(size=(1, 2, 400))
    assert abs(consistency.decompose(y)["icc_median"]) < 0.1


def test_the_layout_is_read_from_the_measure_stage_files_and_a_gap_is_named(consistency, tmp_path):
    out = tmp_path / "measurements"
    out.mkdir()
    for j in range(3):
        for s in range(2):
            np.savez(
                out / f"subset{j:03d}_seed{s}.npz",
                subset=np.array(j),
                replicate=np.array(s),
                generated=np.full(4, 10.0 * j + s),
                heldout=np.full(2, -1.0 * j),
            )
    layout = consistency.load_layout(tmp_path)
    assert layout["generated"].shape == (3, 2, 4) and layout["heldout"].shape == (3, 2, 2)
    assert layout["generated"][2, 1, 0] == 21.0  # subset 2, seed 1
    (out / "subset001_seed1.npz").unlink()
    with pytest.raises(SystemExit, match="subset001_seed1"):
        consistency.load_layout(tmp_path)
