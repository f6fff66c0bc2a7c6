"""LDS against the number of models of the ensemble methods (`ensemble: K`) of a finished run, and what the extra
models cost, measured from the run's Snakemake log.

    python benchmarks/ensemble_cost.py --log .snakemake/log/<run>.snakemake.log [--configfile configs/X.yaml ...]

For every TRAK-family / DAS method with an `ensemble` key, and the one-model method of the same settings when the
configuration has it (trak for trak_ens2), prints the LDS of each query set with its CI (tables/lds.csv) and the
job-seconds of the jobs the extra models add: the member trainings (rule train_member) and the gradient stores the
method reads at the members (rule gradients, checkpoint member<k>). Members are shared: trak_ens4 and d_trak_ens4
train the same three models, so their training seconds are counted for each method that needs them. The scores
job's own seconds (K kernel solves instead of one) are shown apart.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from job_times import job_durations  # noqa: E402

from workflow_scripts.dag import paths  # noqa: E402
from workflow_scripts.dag.config import load_config  # noqa: E402


def single_model_twin(methods: dict, name: str) -> str | None:
    """The configured method with the same settings as `name` but one model, if any."""
    settings = {k: v for k, v in methods[name].items() if k != "ensemble"}
    for other, cfg in methods.items():
        if cfg and other != name and cfg.get("ensemble", 1) == 1 and cfg == settings:
            return other
    return None


def extra_model_seconds(config: dict, method: str, jobs) -> tuple[float, float, int]:
    """(training seconds, gradient-store seconds, jobs) of the method's models beyond the full one."""
    members = {role: d for role, (d, _) in paths.method_stores(config, method).items() if role.startswith("member")}
    stores = {(os.path.basename(os.path.dirname(d)), os.path.basename(d)) for d in members.values()}
    train = grads = 0.0
    n = 0
    for rule, begin, end, wildcards in jobs:
        seconds = (end - begin).total_seconds()
        if rule == "train_member" and wildcards.get("member") in members:
            train, n = train + seconds, n + 1
        elif rule == "gradients" and (wildcards.get("checkpoint"), wildcards.get("tag")) in stores:
            grads, n = grads + seconds, n + 1
    return train, grads, n


def scores_seconds(method: str, jobs) -> float | None:
    found = [(e - b).total_seconds() for rule, b, e, w in jobs if rule == "scores" and w.get("method") == method]
    return found[0] if found else None


def table(config: dict, lds: pd.DataFrame, jobs) -> pd.DataFrame:
    methods = {m: cfg for m, cfg in config["scores"]["methods"].items() if cfg}
    rows = []
    for name, cfg in methods.items():
        if cfg.get("ensemble", 1) == 1:
            continue
        twin = single_model_twin(methods, name)
        for method in [twin, name] if twin else [name]:
            train, grads, n = extra_model_seconds(config, method, jobs)
            row = {"method": method, "models": methods[method].get("ensemble", 1)}
            for query_set in ("generated", "heldout"):
                hit = lds[(lds["method"] == method) & (lds["query_set"] == query_set)]
                if len(hit):
                    r = hit.iloc[0]
                    row[query_set] = f"{r['lds']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
            row |= {"extra jobs": n, "extra train s": round(train), "extra gradients s": round(grads)}
            row["scores job s"] = scores_seconds(method, jobs)
            rows.append(row)
    return pd.DataFrame(rows).drop_duplicates("method")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True, help="the run's .snakemake/log/*.snakemake.log")
    parser.add_argument("--configfile", nargs="*", default=[], help="the run's overlays, after params.yaml")
    parser.add_argument("--workdir", default=".", help="the run's directory (results/ inside it)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    config = load_config(workdir / "params.yaml", *(workdir / c for c in args.configfile))
    lds = pd.read_csv(workdir / paths.table_file(config, "lds", ".csv"))
    with open(args.log) as f:
        jobs = job_durations(f, wildcards=True)
    out = table(config, lds, jobs)
    if out.empty:
        raise SystemExit("no method of this configuration has an `ensemble` key")
    cells = [[("-" if pd.isna(v) else str(v)) for v in row] for row in out.itertuples(index=False)]
    print("| " + " | ".join(out.columns) + " |\n|" + "---|" * len(out.columns))
    print("\n".join("| " + " | ".join(row) + " |" for row in cells))


if __name__ == "__main__":
    main()
