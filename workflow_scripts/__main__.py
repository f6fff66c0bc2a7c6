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

STAGES = ("data", "train", "sample", "measure", "gradients", "scores", "evaluate")


def parse_config(text: str) -> dict:
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    return yaml.safe_load(Path(text).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)
    modules = {}
    for stage in STAGES:
        module = importlib.import_module(f"workflow_scripts.{stage}")
        modules[stage] = module
        stage_parser = sub.add_parser(stage, help=(module.__doc__ or "").splitlines()[0])
        stage_parser.add_argument("--config", required=True, help="JSON object or path to a YAML config")
        stage_parser.add_argument("--log", help="also write the log to this file")
        module.add_arguments(stage_parser)
    args = parser.parse_args(argv)
    from .common import setup_logging

    setup_logging(args.log)
    modules[args.stage].run(args, parse_config(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
