"""Command line entry: `python -m workflow_scripts <stage> --config CONFIG [stage options]`.

CONFIG is a JSON object (what the Snakemake rules pass: only the sections the stage reads, so that
Snakemake reruns a stage exactly when its own parameters change) or a path to a YAML file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import yaml

from workflow_scripts.core.common import setup_logging

STAGES = (
    "data",
    "train",
    "classifier",
    "sample",
    "measure",
    "gradients",
    "curvature",
    "scores",
    "evaluate",
    "counterfactual",
    "regenerate",
    "counterfactual_evaluate",
    "figures",
    "metagradient",
    "fixed_seed",
    "metagradient_evaluate",
    "likelihood_sanity",
    "base_pipeline",
    "encode",
    "queries",
)


def parse_config(text: str) -> dict:
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    return yaml.safe_load(Path(text).read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts", description=__doc__)
    parser.add_argument("stage", choices=STAGES)
    if not argv or argv[0] not in STAGES:
        parser.parse_args(argv[:1])  # prints usage and the list of stages, then exits
    # Import only the chosen stage: job start-up stays fast and independent of the other stages.
    module = importlib.import_module(f"workflow_scripts.stages.{argv[0]}")
    stage_parser = argparse.ArgumentParser(
        prog=f"python -m workflow_scripts {argv[0]}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stage_parser.add_argument("--config", required=True, help="JSON object or path to a YAML config")
    stage_parser.add_argument("--log", help="also write the log to this file")
    module.add_arguments(stage_parser)
    args = stage_parser.parse_args(argv[1:])
    setup_logging(args.log)
    module.run(args, parse_config(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
