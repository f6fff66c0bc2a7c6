"""DVC over the Snakemake workflow: dvc.yaml, the pull round trip (scripts/dvc-pull) and the SLURM profile.

The round trip builds the smoke benchmark with `dvc repro` in a scratch git repository, pushes it to a
local remote, clones that repository and restores the results with scripts/dvc-pull; Snakemake must then
have nothing to do and the LDS table must be byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = next(p for p in Path(__file__).resolve().parents if (p / "Snakefile").is_file())
BIN = Path(sys.executable).parent
# The round trip runs the smoke config trimmed for time (it is about DVC, not about the scores): one
# method per family with its own rules (pixel: no stores, trak: gradient stores, journey: the
# gradients_journey rule, kfac: the curvature rule, metagradient: its chunk jobs and fixed-seed retrainings), the
# schema's minimum of 4 LDS subsets (2 tuning + 2 evaluation) and one counterfactual query.
ROUND_TRIP_FAMILIES = ("pixel", "trak", "journey", "kfac", "metagradient")
ROUND_TRIP_LDS = {"n_subsets": 4, "n_tuning": 2}
# workflow_scripts.dag.paths.SECTIONS stages whose rules each dvc.yaml stage runs
DVC_STAGE_SECTIONS = {
    "models": ("data", "train", "classifier"),
    "samples": ("sample",),
    "measurements": ("measure", "queries"),  # queries: rule extra_queries, measure's upstream (queries.extra)
    "gradients": ("gradients", "gradients_journey", "gradients_measurement"),
    "curvature": ("curvature",),
    "evaluate": ("evaluate",),
    # the counterfactual retrainings are train_subset jobs, hence "train"
    "counterfactual": ("counterfactual", "train", "regenerate", "counterfactual_evaluate"),
    "scores": ("scores", "metagradient"),
    "figures": ("figures",),
    # the metagradient's chunk jobs run in stage scores; its fixed-seed retrainings are train_subset jobs
    "metagradient": ("fixed_seed", "train", "measure", "metagradient_evaluate"),
}
# rules that run as dependencies of an `--until` rule (the counterfactual stage names only its last rule:
# naming counterfactual and regenerate as well trips Snakemake 9.27's scheduler, see dvc.yaml)
UPSTREAM_ONLY_RULES = {
    "all",
    "data",
    "counterfactual",
    "regenerate",
    "metagradient",
    "fixed_seed_sets",
    "measure_fixed_seed",
    "extra_queries",  # only with queries.extra: an --until entry would force the job without it
}
# rules and stages of another model family (vesde, latent: overlays): DVC versions the params.yaml benchmark only
FAMILY_ONLY_RULES = {"likelihood_sanity", "base_pipeline", "encode", "encode_extra"}
FAMILY_ONLY_STAGES = {"base_pipeline", "encode"}


def env(home: Path) -> dict:
    return {
        "PATH": f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(home),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }


def run(args: list[str], cwd: Path, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env(home), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}) in {cwd}:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def copy_repo(dest: Path) -> Path:
    """The repository as it would be committed: tracked files plus new, not ignored ones."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # skips files deleted in the work tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def smoke_params(trimmed: bool = False) -> dict:
    sys.path.insert(0, str(REPO))
    from workflow_scripts.dag.config import deep_merge

    params = deep_merge(
        yaml.safe_load((REPO / "params.yaml").read_text()), yaml.safe_load((REPO / "configs/smoke.yaml").read_text())
    )
    if trimmed:
        params["lds"].update(ROUND_TRIP_LDS)
        methods = params["scores"]["methods"]
        kept = {}
        for family in ROUND_TRIP_FAMILIES:
            name = next((n for n, m in methods.items() if m["family"] == family), None)
            if name is not None:
                kept[name] = methods[name]
        params["scores"]["methods"] = kept
        for section in ("counterfactual", "figures"):  # methods that are left
            params[section]["methods"] = [m for m in params[section]["methods"] if m in kept]
        params["counterfactual"]["queries"] = 1  # one retraining per method: enough to version them
    return params


def dvc_yaml(benchmark: str) -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text().replace("${benchmark}", benchmark))


def stage_paths(stage: dict, *keys: str) -> list[str]:
    return [next(iter(entry)) if isinstance(entry, dict) else entry for key in keys for entry in stage.get(key, [])]


def result_mtimes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted((root / "results").rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------------------------------- the round trip
@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    base = tmp_path_factory.mktemp("dvc")
    origin, remote, clone = base / "origin", base / "remote", base / "clone"
    copy_repo(origin)
    params = smoke_params(trimmed=True)
    (origin / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], origin, base)
    if not (origin / ".dvc").is_dir():
        run(["dvc", "init", "-q"], origin, base)
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], origin, base)
    run(["git", "add", "-A"], origin, base)
    run(["git", "commit", "-qm", "workflow"], origin, base)

    started = time.monotonic()
    run(["dvc", "repro"], origin, base)
    repro_seconds = time.monotonic() - started
    run(["git", "add", "dvc.lock"], origin, base)
    run(["git", "commit", "-qm", "results"], origin, base)
    run(["dvc", "push"], origin, base)

    run(["git", "clone", "-q", str(origin), str(clone)], base, base)
    started = time.monotonic()
    pulled = run([str(clone / "scripts/dvc-pull")], clone, base, check=False)
    pull_seconds = time.monotonic() - started
    print(f"dvc repro {repro_seconds:.0f} s, scripts/dvc-pull {pull_seconds:.0f} s")
    return {
        "base": base,
        "origin": origin,
        "remote": remote,
        "clone": clone,
        "pulled": pulled,
        "benchmark": params["benchmark"],
    }


@pytest.mark.slow
def test_origin_is_up_to_date_after_dvc_repro(round_trip):
    origin, base = round_trip["origin"], round_trip["base"]
    assert "Nothing to be done" in output(run(["snakemake", "-n", "--cores", "2"], origin, base))
    status = run(["dvc", "status"], origin, base)  # no stage looks changed (e.g. by __pycache__ in deps)
    assert "up to date" in output(status), output(status)


@pytest.mark.slow
def test_pull_script_leaves_snakemake_nothing_to_do(round_trip):
    clone, origin, base = round_trip["clone"], round_trip["origin"], round_trip["base"]
    pulled = round_trip["pulled"]
    assert pulled.returncode == 0, output(pulled)
    dry = output(run(["snakemake", "-n", "--cores", "2"], clone, base))
    assert "Nothing to be done" in dry, dry
    assert "missing provenance" not in dry, dry  # every job got Snakemake metadata
    tables = sorted((origin / "results" / round_trip["benchmark"] / "tables").iterdir())
    assert {t.suffix for t in tables} >= {".csv", ".md", ".json"}
    for table in tables:
        assert (clone / table.relative_to(origin)).read_bytes() == table.read_bytes(), table.name
    assert "up to date" in output(run(["dvc", "status"], clone, base))


@pytest.mark.slow
def test_pull_script_refuses_to_touch_when_an_output_is_missing(round_trip):
    """Results restored by other means (--no-pull) with one file lost: no touch, no metadata, file named."""
    base, origin = round_trip["base"], round_trip["origin"]
    clone = base / "clone-missing"
    run(["git", "clone", "-q", str(origin), str(clone)], base, base)
    run(["dvc", "pull"], clone, base)
    lost = next((clone / "results" / round_trip["benchmark"] / "measurements").glob("*.npz"))
    lost.unlink()
    before = result_mtimes(clone)
    refused = run([str(clone / "scripts/dvc-pull"), "--no-pull"], clone, base, check=False)
    assert refused.returncode != 0
    assert str(lost.relative_to(clone)) in refused.stderr and "nothing was touched" in refused.stderr
    assert not lost.exists()
    assert result_mtimes(clone) == before
    assert not any((clone / ".snakemake/metadata").glob("*"))


@pytest.mark.slow
def test_pull_script_refuses_when_the_remote_lacks_a_file(round_trip):
    """An incomplete push: dvc pull fails for one file; the script names it and touches nothing."""
    base, origin = round_trip["base"], round_trip["origin"]
    partial = base / "remote-partial"
    shutil.copytree(round_trip["remote"], partial)
    lost = sorted((origin / "results" / round_trip["benchmark"] / "measurements").glob("*.npz"))[-1]
    digest = hashlib.md5(lost.read_bytes()).hexdigest()
    (partial / "files" / "md5" / digest[:2] / digest[2:]).unlink()
    clone = base / "clone-partial"
    run(["git", "clone", "-q", str(origin), str(clone)], base, base)
    run(["dvc", "remote", "modify", "--local", "storage", "url", str(partial)], clone, base)
    refused = run([str(clone / "scripts/dvc-pull")], clone, base, check=False)
    assert refused.returncode != 0
    assert str(lost.relative_to(origin)) in refused.stderr and "nothing was touched" in refused.stderr
    assert not (clone / lost.relative_to(origin)).exists()
    assert not any((clone / ".snakemake/metadata").glob("*"))


# ------------------------------------------------------------------------------- dvc-pull of a tampered remote
TAMPER_TABLE = "| method | LDS |\n|---|---|\n| trak | 0.05 |\n"
TAMPERED_TABLE = TAMPER_TABLE.replace("0.05", "1.0")


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


TAMPER_SNAKEFILE = """
rule make:
    output: "results/tables/lds.md", "results/tables/counterfactual.md", "results/models/full.pt"
    run:
        from pathlib import Path
        Path(output[0]).write_text({table!r})
        Path(output[1]).write_text("| random | 0.1 |\\n")
        Path(output[2]).write_bytes(bytes(range(256)) * 64)
"""
TAMPER_DVC_YAML = {
    "stages": {
        "run": {
            "cmd": "snakemake --cores 1",
            "deps": ["Snakefile"],
            "outs": [{"results/tables": {"persist": True}}, {"results/models": {"persist": True}}],
        }
    }
}


def test_pull_script_refuses_a_tampered_remote(tmp_path):
    """An object edited on the remote (the LDS table's trak value 0.05 -> 1.0) and one garbled (the full model):
    dvc pull checks them out without a word; scripts/dvc-pull names both, deletes them, touches nothing. A tiny
    repository (one rule, two directory outs, as dvc.yaml's) rather than the round trip: seconds, not minutes."""
    origin, remote = tmp_path / "origin", tmp_path / "remote"
    (origin / "scripts").mkdir(parents=True)
    for script in ("dvc-pull", "dvc_verify.py"):
        shutil.copy2(REPO / "scripts" / script, origin / "scripts" / script)
    (origin / "Snakefile").write_text(TAMPER_SNAKEFILE.format(table=TAMPER_TABLE))
    (origin / "dvc.yaml").write_text(yaml.safe_dump(TAMPER_DVC_YAML))
    (origin / ".gitignore").write_text("/results/\n/.snakemake/\n")
    run(["git", "init", "-q"], origin, tmp_path)
    run(["dvc", "init", "-q"], origin, tmp_path)
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], origin, tmp_path)
    run(["dvc", "repro", "-q"], origin, tmp_path)
    run(["git", "add", "-A"], origin, tmp_path)
    run(["git", "commit", "-qm", "results"], origin, tmp_path)
    run(["dvc", "push", "-q"], origin, tmp_path)

    run(["git", "clone", "-q", str(origin), str(tmp_path / "good")], tmp_path, tmp_path)  # the intact remote
    good = run([str(tmp_path / "good/scripts/dvc-pull")], tmp_path / "good", tmp_path, check=False)
    assert good.returncode == 0 and "done: all results present" in good.stderr, good.stderr

    # the tampering: the LDS table's trak value 0.05 -> 1.0, the full model's object garbled
    table_object = remote / "files/md5" / _md5(TAMPER_TABLE.encode())[:2] / _md5(TAMPER_TABLE.encode())[2:]
    model = (origin / "results/models/full.pt").read_bytes()
    model_object = remote / "files/md5" / _md5(model)[:2] / _md5(model)[2:]
    for obj, data in ((table_object, TAMPERED_TABLE.encode()), (model_object, b"\0" * len(model))):
        obj.chmod(0o644)
        obj.write_bytes(data)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, tmp_path)
    lock = (clone / "dvc.lock").read_text()
    pulled = run([str(clone / "scripts/dvc-pull")], clone, tmp_path, check=False)
    assert pulled.returncode == 1, pulled.stderr
    err = pulled.stderr
    assert "results/tables/lds.md: content md5" in err and "results/models/full.pt: content md5" in err, err
    assert "corrupt copies" in err and "nothing was touched" in err and "done:" not in err, err
    assert not (clone / "results/tables/lds.md").exists()  # the tampered table is not left in results/
    assert not (clone / "results/models/full.pt").exists()
    assert (clone / "results/tables/counterfactual.md").read_text() == "| random | 0.1 |\n"
    assert not any((clone / ".snakemake/metadata").glob("*"))
    assert (clone / "dvc.lock").read_text() == lock
    # a second attempt fetches the same corrupt objects again and refuses again
    again = run([str(clone / "scripts/dvc-pull")], clone, tmp_path, check=False)
    assert again.returncode == 1 and "results/tables/lds.md: content md5" in again.stderr, again.stderr


# ------------------------------------------------------------------------------ dvc.yaml matches the workflow
@pytest.fixture(scope="module")
def smoke_copy(tmp_path_factory):
    workdir = copy_repo(tmp_path_factory.mktemp("dvc-yaml") / "repo")
    (workdir / "params.yaml").write_text(yaml.safe_dump(smoke_params(), sort_keys=False))
    return workdir


def test_dvc_params_cover_what_each_stage_reads():
    sys.path.insert(0, str(REPO))
    from workflow_scripts.dag.paths import SECTIONS
    from workflow_scripts.scorers import SCORERS

    stages = dvc_yaml("smoke")["stages"]
    assert set(DVC_STAGE_SECTIONS) == set(stages), "update DVC_STAGE_SECTIONS with dvc.yaml"
    mapped = {s for sections in DVC_STAGE_SECTIONS.values() for s in sections}
    unmapped = set(SECTIONS) - mapped - FAMILY_ONLY_STAGES
    assert not unmapped and mapped <= set(SECTIONS), f"paths.SECTIONS stages without a dvc.yaml stage: {unmapped}"
    for name, sections in DVC_STAGE_SECTIONS.items():
        listed = set(stages[name]["params"])
        for key in (k for s in sections for k in SECTIONS[s]):
            parts = key.split(".")
            assert any(".".join(parts[:i]) in listed for i in range(1, len(parts) + 1)), (
                f"dvc.yaml stage {name!r} does not list params {key!r}"
            )
    for key in (k for scorer in SCORERS.values() for k in scorer.config_keys):  # the scorers' extra keys
        assert key.split(".")[0] in stages["scores"]["params"], f"dvc.yaml stage 'scores' does not list params {key!r}"


def test_dvc_outs_cover_every_snakemake_output(smoke_copy):
    """Every output and log of the (smoke) Snakemake DAG lies inside an out of some dvc.yaml stage."""
    plan = run(["snakemake", "-n", "--forceall", "--cores", "1"], smoke_copy, smoke_copy.parent).stdout
    files = {
        f
        for line in plan.splitlines()
        if re.match(r"\s+(output|log): ", line)
        for f in line.split(": ", 1)[1].split(", ")
    }
    assert any("/models/" in f for f in files), plan[-3000:]
    stages = dvc_yaml("smoke")["stages"]
    outs = [p for stage in stages.values() for p in stage_paths(stage, "outs", "metrics", "plots")]
    uncovered = sorted(f for f in files if not any(f == o or f.startswith(o.rstrip("/") + "/") for o in outs))
    assert not uncovered, f"Snakemake outputs that no dvc.yaml stage tracks: {uncovered}"


def test_every_rule_runs_in_a_dvc_stage(smoke_copy):
    listed = run(["snakemake", "--list-rules"], smoke_copy, smoke_copy.parent).stdout.split()
    until = {
        rule
        for stage in dvc_yaml("smoke")["stages"].values()
        for rule in re.search(r"--until (.*)$", stage["cmd"]).group(1).split()
    }
    missing = set(listed) - until - UPSTREAM_ONLY_RULES - FAMILY_ONLY_RULES
    assert not missing, f"rules that no dvc.yaml stage runs (add them to a stage's --until): {sorted(missing)}"


# ---------------------------------------------------------------------------------------------- SLURM profile
def test_slurm_profile_plans_without_slurm(tmp_path):
    workdir = copy_repo(tmp_path / "repo")  # default params.yaml: the digits benchmark
    result = run(["snakemake", "-n", "--profile", "profiles/slurm"], workdir, tmp_path, check=False)
    text = output(result)
    assert result.returncode == 0, text
    assert re.search(r"^train_subset\s+\d+$", text, re.M), text[-3000:]
    assert "Group job retrain" in text  # train_subset + measure batched into group jobs
    jobs = text.split("rule ")
    gpu_rules = {job.split(":")[0] for job in jobs if re.search(r"resources:.*\bgpu=1\b", job)}
    assert {"train_full", "train_member", "train_subset", "gradients"} <= gpu_rules, gpu_rules
