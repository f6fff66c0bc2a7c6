#!/usr/bin/env python
"""Per-example gradient-feature throughput: this project vs the TRAK reference package (traker 0.3.2).

Features: phi(z) = P^T mean_k grad_theta loss(z, t_k, eps_k), K timesteps on the uniform grid with
eps seeded per t (workflow_scripts.stages.gradients), random projection P to d dimensions. Same model
(params.yaml model config; the trained full checkpoint when it exists), same images (sklearn
digits), same (t, eps) draws, same d, same batch size, on CPU, in one process, interleaved.

Pipelines, each timed end to end (projector set-up included) on n = n_train + n_query examples:
- ours:          workflow_scripts.stages.gradients.compute_features with gradients.projection = gaussian
                 (one vmap(grad) over the K-expanded batch; the dense Gaussian matrix generated once
                 and held in memory).
- ours_sjlt<s>:  the same with gradients.projection = sjlt, gradients.sjlt_nonzeros = s (the sparse
                 JL sketch of workflow_scripts/core/projection.py: s nonzeros per gradient coordinate,
                 applied as one CSR product; s = 1 is CountSketch).
- traker:        traker's own components as TRAKer wires them on CPU, in the pattern of the D-TRAK
                 reference code (the published use of traker for diffusion models): for each t_k a
                 FunctionalGradientComputer.compute_per_sample_grad (vmap(grad) of a get_output
                 task), gradients summed over k, vectorize(), / K, then BasicProjector.project with
                 TRAKer's CPU choice (normal, block_size 100: the matrix is regenerated block by
                 block on every project() call) and / sqrt(n_params) like TRAKer.featurize.
- traker_cached: the same with BasicProjector(block_size=d): one block, generated once and kept
                 (the fastest CPU configuration traker offers; not TRAKer's default).
Component timings (set-up, per-sample gradients, projection) come from instrumented runs of the
same functions; steady state = n / (gradients + projection), i.e. without the one-time set-up.

Scores: inner products phi_q . phi_i and TRAK scores phi_q^T (Phi^T Phi + lambda I)^-1 phi_i with
lambda relative to the mean squared feature norm (so it means the same for every feature scale and
d), computed as Q Phi^T (Phi Phi^T + lambda I)^-1 (the push-through identity: equal to KernelSolver
of scorers/trak.py, checked on the `ours` features), from every feature set and from the UNPROJECTED
exact gradients, compared by per-query Pearson correlation. A single projection seed is one draw of a
random sketch, so the seed study repeats the comparison over --agreement-seeds projection seeds: the
exact gradients projected by our Gaussian projector, by traker's BasicProjector (normal) and by the
sjlt sketch for every s (mean and spread over seeds of the per-query mean Pearson).

    .venv/bin/python benchmarks/gradient_throughput.py --threads 1       # timings + scores, ~10 min
    .venv/bin/python benchmarks/gradient_throughput.py --quick           # smoke run, ~1 min
    .venv/bin/python benchmarks/gradient_throughput.py --agreement-only --n-train 1024 --n-query 32 \
        --agreement-seeds 3 --out benchmarks/results/gradient_agreement_n1056.json   # scores at larger N
    .venv/bin/python benchmarks/gradient_throughput.py --profile-only    # torch.profiler of the sjlt pipeline
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # compute_features' progress bar would pollute the timings' output

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trak.gradient_computers import FunctionalGradientComputer  # noqa: E402
from trak.modelout_functions import AbstractModelOutput  # noqa: E402
from trak.projectors import BasicProjector, ProjectionType  # noqa: E402
from trak.utils import vectorize  # noqa: E402

from workflow_scripts.core.data import load_digits_images
from workflow_scripts.core.projection import Projector, SparseProjector
from workflow_scripts.families.ddpm import add_noise, alphas_cumprod, build_model, load_model
from workflow_scripts.scorers.trak import KernelSolver  # noqa: E402
from workflow_scripts.stages import gradients as G

FN = "loss"  # TRAK's output function; D-TRAK's only changes the scalar inside the gradient


# ----------------------------------------------------------------------------------------- traker
class DDPMLoss(AbstractModelOutput):
    """D-TRAK's compute_f for f = simple loss, in traker's get_output(model, weights, buffers, *batch)
    form: one (x, t, eps) example, vmapped by FunctionalGradientComputer."""

    def __init__(self, a_bar: torch.Tensor):
        self.a_bar = a_bar

    def get_output(self, model, weights, buffers, x, t, eps):
        x, t, eps = x.unsqueeze(0), t.unsqueeze(0), eps.unsqueeze(0)
        prediction = torch.func.functional_call(model, (weights, buffers), (add_noise(x, t, eps, self.a_bar), t)).sample
        return (eps - prediction).pow(2).mean()

    def get_out_to_loss_grad(self, model, weights, buffers, batch):  # not needed for features
        raise NotImplementedError


def traker_features(model, images, t, eps, a_bar, proj_dim, seed, batch_size, block_size, timing=None):
    """(n, proj_dim) features from traker's gradient computer and BasicProjector (see module doc)."""
    n_params = sum(p.numel() for p in model.parameters())
    clock = time.perf_counter()
    computer = FunctionalGradientComputer(model, DDPMLoss(a_bar), n_params, torch.float32, "cpu")
    projector = BasicProjector(
        n_params, proj_dim, seed, ProjectionType.normal, "cpu", block_size=block_size, dtype=torch.float32
    )
    normalize = math.sqrt(n_params)  # TRAKer.featurize's normalize_factor
    spent = {"setup": time.perf_counter() - clock, "grads": 0.0, "project": 0.0}
    out = np.zeros((len(images), proj_dim), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size])
        b = len(x)
        clock = time.perf_counter()
        emb = None
        for k in range(len(t)):
            grads = computer.compute_per_sample_grad((x, t[k].repeat(b), eps[k].expand(b, *eps.shape[1:])))
            flat = vectorize(grads, device="cpu")
            emb = flat if emb is None else emb.add_(flat)
        emb /= len(t)
        spent["grads"] += time.perf_counter() - clock
        clock = time.perf_counter()
        out[start : start + b] = (projector.project(emb, model_id=0) / normalize).numpy()
        spent["project"] += time.perf_counter() - clock
    if timing is not None:
        timing.update(spent)
    return out


# ------------------------------------------------------------------------------------------- ours
def variant_cfg(grad_cfg: dict, name: str) -> dict:
    """gradients config of one of our pipelines: 'ours' (gaussian) or 'ours_sjlt<s>'."""
    if name == "ours":
        return {**grad_cfg, "projection": "gaussian"}
    if name.startswith("ours_sjlt"):
        return {**grad_cfg, "projection": "sjlt", "sjlt_nonzeros": int(name[len("ours_sjlt") :])}
    raise ValueError(name)


def ours_features(model, images, grad_cfg, config):
    return G.compute_features(model, images, FN, grad_cfg, config["diffusion"], config["seeds"], torch.device("cpu"))


def ours_components(model, images, grad_cfg, config, t, eps, a_bar) -> dict:
    """compute_features taken apart: projector set-up, per-sample gradients, projection."""
    clock = time.perf_counter()
    project = G.make_projector(model, grad_cfg, config["seeds"], torch.device("cpu"))
    spent = {"setup": time.perf_counter() - clock, "grads": 0.0, "project": 0.0}
    for start in range(0, len(images), grad_cfg["batch_size"]):
        x = torch.from_numpy(images[start : start + grad_cfg["batch_size"]])
        clock = time.perf_counter()
        g = G.per_example_gradients(model, x, FN, t, eps, a_bar)
        spent["grads"] += time.perf_counter() - clock
        clock = time.perf_counter()
        project(g)
        spent["project"] += time.perf_counter() - clock
    del project
    return spent


# ----------------------------------------------------------------------------------------- scores
def per_query_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def gram(a, b, block: int = 1 << 15) -> np.ndarray:
    """a @ b.T in float64, accumulated over column blocks (a, b float32 arrays or tensors, maybe wide)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for start in range(0, a.shape[1], block):
        out += a[:, start : start + block].double() @ b[:, start : start + block].double().T
    return out.numpy()


def all_scores(train, query, lambdas) -> dict[str, np.ndarray]:
    """Inner products and TRAK scores Q Phi^T (Phi Phi^T + lambda I)^-1, lambda = rel * mean ||phi_i||^2."""
    qt, kernel = gram(query, train), gram(train, train)
    mean_sq_norm = float(np.trace(kernel)) / len(kernel)
    scores = {"inner_product": qt}
    for rel in lambdas:
        system = kernel + rel * mean_sq_norm * np.eye(len(kernel))
        scores[f"trak_lambda{rel:g}"] = np.linalg.solve(system, qt.T).T  # the system is symmetric
    return scores


def kernel_solver_check(train, query, rel: float) -> float:
    """Max relative difference between all_scores and scorers/trak.py's KernelSolver (same lambda)."""
    ours = all_scores(train, query, [rel])[f"trak_lambda{rel:g}"]
    train64 = np.asarray(train, np.float64)
    reference = KernelSolver(train64).scores(query, rel * train64.shape[1] / train64.shape[0])
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def summary_of(r: np.ndarray) -> dict:
    return {"median": float(np.median(r)), "mean": float(r.mean()), "min": float(r.min())}


def score_agreement(features: dict[str, tuple[np.ndarray, np.ndarray]], lambdas) -> dict:
    """Per-query Pearson between every pair of feature sets, for inner products and TRAK scores."""
    scores = {name: all_scores(train, query, lambdas) for name, (train, query) in features.items()}
    names, result = list(features), {}
    for kind in scores[names[0]]:
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                result[f"{kind}: {a} vs {b}"] = summary_of(per_query_pearson(scores[a][kind], scores[b][kind]))
    return result


def seed_study(exact: torch.Tensor, n_train: int, variants: list[str], seeds: list[int], dim: int, lambdas) -> dict:
    """Per-query Pearson vs the exact scores of the exact gradients projected with every variant and seed.

    Returns {variant: {kind: {"per_seed": [mean over queries], "mean", "sd", "per_seed_min"}}}, kind
    also "norm_distortion": |(|R^T g|^2 / |g|^2) - 1| over all examples (per seed: mean, max)."""
    n_params = exact.shape[1]
    reference = all_scores(exact[:n_train], exact[n_train:], lambdas)
    sq_norms = exact.double().pow(2).sum(1).numpy()
    out = {}
    for variant in variants:
        per_kind: dict[str, list] = {}
        distortion: list = []
        for seed in seeds:
            clock = time.perf_counter()
            if variant == "ours":
                features = Projector(n_params, dim, "gaussian", seed, 1 << 30)(exact)
            elif variant == "traker":
                projector = BasicProjector(
                    n_params, dim, seed, ProjectionType.normal, "cpu", block_size=dim, dtype=torch.float32
                )
                # / sqrt(d), the JL scale of our projectors (TRAKer.featurize divides by sqrt(n_params)
                # instead): Pearson and the relative lambda are scale-free, the norm distortion is not
                features = projector.project(exact, model_id=0) / math.sqrt(dim)
                del projector
            else:
                features = SparseProjector(n_params, dim, seed, int(variant[len("ours_sjlt") :]), 1 << 30)(exact)
            features = features.numpy()
            gc.collect()
            d = np.abs((features.astype(np.float64) ** 2).sum(1) / sq_norms - 1)
            distortion.append((float(d.mean()), float(d.max())))
            scores = all_scores(features[:n_train], features[n_train:], lambdas)
            for kind, s in scores.items():
                r = per_query_pearson(reference[kind], s)
                per_kind.setdefault(kind, []).append((float(r.mean()), float(r.min())))
            print(
                f"  seed study: {variant} seed {seed}: "
                + ", ".join(f"{k} {v[-1][0]:.4f}" for k, v in per_kind.items())
                + f" ({time.perf_counter() - clock:.1f} s)",
                flush=True,
            )
        out[variant] = {
            kind: {
                "per_seed": [m for m, _ in v],
                "per_seed_min": [m for _, m in v],
                "mean": statistics.mean(m for m, _ in v),
                "sd": statistics.stdev([m for m, _ in v]) if len(v) > 1 else 0.0,
            }
            for kind, v in per_kind.items()
        }
        out[variant]["norm_distortion"] = {
            "per_seed_mean": [m for m, _ in distortion],
            "per_seed_max": [m for _, m in distortion],
            "mean": statistics.mean(m for m, _ in distortion),
            "max": max(m for _, m in distortion),
        }
    return out


# ------------------------------------------------------------------------------------------- main
def load_benchmark_model(config: dict, checkpoint: str | None):
    if checkpoint and Path(checkpoint).exists():
        model, _ = load_model(checkpoint, config["model"], "cpu")
        return model.eval(), checkpoint
    torch.manual_seed(0)
    return build_model(config["model"], (1, 8, 8)).eval(), "random init (torch.manual_seed(0))"


def timed(fn):
    gc.collect()
    clock = time.perf_counter()
    value = fn()
    return time.perf_counter() - clock, value


def coordinate_spread(exact: torch.Tensor) -> dict:
    """How evenly each gradient's energy is spread over coordinates: the largest coordinate's share
    x_max^2 / |x|^2 and the effective number of coordinates |x|_2^4 / |x|_4^4. CountSketch (s = 1)
    has Gaussian-like tails for spread vectors; a vector with a few dominant coordinates needs larger s."""
    energy = exact.double().pow(2)
    total = energy.sum(1)
    share = (energy.max(1).values / total).numpy()
    effective = (total.pow(2) / energy.pow(2).sum(1)).numpy()
    return {
        "max_coordinate_energy_share": {"median": float(np.median(share)), "max": float(share.max())},
        "effective_coordinates": {"median": float(np.median(effective)), "min": float(effective.min())},
        "n_params": exact.shape[1],
    }


def exact_gradients(model, images, t, eps, a_bar, batch_size) -> torch.Tensor:
    return torch.cat(
        [
            G.per_example_gradients(model, torch.from_numpy(images[s : s + batch_size]), FN, t, eps, a_bar)
            for s in range(0, len(images), batch_size)
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "params.yaml"))
    parser.add_argument(
        "--checkpoint", default=None, help="default: results/<benchmark>/models/full/model.pt if present"
    )
    parser.add_argument("--n-train", type=int, default=112)
    parser.add_argument("--n-query", type=int, default=16)
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--projection-dim", type=int, default=2048)
    parser.add_argument("--sjlt-nonzeros", type=int, nargs="+", default=[1, 2, 4, 8], help="s of the ours_sjlt<s> rows")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    parser.add_argument("--agreement-seeds", type=int, default=5, help="projection seeds of the seed study (0: none)")
    parser.add_argument("--agreement-only", action="store_true", help="no timings: exact gradients + seed study only")
    parser.add_argument("--no-traker-default", action="store_true", help="skip the slow default-BasicProjector run")
    parser.add_argument("--profile", action="store_true", help="also torch.profiler of the sjlt pipeline (--profile-s)")
    parser.add_argument("--profile-only", action="store_true", help="only the profile")
    parser.add_argument("--profile-s", type=int, default=None, help="s of the profiled sjlt run (default: params.yaml)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 examples, d=256, 1 repeat, 1 thread")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gradient_throughput.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_query, args.projection_dim, args.repeats, args.threads = 24, 8, 256, 1, [1]
        args.agreement_seeds = min(args.agreement_seeds, 2)

    config = yaml.safe_load(Path(args.config).read_text())
    checkpoint = args.checkpoint or str(REPO / "results" / config["benchmark"] / "models" / "full" / "model.pt")
    model, model_source = load_benchmark_model(config, checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    images = load_digits_images()[0][: args.n_train + args.n_query]
    n = len(images)
    grad_cfg = {
        **config["gradients"],
        "timesteps": args.timesteps,
        "projection_dim": args.projection_dim,
        "batch_size": args.batch_size,
    }
    t, eps = G.feature_draws(
        config["diffusion"]["num_train_timesteps"], args.timesteps, images.shape[1:], config["seeds"]["gradients"]
    )
    a_bar = alphas_cumprod(config["diffusion"])
    seed = config["seeds"]["projection"]
    ours_names = ["ours", *[f"ours_sjlt{s}" for s in args.sjlt_nonzeros]]
    print(
        f"model: {n_params:,} parameters ({model_source}); {n} examples, K={args.timesteps}, d={args.projection_dim}, "
        f"batch {args.batch_size}; dense projection matrix {n_params * args.projection_dim * 4 / 2**30:.2f} GiB; "
        f"load average {os.getloadavg()}",
        flush=True,
    )
    settings = {
        "n_examples": n,
        "n_train": args.n_train,
        "n_query": args.n_query,
        "timesteps": args.timesteps,
        "projection_dim": args.projection_dim,
        "sjlt_nonzeros": args.sjlt_nonzeros,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": args.threads,
        "output_function": FN,
        "model_parameters": n_params,
        "model": model_source,
        "lambdas_relative_to_mean_sq_norm": args.lambdas,
        "agreement_seeds": [seed + i for i in range(args.agreement_seeds)],
    }
    environment = {
        "torch": torch.__version__,
        "traker": __import__("trak").__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    if args.profile_only:
        torch.set_num_threads(args.threads[0])
        result = {
            "settings": settings,
            "environment": environment,
            "profile": profile(model, images, grad_cfg, config, args.profile_s),
        }
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {out}")
        return 0

    load_before = os.getloadavg()
    runs: dict = {}
    features: dict = {}
    if not args.agreement_only:
        runs, features = time_pipelines(args, model, images, grad_cfg, config, t, eps, a_bar, seed, ours_names)
    load_after_timing = os.getloadavg()

    # exact (unprojected) gradients: ground truth for the scores
    torch.set_num_threads(args.threads[0])
    exact = exact_gradients(model, images, t, eps, a_bar, args.batch_size)
    spread = coordinate_spread(exact)
    agreement, check = {}, None
    if features:
        split = {
            name: (f[: args.n_train], f[args.n_train :]) for name, f in {"exact": exact.numpy(), **features}.items()
        }
        agreement = score_agreement(split, args.lambdas)
        check = kernel_solver_check(*split["ours"], args.lambdas[0])
    study = {}
    if args.agreement_seeds:
        study = seed_study(
            exact, args.n_train, [*ours_names, "traker"], settings["agreement_seeds"], args.projection_dim, args.lambdas
        )
    del exact
    environment.update(
        loadavg_before=load_before, loadavg_after_timing=load_after_timing, loadavg_after=os.getloadavg()
    )

    result = {
        "settings": settings,
        "environment": environment,
        "summary": summarise(runs, n, ours_names),
        "runs": {str(k): v for k, v in runs.items()},
        "score_agreement_pearson": agreement,
        "seed_study_pearson_vs_exact": study,
        "kernel_identity_vs_kernelsolver_max_rel_diff": check,
        "gradient_coordinate_spread": spread,
    }
    if args.profile:
        result["profile"] = profile(model, images, grad_cfg, config, args.profile_s)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(markdown(result))
    print(f"\nwrote {out}")
    return 0


def time_pipelines(args, model, images, grad_cfg, config, t, eps, a_bar, seed, ours_names):
    n = len(images)

    def run_traker(block_size):
        def fn():
            timing = {}
            return traker_features(
                model,
                images,
                t,
                eps,
                a_bar,
                args.projection_dim,
                seed,
                args.batch_size,
                block_size=block_size,
                timing=timing,
            ), timing

        return fn

    pipelines = {
        name: (lambda cfg=variant_cfg(grad_cfg, name): (ours_features(model, images, cfg, config), None))  # noqa: B008 (bound per name)
        for name in ours_names
    }
    pipelines["traker_cached"] = run_traker(args.projection_dim)
    if not args.no_traker_default:
        pipelines["traker"] = run_traker(100)  # TRAKer's BasicProjector on CPU: default block_size 100
    features, runs = {}, {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs[threads] = {name: [] for name in [*pipelines, *[f"{p}_components" for p in pipelines]]}
        warm = images[:4]  # untimed warm-up: first vmap / allocator / thread-pool start-up costs
        for name in ours_names:
            ours_features(model, warm, {**variant_cfg(grad_cfg, name), "projection_dim": 16}, config)
        traker_features(model, warm, t, eps, a_bar, 16, seed, args.batch_size, block_size=16)
        for rep in range(args.repeats):
            names = list(pipelines)
            names = names[rep % len(names) :] + names[: rep % len(names)]  # rotate the order every repeat
            for name in names:  # interleaved, so a load change on the shared machine hits all
                seconds, (value, components) = timed(pipelines[name])
                runs[threads][name].append(seconds)
                if components is not None:
                    runs[threads][f"{name}_components"].append(components)
                features.setdefault(name, value)
                del value
                print(
                    f"  threads={threads} repeat={rep} {name}: {seconds:.2f} s ({n / seconds:.1f} examples/s)"
                    + (f" [{fmt(components)}]" if components else ""),
                    flush=True,
                )
            gc.collect()
            for name in ours_names:
                comp = ours_components(model, images, variant_cfg(grad_cfg, name), config, t, eps, a_bar)
                runs[threads][f"{name}_components"].append(comp)
                print(f"  threads={threads} repeat={rep} {name} components: {fmt(comp)}", flush=True)
                gc.collect()
    return runs, features


REFERENCES = ("traker", "traker_cached")


def fmt(parts: dict) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())


def summarise(runs: dict, n: int, ours_names: list[str]) -> dict:
    summary = {}
    for threads, by_name in runs.items():
        s = {}
        for name in [*ours_names, *REFERENCES]:
            if by_name.get(f"{name}_components"):
                s[f"{name}_components"] = comp = {
                    k: statistics.median(r[k] for r in by_name[f"{name}_components"])
                    for k in by_name[f"{name}_components"][0]
                }
            if by_name.get(name):
                med = statistics.median(by_name[name])
                s[name] = {
                    "median_seconds": med,
                    "examples_per_second": n / med,
                    "seconds": by_name[name],
                    # per-example cost once the one-time set-up (matrix generation) is paid
                    "steady_state_examples_per_second": n / (comp["grads"] + comp["project"]),
                }
        for ours in ours_names:
            for ref in REFERENCES:
                if ref in s and ours in s:
                    per_repeat = [b / a for a, b in zip(by_name[ours], by_name[ref])]
                    s[f"ratio_{ours}_vs_{ref}"] = {
                        "of_medians": s[ref]["median_seconds"] / s[ours]["median_seconds"],
                        "median_of_paired_repeats": statistics.median(per_repeat),
                        "steady_state": s[ours]["steady_state_examples_per_second"]
                        / s[ref]["steady_state_examples_per_second"],
                    }
        summary[str(threads)] = s
    return summary


def markdown(result: dict) -> str:
    st = result["settings"]
    env = result["environment"]
    timing = f"median of {st['repeats']} runs; " if result["summary"] else "no timings (--agreement-only); "
    lines = [
        f"Gradient features, {st['n_examples']} examples ({st['n_train']} train + {st['n_query']} queries), "
        f"K={st['timesteps']}, d={st['projection_dim']}, batch {st['batch_size']}, {st['model_parameters']:,} parameters, "
        + timing
        + "load average (1, 5, 15 min) "
        + " -> ".join(
            str(tuple(round(x, 2) for x in env[k])) for k in ("loadavg_before", "loadavg_after_timing", "loadavg_after")
        )
    ]
    pearson = {}
    for key, r in result["score_agreement_pearson"].items():
        kind, pair = key.split(": ")
        a, b = pair.split(" vs ")
        if a == "exact":
            pearson[(b, kind)] = r
    trak_kind = (
        f"trak_lambda{0.01:g}"
        if 0.01 in st["lambdas_relative_to_mean_sq_norm"]
        else f"trak_lambda{st['lambdas_relative_to_mean_sq_norm'][0]:g}"
    )
    if result["summary"]:
        lines += [
            "",
            f"| threads | pipeline | median s | examples/s | steady-state examples/s | vs traker (e2e / steady) "
            f"| vs traker_cached (e2e / steady) | set-up / grads / project s | Pearson vs exact, inner product "
            f"| Pearson vs exact, TRAK {trak_kind[5:]} |",
            "|" + " --- |" * 10,
        ]
    for threads, s in result["summary"].items():
        for name in [
            *[k for k in s if k == "ours" or k.startswith("ours_sjlt") and not k.endswith("components")],
            *REFERENCES,
        ]:
            if name not in s:
                continue
            comp = s.get(f"{name}_components", {})
            ratios = []
            for ref in REFERENCES:
                r = s.get(f"ratio_{name}_vs_{ref}")
                ratios.append("" if r is None else f"{r['of_medians']:.2f}x / {r['steady_state']:.2f}x")
            p = [pearson.get((name, kind)) for kind in ("inner_product", trak_kind)]
            lines.append(
                f"| {threads} | {name} | {s[name]['median_seconds']:.2f} | {s[name]['examples_per_second']:.1f} | "
                f"{s[name]['steady_state_examples_per_second']:.1f} | {ratios[0]} | {ratios[1]} | "
                + " / ".join(f"{comp[k]:.2f}" for k in ("setup", "grads", "project") if k in comp)
                + " | "
                + " | ".join("" if r is None else f"{r['mean']:.4f} ({r['min']:.4f})" for r in p)
                + " |"
            )
    if pearson:
        kinds = sorted({k for _, k in pearson})
        lines += [
            "",
            "Per-query Pearson vs exact gradient scores, this run's features (mean (min) over queries):",
            "",
            "| features | " + " | ".join(kinds) + " |",
            "|" + " --- |" * (len(kinds) + 1),
        ]
        for name in sorted({n for n, _ in pearson}):
            lines.append(
                f"| {name} | "
                + " | ".join(f"{pearson[(name, k)]['mean']:.4f} ({pearson[(name, k)]['min']:.4f})" for k in kinds)
                + " |"
            )
    study = result.get("seed_study_pearson_vs_exact") or {}
    if study:
        kinds = [k for k in next(iter(study.values())) if k != "norm_distortion"]
        lines += [
            "",
            f"Seed study: the exact gradients of the {st['n_examples']} examples projected with "
            f"{len(st['agreement_seeds'])} projection seeds; per-query Pearson vs exact, mean over queries, then "
            "mean +- sd over seeds; norm distortion |(|R^T g|^2 / |g|^2) - 1| mean / max over examples and seeds:",
            "",
            "| projection | " + " | ".join(kinds) + " | norm distortion mean / max |",
            "|" + " --- |" * (len(kinds) + 2),
        ]
        for name, by_kind in study.items():
            nd = by_kind["norm_distortion"]
            lines.append(
                f"| {name} | "
                + " | ".join(f"{by_kind[k]['mean']:.4f} +- {by_kind[k]['sd']:.4f}" for k in kinds)
                + f" | {nd['mean']:.4f} / {nd['max']:.4f} |"
            )
    spread = result.get("gradient_coordinate_spread")
    if spread:
        share, eff = spread["max_coordinate_energy_share"], spread["effective_coordinates"]
        lines += [
            "",
            f"Exact gradients: largest coordinate's share of |x|^2 median {share['median']:.2e} (max {share['max']:.2e}); "
            f"effective coordinates |x|_2^4/|x|_4^4 median {eff['median']:.0f} (min {eff['min']:.0f}) of {spread['n_params']:,}",
        ]
    return "\n".join(lines)


def profile(model, images, grad_cfg, config, nonzeros=None) -> dict:
    """torch.profiler of the sjlt pipeline on all examples, in compute_features' steps (the projector
    set-up, per-sample gradients, projection, each under a record_function label): the labelled
    totals and the top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    cfg = variant_cfg(grad_cfg, f"ours_sjlt{nonzeros or grad_cfg['sjlt_nonzeros']}")
    t, eps = G.feature_draws(
        config["diffusion"]["num_train_timesteps"], cfg["timesteps"], images.shape[1:], config["seeds"]["gradients"]
    )
    a_bar = alphas_cumprod(config["diffusion"])
    ours_features(model, images[:4], cfg, config)  # warm-up
    labels = ("setup: make_projector", "per_example_gradients", "projection")
    clock = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(labels[0]):
            project = G.make_projector(model, cfg, config["seeds"], torch.device("cpu"))
        for start in range(0, len(images), cfg["batch_size"]):
            x = torch.from_numpy(images[start : start + cfg["batch_size"]])
            with record_function(labels[1]):
                g = G.per_example_gradients(model, x, FN, t, eps, a_bar)
            with record_function(labels[2]):
                project(g).numpy()
    wall = time.perf_counter() - clock
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages if e.key not in labels)
    steps = {e.key: e.cpu_time_total / 1e6 for e in averages if e.key in labels}
    rows = sorted((e for e in averages if e.key not in labels), key=lambda e: e.self_cpu_time_total, reverse=True)
    table = [
        {
            "op": e.key,
            "self_cpu_s": e.self_cpu_time_total / 1e6,
            "self_cpu_pct": 100 * e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in rows[:25]
    ]
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25))
    print(
        "steps (CPU total, s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in steps.items())
        + f"; wall under profiler {wall:.2f} s"
    )
    return {
        "sjlt_nonzeros": cfg["sjlt_nonzeros"],
        "wall_seconds_under_profiler": wall,
        "steps_cpu_seconds": steps,
        "self_cpu_seconds_total": total / 1e6,
        "top_ops": table,
    }


if __name__ == "__main__":
    sys.exit(main())
