"""Sanity ordering of the exact likelihood (paper metagradient-likelihood-attribution, Figure 2):
bits/dim of training images < rotated (90 deg) < averaged (mean of two) < uniform noise.

Trains the VE-SDE score model (workflow_scripts/families/vesde.py) briefly on the digits training set of params.yaml,
then measures exact bits/dim (probability-flow ODE, exact divergence, RK4) of
  train     training images
  heldout   held-out digits (not trained on; extra category, not in the paper)
  rotated   training images rotated by 90 degrees
  averaged  the pixel mean of two random training images
  noise     uniform noise on the data's 17 levels
with the same fixed dequantisation draws as the measurement. Writes a seaborn figure and a JSON with every
number. One torch thread; a few minutes on the shared 2-core machine.

    .venv/bin/python benchmarks/vesde_sanity.py [--steps 1000] [--n 12] [--n-steps 16] [--weighting sigma2|likelihood]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.core import data as core_data
from workflow_scripts.dag.config import load_config
from workflow_scripts.families import likelihood as L
from workflow_scripts.families import vesde as V
from workflow_scripts.stages import likelihood_sanity

CATEGORIES = likelihood_sanity.CATEGORIES


def query_images(dataset: dict, n: int, levels: int, seed: int) -> dict[str, np.ndarray]:
    return likelihood_sanity.sanity_categories(dataset, n, levels, np.random.default_rng(seed))


def plot(summary: dict, queries: dict[str, np.ndarray], out: Path) -> None:
    """The workflow's sanity figure (likelihood_sanity.plot: examples + bits/dim per category) with this run's title."""
    st = summary["setting"]
    if st.get("family", "vesde") == "ddpm":
        title = (
            f"DDPM -ELBO bits/dim (digits 8x8, {st['steps']} training steps, {st['elbo']['n_timesteps']} x "
            f"{st['elbo']['n_noise']} importance draws)"
        )
    else:
        title = (
            f"VE-SDE exact bits/dim (digits 8x8, {st['steps']} DSM steps, {st['weighting']} weighting, "
            f"RK4 {st['ode']['n_steps']} steps)"
        )
    likelihood_sanity.plot(summary["bpd"], queries, st["levels"], title, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="training steps (vesde: 1000; ddpm: params.yaml's train.steps)")
    parser.add_argument("--batch-size", type=int, help="(vesde: 64; ddpm: params.yaml's)")
    parser.add_argument("--lr", type=float, help="(vesde: 2e-3; ddpm: params.yaml's)")
    parser.add_argument("--n", type=int, default=12, help="images per category")
    parser.add_argument("--n-steps", type=int, default=16, help="RK4 steps of the ODE")
    parser.add_argument("--weighting", default="sigma2", choices=V.WEIGHTINGS)
    parser.add_argument(
        "--family",
        default="vesde",
        choices=("vesde", "ddpm"),
        help="ddpm: the same categories under the -ELBO (Ho eq. 5) of a DDPM trained with train.py",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vesde_sanity"))
    parser.add_argument("--replot", action="store_true", help="only redraw the figure from <out>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    config = copy.deepcopy(load_config(REPO / "params.yaml"))
    if args.replot:
        summary = json.loads(Path(f"{args.out}.json").read_text())
        levels = summary["setting"]["levels"]
        dataset = core_data.make_dataset(config["data"], config["seeds"]["split"])
        plot(summary, query_images(dataset, summary["setting"]["n_per_category"], levels, seed=0), Path(args.out))
        print(f"wrote {args.out}.png")
        return 0
    config["model"] = {**config["model"], "family": "vesde", "vesde": {"weighting": args.weighting}}
    defaults = (
        {"steps": 1000, "batch_size": 64, "lr": 2e-3}
        if args.family == "vesde"
        else {k: config["train"][k] for k in ("steps", "batch_size", "lr")}
    )
    for key, value in defaults.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    config["train"] = {**config["train"], "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
    config["compute"] = {"device": "cpu", "threads": 1}
    levels = core_data.N_LEVELS[config["data"]["dataset"]]
    dataset = core_data.make_dataset(config["data"], config["seeds"]["split"])
    train = dataset["train_images"]

    t0 = time.time()
    if args.family == "ddpm":
        import tempfile

        from workflow_scripts.families.ddpm import load_model, train_model

        config["model"] = {k: v for k, v in config["model"].items() if k not in ("family", "vesde")}
        with tempfile.TemporaryDirectory() as tmp:
            train_model(config, train, np.arange(len(train)), 0, Path(tmp) / "model.pt", device=torch.device("cpu"))
            model, _ = load_model(Path(tmp) / "model.pt", config["model"])
    else:
        model = V.train_vesde(config, train, np.arange(len(train)), 0, device=torch.device("cpu"))
    train_s = time.time() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"trained {args.family}: {n_params} params, {args.steps} steps on {len(train)} digits in {train_s:.0f} s",
        flush=True,
    )
    queries = query_images(dataset, args.n, levels, seed=0)
    lik_cfg = {"solver": "rk4", "n_steps": args.n_steps, "dequantize": True, "batch_size": 16}
    elbo_cfg = {"scheme": "importance", "n_timesteps": 250, "n_noise": 2, "decoder_draws": 1}

    terms = {}

    def bpd(images, n_steps=args.n_steps, name=None):
        if args.family == "ddpm":
            r = L.measure_elbo(model, images, config["diffusion"], elbo_cfg, levels, seed=0, stream=0)
            if name:  # mean of each -ELBO term in bits/dim
                terms[name] = {
                    k: float(np.mean(r[k])) / (np.prod(images.shape[1:]) * math.log(2)) for k in ("kl", "l0", "lt")
                }
            return r["bpd"]
        return V.measure_likelihood(model, images, config["model"], {**lik_cfg, "n_steps": n_steps}, levels, seed=0)[
            "bpd"
        ]

    results, eval_s = {}, {}
    for name in CATEGORIES:
        t1 = time.time()
        results[name] = bpd(queries[name], name=name)
        eval_s[name] = time.time() - t1
        print(
            f"{name:9s} bpd mean {results[name].mean():7.3f}  median {np.median(results[name]):7.3f}  "
            f"({eval_s[name]:.0f} s)" + (f"  terms {terms[name]}" if name in terms else ""),
            flush=True,
        )
    # estimator error on a few training images: the ODE with twice the steps / the ELBO with other draws
    if args.family == "ddpm":
        other = L.measure_elbo(model, queries["train"][:4], config["diffusion"], elbo_cfg, levels, seed=1, stream=0)[
            "bpd"
        ]
    else:
        other = bpd(queries["train"][:4], 2 * args.n_steps)
    solver_error = float(np.abs(other - results["train"][:4]).max())
    means = {k: float(v.mean()) for k, v in results.items()}
    order = ("train", "rotated", "averaged", "noise")
    holds = all(means[a] < means[b] for a, b in zip(order[:-1], order[1:]))
    print(
        f"ordering train < rotated < averaged < noise (means): {holds}; estimator error (ODE: {args.n_steps} vs "
        f"{2 * args.n_steps} steps; ELBO: other draws) {solver_error:.4f} bits/dim",
        flush=True,
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "setting": {
            "family": args.family,
            "elbo": elbo_cfg if args.family == "ddpm" else None,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weighting": args.weighting,
            "n_train": int(len(train)),
            "n_per_category": args.n,
            "ode": lik_cfg,
            "levels": levels,
            "bpd_offset": V.bpd_offset(levels),
            "model": config["model"],
            "n_params": int(n_params),
            "sigma": V.vesde_settings(config["model"])["sigma"],
            "t_min": V.vesde_settings(config["model"])["t_min"],
        },
        "bpd": {k: v.tolist() for k, v in results.items()},
        "mean": means,
        "median": {k: float(np.median(v)) for k, v in results.items()},
        "se": {k: float(v.std(ddof=1) / math.sqrt(len(v))) for k, v in results.items()},
        "elbo_terms_bpd": terms or None,
        "ordering_holds": holds,
        "solver_error_bpd": solver_error,
        "uniform_over_levels_bpd": math.log2(levels),
        "seconds": {"train": train_s, **{f"eval_{k}": v for k, v in eval_s.items()}},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average": list(__import__("os").getloadavg()),
        },
    }
    Path(f"{out}.json").write_text(json.dumps(summary, indent=2) + "\n")

    plot(summary, queries, out)
    print(f"wrote {out}.png and {out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
