"""The scores rule declares every file the scores stage writes (a file it writes but does not declare is invisible
to Snakemake and to scripts/dvc-pull's completeness check: deleting it would leave "Nothing to be done")."""

import argparse
import re
from pathlib import Path

import numpy as np
import pytest

from workflow_scripts.core.common import save_npz
from workflow_scripts.stages import scores

REPO = Path(__file__).resolve().parents[3]
N_TRAIN, N_QUERY, N_SUBSETS, N_SEEDS = 12, 3, 6, 2
RULES = ("scores", "scores_kfac_family")


@pytest.fixture(scope="module")
def scores_rules():
    """{rule: its outputs} of the rules `scores` and `scores_kfac_family` as the Snakefile declares them (smoke
    configuration), parsed by Snakemake's own API."""
    snakemake_api = pytest.importorskip("snakemake.api")
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with snakemake_api.SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[REPO / "configs/smoke.yaml"]),
            snakefile=REPO / "Snakefile",
            workdir=REPO,
        )
        # a wildcard's constraint shows in its outputs as {method,<regex>}: keep the name only
        yield {
            name: [re.sub(r"\{(\w+),[^}]*\}", r"{\1}", str(f)) for f in workflow._workflow.get_rule(name).output]
            for name in RULES
        }


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    images = lambda n: rng.random((n, 1, 8, 8)).astype(np.float32)  # noqa: E731
    save_npz(tmp_path / "dataset.npz", train_images=images(N_TRAIN), heldout_images=images(N_QUERY))
    save_npz(tmp_path / "samples.npz", images=images(N_QUERY))
    masks = rng.random((N_SUBSETS, N_TRAIN)) < 0.5
    save_npz(tmp_path / "subsets.npz", masks=masks, tuning=np.arange(3), evaluation=np.arange(3, N_SUBSETS))
    measurements = []
    for j in range(N_SUBSETS):
        for s in range(N_SEEDS):
            path = tmp_path / f"subset{j:03d}_seed{s}.npz"
            losses = {q: rng.normal(size=N_QUERY) for q in ("generated", "heldout")}
            save_npz(path, subset=np.array(j), replicate=np.array(s), targets=np.array(["loss"]), **losses)
            measurements.append(str(path))
    return tmp_path, measurements


@pytest.mark.parametrize(
    "method, method_cfg",
    [
        ("pixel_cosine", {"family": "pixel", "similarity": "cosine"}),
        # cannot run here (no weights): chosen.json says so, the matrices exist all the same (all NaN)
        ("clip_dot", {"family": "clip", "similarity": "dot", "model": "ViT-B-32", "weights": None}),
    ],
)
def test_scores_rule_declares_every_file_the_stage_writes(scores_rules, inputs, method, method_cfg):
    scores_rule = scores_rules["scores"]
    directory, measurements = inputs
    out = directory / "scores" / method
    args = argparse.Namespace(
        method=[method],
        dataset=str(directory / "dataset.npz"),
        images=None,
        samples=str(directory / "samples.npz"),
        subsets=str(directory / "subsets.npz"),
        measurements=measurements,
        features=None,
        store_checkpoints=None,
        classifier=None,
        model=None,
        curvature=None,
        chunks=None,
        extra_queries=None,
        extra_images=None,
        out_dir=[str(out)],
    )
    config = {
        "scores": {"methods": {method: method_cfg}, "lambda_grid": [1.0]},
        "lds": {"n_subsets": N_SUBSETS, "n_seeds": N_SEEDS},
    }
    scores.run(args, config)
    written = sorted(p.name for p in out.iterdir())
    declared = sorted(Path(f.format(method=method)).name for f in scores_rule)
    assert all(Path(f).parent.name == "{method}" for f in scores_rule), scores_rule
    assert written == declared, f"the scores stage writes {written}, the rule declares {declared}"
    for name in ("generated", "heldout"):
        matrix = np.load(out / f"{name}.npy")
        assert matrix.shape == (N_QUERY, N_TRAIN)
        assert np.isnan(matrix).all() == (method == "clip_dot")


def test_kfac_family_rule_declares_each_methods_files(scores_rules, smoke_config):
    """The one job of the K-FAC family declares, for every kfac method, exactly the files rule `scores` declares for a
    method (so the stage's files are declared and every reader of scores is unchanged); rule `scores` does not
    produce them."""
    from workflow_scripts.dag import paths

    kfac = [m for m, c in smoke_config["scores"]["methods"].items() if c["family"] == "kfac"]
    assert len(kfac) > 1
    expected = sorted(f.format(method=m) for m in kfac for f in scores_rules["scores"])
    assert sorted(scores_rules["scores_kfac_family"]) == expected
    pattern = re.compile(paths.scores_method_pattern(smoke_config))
    assert not any(pattern.fullmatch(m) for m in kfac)
    assert all(pattern.fullmatch(m) for m in smoke_config["scores"]["methods"] if m not in kfac)
