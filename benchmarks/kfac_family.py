"""CPU time of the K-FAC family's scores: one job per method (each method's own process, as rule `scores` ran them)
against one job for the whole family (rule scores_kfac_family: one pass of training gradients for every method).

    .venv/bin/python benchmarks/kfac_family.py [--workdir DIR] [--configfile OVERLAY ...] [--repeats 3]
                                               [--former REV] [--methods kfac ekfac ...]

It reads a finished run's artefacts (its dataset, samples, subsets, measurements, final model and curvature files,
at the paths dag/paths.py gives for the configuration; `--workdir` holds its results/ directory, default this
repository) and runs the scores stage exactly as the rules do, writing to a temporary directory (the run's own scores
are not touched). Per repeat: every method in its own process ("before"), then all of them in one process ("after");
CPU time is the children's user + system time (getrusage), so model loading and process start are counted as a job
pays them. `--former REV` runs "before" with the scores stage of a git revision (e.g. the commit before the one-pass
family) instead of the current code with one method per process (the same computation). Output: a Markdown table of
the medians over the repeats, then a check that both give every method the same chosen lambda and score matrices.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.core.contracts import QUERY_SETS  # noqa: E402
from workflow_scripts.dag import paths  # noqa: E402
from workflow_scripts.dag.config import load_config  # noqa: E402


def common_args(config: dict, workdir: Path) -> list[str]:
    """The scores stage's data options, as the rules pass them (absolute paths inside the run's directory)."""
    at = lambda p: str(workdir / p)  # noqa: E731
    return [
        "--dataset",
        at(paths.model_inputs_file(config)),
        "--images",
        at(paths.dataset_file(config)),
        "--samples",
        at(paths.samples_file(config)),
        "--subsets",
        at(paths.subsets_file(config)),
        "--measurements",
        *[at(f) for f in paths.measurement_files(config)],
    ]


def model_args(config: dict, methods: list[str], workdir: Path) -> list[str]:
    """--model and --curvature: once when every method reads the same file, else one per method in order."""
    per_method = [paths.method_model_inputs(config, m) for m in methods]
    out = []
    for option in per_method[0]:
        files = [str(workdir / inputs[option]) for inputs in per_method]
        out += [f"--{option}", *(files if len(set(files)) > 1 else files[:1])]
    return out


def run_job(argv: list[str], code: Path, workdir: Path, log: Path) -> tuple[float, float]:
    """(CPU seconds of the child, wall seconds) of one scores job: the scores stage of `code`, run in the run's
    directory as Snakemake runs it (artefacts may hold paths relative to it, e.g. the latent base pipeline)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "w") as err:
        result = subprocess.run(argv, cwd=workdir, stderr=err, env={**os.environ, "PYTHONPATH": str(code)})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        # the log lives in a temporary directory removed on exit: show its end here
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SystemExit(f"{' '.join(argv[:6])} ... failed ({result.returncode}); the end of {log}:\n{tail}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def former_tree(rev: str, into: Path) -> Path:
    """The repository at git revision `rev`, extracted (no checkout is touched)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def compare(config: dict, methods: list[str], a: Path, b: Path) -> list[str]:
    """Lines saying whether every method got the same chosen lambda and matrices in both output trees."""
    lines = []
    for m in methods:
        la = json.loads((a / m / "chosen.json").read_text())["lambda"]
        lb = json.loads((b / m / "chosen.json").read_text())["lambda"]
        diffs = []
        for name in QUERY_SETS:
            x, y = np.load(a / m / f"{name}.npy"), np.load(b / m / f"{name}.npy")
            diffs.append(float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(x))), 1e-30)))
        lines.append(f"| {m} | {la:g} | {lb:g} | {max(diffs):.2e} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO, help="the directory holding the run's results/")
    parser.add_argument("--configfile", nargs="*", default=[], help="the run's overlays (as snakemake --configfile)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="*", help="a subset of the kfac methods (default: all of them)")
    parser.add_argument("--former", help="git revision whose scores stage runs the per-method jobs")
    args = parser.parse_args()

    config = load_config(REPO / "params.yaml", *args.configfile)
    family = paths.shared_pass_families(config).get("kfac", [])
    methods = args.methods or family
    if not methods or set(methods) - set(family):
        raise SystemExit(f"--methods {methods}: choose among the configuration's kfac methods {family}")
    workdir = args.workdir.resolve()
    missing = [
        f
        for f in [
            paths.model_inputs_file(config),
            paths.samples_file(config),
            *paths.measurement_files(config),
            *paths.family_model_inputs(config, "kfac"),
        ]
        if not (workdir / f).exists()
    ]
    if missing:
        raise SystemExit(f"{len(missing)} artefacts of the run are missing under {workdir}, e.g. {missing[:3]}")
    data = common_args(config, workdir)
    python = [sys.executable, "-m", "workflow_scripts", "scores"]
    with tempfile.TemporaryDirectory(prefix="kfac_family_") as tmp:
        tmp = Path(tmp)
        before_code = former_tree(args.former, tmp / "former") if args.former else REPO
        times: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
        per_method: dict[str, list[float]] = {m: [] for m in methods}
        for repeat in range(args.repeats):
            cpu = wall = 0.0
            for m in methods:
                out = tmp / "before" / m
                argv = [*python, "--config", paths.scores_config(config, m), "--method", m, *data]
                argv += [*model_args(config, [m], workdir), "--out-dir", str(out)]
                c, w = run_job(argv, before_code, workdir, tmp / f"before_{m}.log")
                per_method[m].append(c)
                cpu, wall = cpu + c, wall + w
            times["before"].append((cpu, wall))
            family_config = json.loads(paths.family_scores_config(config, "kfac"))
            family_config["scores"]["methods"] = {m: config["scores"]["methods"][m] for m in methods}
            argv = [*python, "--config", json.dumps(family_config), "--method", *methods, *data]
            argv += [*model_args(config, methods, workdir), "--out-dir", *[str(tmp / "after" / m) for m in methods]]
            times["after"].append(run_job(argv, REPO, workdir, tmp / "after.log"))
            print(f"repeat {repeat + 1}: before {times['before'][-1]}, after {times['after'][-1]}", file=sys.stderr)
        median = {k: [statistics.median(t[i] for t in v) for i in (0, 1)] for k, v in times.items()}
        print(f"K-FAC family of {config['benchmark']}: {len(methods)} methods, median of {args.repeats}\n")
        print("| path | jobs | CPU s | wall s |\n|---|---|---|---|")
        print(
            f"| before: one job per method{' (' + args.former + ')' if args.former else ''} | {len(methods)} "
            f"| {median['before'][0]:.1f} | {median['before'][1]:.1f} |"
        )
        print(f"| after: one pass for the family | 1 | {median['after'][0]:.1f} | {median['after'][1]:.1f} |")
        print(
            f"| ratio before / after | | {median['before'][0] / median['after'][0]:.2f} "
            f"| {median['before'][1] / median['after'][1]:.2f} |\n"
        )
        print("| method | CPU s alone (median) |\n|---|---|")
        for m in methods:
            print(f"| {m} | {statistics.median(per_method[m]):.1f} |")
        print("\n| method | lambda before | lambda after | max abs difference / max abs score |\n|---|---|---|---|")
        print("\n".join(compare(config, methods, tmp / "before", tmp / "after")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
