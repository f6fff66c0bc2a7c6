"""benchmarks/ensemble_cost.py: the extra models' job-seconds of each ensemble method, read from a Snakemake log
written in the format Snakemake 9 prints, with the members a method shares counted for each method that reads them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

from workflow_scripts.dag import paths

REPO = next(p for p in Path(__file__).resolve().parents if (p / "Snakefile").is_file())


@pytest.fixture(scope="module")
def cost():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("ensemble_cost", REPO / "benchmarks" / "ensemble_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(jobid: int, rule: str, start: str, end: str, wildcards: str) -> str:
    return (
        f"[Sun Dec  6 {start} 2026]\nlocalrule {rule}:\n    output: x\n    jobid: {jobid}\n"
        f"    reason: Missing output files: x\n    wildcards: {wildcards}\n    resources: tmpdir=/tmp\n\n"
        f"[Sun Dec  6 {end} 2026]\nFinished jobid: {jobid} (Rule: {rule})\n"
    )


def test_extra_seconds_follow_each_methods_members_and_stores(cost, base_config):
    loss, d_trak = paths.feature_tag(base_config, "loss"), paths.feature_tag(base_config, "mean-squared-l2-norm")
    log = "".join(
        [
            _job(1, "train_member", "10:00:00", "10:00:30", "member=member1"),
            _job(2, "train_member", "10:00:00", "10:00:40", "member=member2"),
            _job(3, "train_member", "10:01:00", "10:01:50", "member=member3"),
            _job(4, "gradients", "10:02:00", "10:02:10", f"checkpoint=member1, tag={loss}"),
            _job(5, "gradients", "10:02:00", "10:02:20", f"checkpoint=member2, tag={loss}"),
            _job(6, "gradients", "10:02:00", "10:02:05", f"checkpoint=member1, tag={d_trak}"),
            _job(7, "gradients", "10:03:00", "10:03:07", f"checkpoint=full, tag={loss}"),  # the full model's: not extra
            _job(8, "scores", "10:04:00", "10:04:09", "method=trak_ens2"),
        ]
    )
    jobs = cost.job_durations(log.splitlines(), wildcards=True)
    assert len(jobs) == 8 and jobs[3][3] == {"checkpoint": "member1", "tag": loss}
    assert cost.extra_model_seconds(base_config, "trak_ens2", jobs) == (30.0, 10.0, 2)
    assert cost.extra_model_seconds(base_config, "trak_ens4", jobs) == (120.0, 30.0, 5)
    assert cost.extra_model_seconds(base_config, "d_trak_ens4", jobs) == (120.0, 5.0, 4)
    assert cost.extra_model_seconds(base_config, "trak", jobs) == (0.0, 0.0, 0)
    lds = pd.DataFrame(
        [
            {"method": m, "query_set": s, "lds": 0.1 * i, "ci_low": 0.0, "ci_high": 0.5}
            for i, m in enumerate(base_config["scores"]["methods"])
            for s in ("generated", "heldout")
        ]
    )
    out = cost.table(base_config, lds, jobs).set_index("method")
    # each ensemble beside its one-model twin (d_trak for d_trak_ens4), once
    assert {"trak", "trak_ens2", "trak_ens4", "d_trak", "d_trak_ens4", "das_vector", "das_vector_ens4"} <= set(
        out.index
    )
    assert out.loc["trak", "models"] == 1 and out.loc["trak_ens4", "models"] == 4
    assert out.loc["trak_ens2", "scores job s"] == 9.0
    assert cost.single_model_twin(base_config["scores"]["methods"], "das_vector_ens4") == "das_vector"
