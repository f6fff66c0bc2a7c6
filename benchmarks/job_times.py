"""Per-rule job durations from a Snakemake log (`.snakemake/log/*.snakemake.log`).

    python benchmarks/job_times.py .snakemake/log/<run>.snakemake.log [--cores 2]

Prints, per rule, the number of jobs, median and total job seconds, and the run's wall time
(first job start to last job end). Total job seconds / cores is the wall time a run would take
with perfect packing of jobs onto the cores.
"""

from __future__ import annotations

import argparse
import re
import statistics
from datetime import datetime

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
START = re.compile(r"^(?:local)?rule (\w+):$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")
FINISH = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


def job_durations(lines, wildcards: bool = False):
    """[(rule, start, end)] of every finished job; with wildcards, [(rule, start, end, {wildcard: value})]."""
    stamp, pending_rule, pending_job, started, durations = None, None, None, {}, []
    for line in lines:
        if m := STAMP.match(line.strip()):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        elif m := START.match(line.strip()):
            pending_rule, pending_job = m.group(1), None
        elif (m := JOBID.match(line)) and pending_rule:
            pending_job = m.group(1)
            started[pending_job] = (pending_rule, stamp, {})
            pending_rule = None
        elif (m := WILDCARDS.match(line)) and pending_job:
            started[pending_job][2].update(item.split("=", 1) for item in m.group(1).split(", ") if "=" in item)
        elif m := FINISH.match(line.strip()):
            rule, begin, values = started.pop(m.group(1), (m.group(2), None, {}))
            if begin is not None:
                durations.append((rule, begin, stamp, values) if wildcards else (rule, begin, stamp))
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    with open(args.log) as f:
        durations = job_durations(f)
    if not durations:
        raise SystemExit(f"{args.log}: no finished jobs found")
    by_rule: dict[str, list[float]] = {}
    for rule, begin, end in durations:
        by_rule.setdefault(rule, []).append((end - begin).total_seconds())
    print("| rule | jobs | median s | total s |\n|---|---|---|---|")
    for rule, secs in by_rule.items():
        print(f"| {rule} | {len(secs)} | {statistics.median(secs):.0f} | {sum(secs):.0f} |")
    total = sum(sum(s) for s in by_rule.values())
    wall = (max(e for _, _, e in durations) - min(b for _, b, _ in durations)).total_seconds()
    print(
        f"\nwall {wall / 60:.1f} min; job seconds {total:.0f} -> {total / args.cores / 60:.1f} min on {args.cores} cores if perfectly packed"
    )


if __name__ == "__main__":
    main()
