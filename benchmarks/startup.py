"""Job start-up per stage: what `python -m workflow_scripts <stage> ...` spends before the stage does its work.

    python benchmarks/startup.py [--runs 5] [--stages train,sample] [--compare REF] [--out FILE]

Every measurement is a fresh interpreter (a job is one), started in the checkout being measured:
  import  the import of `workflow_scripts.__main__` and of the stage's module (what the job imports before
          it parses its arguments),
  load    for the stages that load a model: the default params.yaml model, saved once per checkout as a
          checkpoint of this workflow's format, loaded with load_family_model; for train, what a training does
          before its first step: the initial model (ddpm.initial_model) moved to the device, and its AdamW
          optimizer. What these load lazily counts here (torch loads torch._dynamo for the optimizer's first
          parameter group, diffusers' ModelMixin.to() imports it too),
  wall    the whole subprocess, interpreter start to exit (the import, the load and Python's own start-up).
Median of --runs runs. The child also records how many modules the import loaded and which of the heavy
packages (torch, torch._dynamo, diffusers.models.transformers with its __init__ run, transformers, peft, scipy,
sklearn, pandas, matplotlib) are in sys.modules after it.

--compare REF checks REF (a git ref) out into a temporary `git worktree` and measures it with the same
interpreter in the same run, the runs interleaved (stage by stage, the two checkouts alternating), so a
before/after comparison is one command and both sides see the same machine load. The worktree is removed
at the end. Results: a Markdown table on stdout and every run in --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = (
    "torch",
    "torch._dynamo",
    "diffusers.models.transformers",
    "transformers",
    "peft",
    "scipy",
    "sklearn",
    "pandas",
    "matplotlib",
)
# Stages whose job loads a model of the configured family (train builds its initial model instead).
LOADS_MODEL = ("sample", "measure", "gradients", "curvature", "regenerate", "likelihood_sanity")
BUILDS_MODEL = ("train",)

# Run with the checkout as the working directory: `-c` puts it first on sys.path, so the checkout's own
# workflow_scripts is imported (checked below against the expected root).
CHILD = r"""
import importlib, json, sys, time
stage, mode, root, checkpoint = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
t0 = time.perf_counter()
importlib.import_module("workflow_scripts.__main__")
importlib.import_module(f"workflow_scripts.stages.{stage}")
t1 = time.perf_counter()
heavy = {name: name in sys.modules for name in HEAVY}
# a lazy diffusers.models.transformers (families/diffusers_unet.py) is in sys.modules with its __init__ not run
package = sys.modules.get("diffusers.models.transformers")
heavy["diffusers.models.transformers"] = package is not None and "Transformer2DModel" in vars(package)
n_modules = len(sys.modules)
import workflow_scripts
if not workflow_scripts.__file__.startswith(root):
    raise SystemExit(f"imported {workflow_scripts.__file__}, not the checkout {root}")
load = None
if mode != "none":
    import yaml
    config = yaml.safe_load(open("params.yaml"))
    t2 = time.perf_counter()
    if mode == "build":
        import torch
        from workflow_scripts.families import ddpm
        model = ddpm.initial_model(config, (1, 8, 8), int(config["seeds"]["train"])).to("cpu")
        torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        from workflow_scripts.families.registry import load_family_model
        load_family_model(checkpoint, config["model"])
    load = time.perf_counter() - t2
print(json.dumps({"import": t1 - t0, "load": load, "n_modules": n_modules, "heavy": heavy}))
""".replace("HEAVY", repr(HEAVY))

# Writes the default model's checkpoint once per checkout (not timed).
MAKE_CHECKPOINT = r"""
import sys, yaml
from workflow_scripts.core.common import save_torch
from workflow_scripts.families import ddpm
config = yaml.safe_load(open("params.yaml"))
model = ddpm.build_model(config["model"], (1, 8, 8))
save_torch(ddpm.save_checkpoint_payload(model, {"model": config["model"]}, 0, (1, 8, 8)), sys.argv[1])
"""


def all_stages(root: Path) -> list[str]:
    """The STAGES tuple of the checkout's __main__ (read as text: the parent imports nothing of a checkout)."""
    import ast

    tree = ast.parse((root / "workflow_scripts" / "__main__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "STAGES":
            return list(ast.literal_eval(node.value))
    raise SystemExit(f"{root}/workflow_scripts/__main__.py: no STAGES tuple found")


def stage_mode(stage: str) -> str:
    return "load" if stage in LOADS_MODEL else "build" if stage in BUILDS_MODEL else "none"


def run_child(root: Path, stage: str, checkpoint: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, stage, stage_mode(stage), str(root), str(checkpoint)],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} in {root}: the measurement failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def make_checkpoint(root: Path, out: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", MAKE_CHECKPOINT, str(out)], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{root}: could not write the default model's checkpoint:\n{proc.stderr[-3000:]}")


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value) -> str:
    return "" if value is None else f"{value:.2f}"


def summarise(runs: list[dict]) -> dict:
    last = runs[-1]
    return {
        "import": median(r["import"] for r in runs),
        "load": median(r["load"] for r in runs),
        "wall": median(r["wall"] for r in runs),
        "n_modules": last["n_modules"],
        "heavy": [name for name, loaded in last["heavy"].items() if loaded],
    }


def table(stages, summaries: dict, labels: list[str]) -> str:
    if len(labels) == 1:
        (label,) = labels
        lines = [
            "| stage | import s | load s | wall s | modules | heavy packages loaded by the import |",
            "|---|---|---|---|---|---|",
        ]
        for stage in stages:
            s = summaries[label][stage]
            lines.append(
                f"| {stage} | {fmt(s['import'])} | {fmt(s['load'])} | {fmt(s['wall'])} | {s['n_modules']} "
                f"| {', '.join(s['heavy'])} |"
            )
        return "\n".join(lines)
    ref, cur = labels
    lines = [
        f"| stage | import s ({ref} -> {cur}) | load s | wall s | wall ratio | modules "
        f"| heavy packages only in {ref} | heavy packages only in {cur} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage in stages:
        a, b = summaries[ref][stage], summaries[cur][stage]
        ratio = f"{a['wall'] / b['wall']:.2f}x" if b["wall"] else ""
        lines.append(
            f"| {stage} | {fmt(a['import'])} -> {fmt(b['import'])} | {fmt(a['load'])} -> {fmt(b['load'])} "
            f"| {fmt(a['wall'])} -> {fmt(b['wall'])} | {ratio} | {a['n_modules']} -> {b['n_modules']} "
            f"| {', '.join(sorted(set(a['heavy']) - set(b['heavy'])))} "
            f"| {', '.join(sorted(set(b['heavy']) - set(a['heavy'])))} |"
        )
    return "\n".join(lines)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def stop(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")  # so that the temporary worktree is removed


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, stop)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="fresh interpreters per stage and checkout (median)")
    parser.add_argument("--stages", help="comma-separated stages (default: every stage of this checkout)")
    parser.add_argument("--compare", metavar="REF", help="also measure this git ref (a temporary worktree)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup.json"))
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    stages = args.stages.split(",") if args.stages else all_stages(ROOT)
    unknown = sorted(set(stages) - set(all_stages(ROOT)))
    if unknown:
        parser.error(f"--stages: unknown stages {unknown}; known: {all_stages(ROOT)}")

    head = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    current = f"{head}{'+changes' if dirty else ''}"
    checkouts = {current: ROOT}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        worktree = None
        if args.compare:
            ref = git("rev-parse", "--short", args.compare)
            worktree = Path(tmp) / "compare"
            git("worktree", "add", "--detach", str(worktree), args.compare)
            checkouts = {f"{args.compare} ({ref})": worktree, current: ROOT}
            missing = sorted(set(stages) - set(all_stages(worktree)))
            if missing:
                git("worktree", "remove", "--force", str(worktree))
                parser.error(f"--compare {args.compare}: it has no stages {missing}; pick them with --stages")
        try:
            checkpoints = {}
            for label, root in checkouts.items():
                checkpoints[label] = Path(tmp) / f"model-{len(checkpoints)}.pt"
                make_checkpoint(root, checkpoints[label])
            load_before = os.getloadavg()
            runs = {label: {stage: [] for stage in stages} for label in checkouts}
            for i in range(args.runs):
                for stage in stages:
                    for label, root in checkouts.items():
                        runs[label][stage].append(run_child(root, stage, checkpoints[label]))
                        print(
                            f"run {i + 1}: {stage} in {label}: {runs[label][stage][-1]['wall']:.1f} s", file=sys.stderr
                        )
                print(f"run {i + 1}/{args.runs} done (load average {os.getloadavg()[0]:.1f})", file=sys.stderr)
            load_after = os.getloadavg()
        finally:
            if worktree is not None:
                git("worktree", "remove", "--force", str(worktree))

    labels = list(checkouts)
    summaries = {label: {stage: summarise(runs[label][stage]) for stage in stages} for label in labels}
    header = (
        f"Job start-up, median of {args.runs} fresh interpreters per stage"
        f"{' (interleaved)' if len(labels) > 1 else ''}; {platform.node()}, {os.cpu_count()} CPUs, "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; nice {os.nice(0)}"
    )
    print(header + "\n")
    print(table(stages, summaries, labels))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "header": header,
                "checkouts": {label: str(root) for label, root in checkouts.items()},
                "runs": runs,
                "summary": summaries,
                "python": sys.version,
                "load_average": {"before": load_before, "after": load_after},
            },
            indent=1,
        )
    )
    print(f"\nevery run: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
