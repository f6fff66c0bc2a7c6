#!/usr/bin/env python
"""Per-example gradient-feature throughput: this project vs the TRAK reference package (traker 0.3.2).

Features: phi(z) = P^T mean_k grad_theta loss(z, t_k, eps_k), K timesteps on the uniform grid with
eps seeded per t (workflow_scripts.gradients), Gaussian projection to d dimensions. Same model
(params.yaml model config; the trained full checkpoint when it exists), same images (sklearn
digits), same (t, eps) draws, same d, same batch size, on CPU, in one process, interleaved.

Pipelines, each timed end to end (projector set-up included) on n = n_train + n_query examples:
- ours:          workflow_scripts.gradients.compute_features (one vmap(grad) over the K-expanded
                 batch; projection matrix generated once and held in memory).
- traker:        traker's own components as TRAKer wires them on CPU, in the pattern of the D-TRAK
                 reference code (the published use of traker for diffusion models): for each t_k a
                 FunctionalGradientComputer.compute_per_sample_grad (vmap(grad) of a get_output
                 task), gradients summed over k, vectorize(), / K, then BasicProjector.project with
                 TRAKer's CPU choice (normal, block_size 100: the matrix is regenerated block by
                 block on every project() call) and / sqrt(n_params) like TRAKer.featurize.
- traker_cached: the same with BasicProjector(block_size=d): one block, generated once and kept
                 (the fastest CPU configuration traker offers; not TRAKer's default).
Component timings (set-up, per-sample gradients, projection) come from instrumented runs of the
same functions. Scores: inner products phi_q . phi_i and TRAK scores phi_q^T (Phi^T Phi +
lambda I)^-1 phi_i (KernelSolver of scorers/trak.py, lambda relative to the mean squared feature
norm so it means the same thing for every feature scale and d) from every feature set, compared by
per-query Pearson correlation with each other and with the UNPROJECTED exact gradients.

    .venv/bin/python benchmarks/gradient_throughput.py            # ~30 min on 2 busy shared cores (--threads 1: ~8 min)
    .venv/bin/python benchmarks/gradient_throughput.py --quick    # smoke run, ~1 min
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

from workflow_scripts import gradients as G  # noqa: E402
from workflow_scripts.data import load_digits_images  # noqa: E402
from workflow_scripts.diffusion import add_noise, alphas_cumprod, build_model, load_model  # noqa: E402
from workflow_scripts.projection import CHUNK, Projector  # noqa: E402
from workflow_scripts.scorers.trak import KernelSolver  # noqa: E402

from trak.gradient_computers import FunctionalGradientComputer  # noqa: E402
from trak.modelout_functions import AbstractModelOutput  # noqa: E402
from trak.projectors import BasicProjector, ProjectionType  # noqa: E402
from trak.utils import vectorize  # noqa: E402

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
    projector = BasicProjector(n_params, proj_dim, seed, ProjectionType.normal, "cpu", block_size=block_size,
                               dtype=torch.float32)
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
def ours_features(model, images, grad_cfg, config):
    return G.compute_features(model, images, FN, grad_cfg, config["diffusion"], config["seeds"], torch.device("cpu"))


def ours_components(model, images, grad_cfg, config, t, eps, a_bar) -> dict:
    """compute_features taken apart: projector set-up, per-sample gradients, projection matmul."""
    n_params = sum(p.numel() for p in model.parameters())
    clock = time.perf_counter()
    project = Projector(n_params, grad_cfg["projection_dim"], grad_cfg["projection"], config["seeds"]["projection"],
                        grad_cfg["projection_memory_mb"])
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


def filled_projection(kind: str, seed: int, n_params: int, dim: int) -> torch.Tensor:
    """PROPOSAL for projection.Projector: the same blocks drawn straight into one preallocated
    matrix (no torch.cat copy, no second pass for the 1/sqrt(dim) scale, which moves to the
    (batch, dim) output). Same random numbers as projection_block() (up to that scaling)."""
    from workflow_scripts.common import generator

    matrix = torch.empty(n_params, dim)
    for c, start in enumerate(range(0, n_params, CHUNK)):
        stop = min(start + CHUNK, n_params)
        if kind != "gaussian":
            raise NotImplementedError(kind)
        torch.randn(stop - start, dim, generator=generator(seed, c), out=matrix[start:stop])
    return matrix


class CountSketch:
    """PROPOSAL for projection.py: a sparse JL sketch (CountSketch / feature hashing). Row i of P has
    one nonzero, a random sign s_i in a random column h_i, so phi = P^T g costs one pass over g
    (index_add_) instead of a dense (n_params x d) matmul, and P is n_params int64 + float32 instead
    of n_params x d floats. E[<P^T x, P^T y>] = <x, y>, and the variance of that estimate is at most
    the Gaussian sketch's ((|x|^2 |y|^2 + <x, y>^2) / d, minus the diagonal terms)."""

    def __init__(self, n_params: int, dim: int, seed: int):
        from workflow_scripts.common import generator

        g = generator(seed, 1 << 40)  # its own stream, apart from the Gaussian blocks (seed, chunk)
        self.dim = dim
        self.index = torch.randint(0, dim, (n_params,), generator=g)
        self.sign = torch.randint(0, 2, (n_params,), generator=g).float().mul_(2).sub_(1)

    def __call__(self, gradients: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(gradients.shape[0], self.dim, dtype=gradients.dtype)
        return out.index_add_(1, self.index, gradients * self.sign)


def countsketch_features(model, images, t, eps, a_bar, proj_dim, seed, batch_size, timing=None):
    """compute_features with the CountSketch in place of the dense Gaussian matrix."""
    n_params = sum(p.numel() for p in model.parameters())
    clock = time.perf_counter()
    sketch = CountSketch(n_params, proj_dim, seed)
    spent = {"setup": time.perf_counter() - clock, "grads": 0.0, "project": 0.0}
    out = np.zeros((len(images), proj_dim), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size])
        clock = time.perf_counter()
        g = G.per_example_gradients(model, x, FN, t, eps, a_bar)
        spent["grads"] += time.perf_counter() - clock
        clock = time.perf_counter()
        out[start : start + len(x)] = sketch(g).numpy()
        spent["project"] += time.perf_counter() - clock
    if timing is not None:
        timing.update(spent)
    return out


# ----------------------------------------------------------------------------------------- scores
def per_query_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def trak_scores(train: np.ndarray, query: np.ndarray, rel: float) -> np.ndarray:
    """KernelSolver scores with lambda = rel * mean ||phi_i||^2 (KernelSolver's own lambda is relative
    to trace / d, which differs between d = 2048 and the unprojected d = n_params)."""
    train, query = np.asarray(train, np.float64), np.asarray(query, np.float64)
    solver = KernelSolver(train)
    return solver.scores(query, rel * train.shape[1] / train.shape[0])


def score_agreement(features: dict[str, tuple[np.ndarray, np.ndarray]], lambdas) -> dict:
    """Per-query Pearson between every pair of feature sets, for inner products and TRAK scores."""
    kinds = {"inner_product": lambda tr, q: np.asarray(q, np.float64) @ np.asarray(tr, np.float64).T}
    for rel in lambdas:
        kinds[f"trak_lambda{rel:g}"] = lambda tr, q, rel=rel: trak_scores(tr, q, rel)
    names = list(features)
    result = {}
    for kind, fn in kinds.items():
        scores = {name: fn(*features[name]) for name in names}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                r = per_query_pearson(scores[a], scores[b])
                result[f"{kind}: {a} vs {b}"] = {"median": float(np.median(r)), "mean": float(r.mean()),
                                                 "min": float(r.min())}
    return result


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "params.yaml"))
    parser.add_argument("--checkpoint", default=None, help="default: results/<benchmark>/models/full/model.pt if present")
    parser.add_argument("--n-train", type=int, default=112)
    parser.add_argument("--n-query", type=int, default=16)
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--projection-dim", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    parser.add_argument("--no-traker-default", action="store_true", help="skip the slow default-BasicProjector run")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of one `ours` batch")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 examples, d=256, 1 repeat, 1 thread")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gradient_throughput.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_query, args.projection_dim, args.repeats, args.threads = 24, 8, 256, 1, [1]

    config = yaml.safe_load(Path(args.config).read_text())
    checkpoint = args.checkpoint or str(REPO / "results" / config["benchmark"] / "models" / "full" / "model.pt")
    model, model_source = load_benchmark_model(config, checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    images = load_digits_images()[0][: args.n_train + args.n_query]
    n = len(images)
    grad_cfg = {**config["gradients"], "timesteps": args.timesteps, "projection": "gaussian",
                "projection_dim": args.projection_dim, "batch_size": args.batch_size}
    t, eps = G.feature_draws(config["diffusion"]["num_train_timesteps"], args.timesteps, images.shape[1:],
                             config["seeds"]["gradients"])
    a_bar = alphas_cumprod(config["diffusion"])
    seed = config["seeds"]["projection"]
    print(f"model: {n_params:,} parameters ({model_source}); {n} examples, K={args.timesteps}, d={args.projection_dim}, "
          f"batch {args.batch_size}; projection matrix {n_params * args.projection_dim * 4 / 2**30:.2f} GiB", flush=True)

    def run_traker(block_size):
        def fn():
            timing = {}
            return traker_features(model, images, t, eps, a_bar, args.projection_dim, seed, args.batch_size,
                                   block_size=block_size, timing=timing), timing
        return fn

    pipelines = {"ours": lambda: (ours_features(model, images, grad_cfg, config), None),
                 "traker_cached": run_traker(args.projection_dim)}
    if not args.no_traker_default:
        pipelines["traker"] = run_traker(100)  # TRAKer's BasicProjector on CPU: default block_size 100

    def run_countsketch():
        timing = {}
        return countsketch_features(model, images, t, eps, a_bar, args.projection_dim, seed, args.batch_size,
                                    timing=timing), timing

    pipelines["ours_countsketch"] = run_countsketch  # PROPOSAL, not (yet) in workflow_scripts
    load_before = os.getloadavg()
    features, runs = {}, {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs[threads] = {name: [] for name in [*pipelines, *[f"{p}_components" for p in pipelines],
                                               "proposed_generation", "current_generation"]}
        warm = images[:4]  # untimed warm-up: first vmap / allocator / thread-pool start-up costs
        ours_features(model, warm, {**grad_cfg, "projection_dim": 16}, config)
        traker_features(model, warm, t, eps, a_bar, 16, seed, args.batch_size, block_size=16)
        countsketch_features(model, warm, t, eps, a_bar, 16, seed, args.batch_size)
        for rep in range(args.repeats):
            names = list(pipelines)
            names = names[rep % len(names) :] + names[: rep % len(names)]  # rotate the order every repeat
            for name in names:  # interleaved, so a load change on the shared machine hits all
                fn = pipelines[name]
                seconds, (value, components) = timed(fn)
                runs[threads][name].append(seconds)
                if components is not None:
                    runs[threads][f"{name}_components"].append(components)
                features.setdefault(name, value)
                del value
                print(f"  threads={threads} repeat={rep} {name}: {seconds:.2f} s ({n / seconds:.1f} examples/s)"
                      + (f" [{fmt(components)}]" if components else ""), flush=True)
            gc.collect()
            runs[threads]["ours_components"].append(ours_components(model, images, grad_cfg, config, t, eps, a_bar))
            seconds, matrix = timed(lambda: filled_projection("gaussian", seed, n_params, args.projection_dim))
            runs[threads]["proposed_generation"].append(seconds)
            del matrix
            seconds, projector = timed(lambda: Projector(n_params, args.projection_dim, "gaussian", seed, 1 << 30))
            runs[threads]["current_generation"].append(seconds)
            del projector
            gc.collect()
            print(f"  threads={threads} repeat={rep} ours components: {fmt(runs[threads]['ours_components'][-1])}; "
                  f"matrix generation current {runs[threads]['current_generation'][-1]:.2f} s, "
                  f"proposed {runs[threads]['proposed_generation'][-1]:.2f} s", flush=True)
    load_after = os.getloadavg()

    # proposed generation gives the same matrix up to the 1/sqrt(d) scaling
    small = min(n_params, 3 * CHUNK // 2)
    check = Projector(small, 64, "gaussian", seed, 1 << 30).matrix
    proposal_ok = bool(torch.allclose(filled_projection("gaussian", seed, small, 64) / 8.0, check, rtol=1e-6, atol=1e-7))

    # exact (unprojected) gradients: ground truth for the scores
    torch.set_num_threads(args.threads[0])
    exact = torch.cat([G.per_example_gradients(model, torch.from_numpy(images[s : s + args.batch_size]), FN, t, eps, a_bar)
                       for s in range(0, n, args.batch_size)]).numpy()
    split = {name: (f[: args.n_train], f[args.n_train :]) for name, f in {"exact": exact, **features}.items()}
    agreement = score_agreement(split, args.lambdas)
    del exact

    summary = summarise(runs, n)
    result = {
        "settings": {"n_examples": n, "n_train": args.n_train, "n_query": args.n_query, "timesteps": args.timesteps,
                     "projection_dim": args.projection_dim, "projection": "gaussian", "batch_size": args.batch_size,
                     "repeats": args.repeats, "threads": args.threads, "output_function": FN,
                     "model_parameters": n_params, "model": model_source, "lambdas_relative_to_mean_sq_norm": args.lambdas},
        "environment": {"torch": torch.__version__, "traker": __import__("trak").__version__,
                        "python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
                        "loadavg_before": load_before, "loadavg_after": load_after},
        "summary": summary, "runs": {str(k): v for k, v in runs.items()}, "score_agreement_pearson": agreement,
        "proposed_generation_matches_current": proposal_ok,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(markdown(result))
    print(f"\nwrote {out}")
    if args.profile:
        profile(model, images, grad_cfg, config, t, eps, a_bar)
    return 0


PIPELINES = ("ours", "traker", "traker_cached", "ours_countsketch")


def fmt(parts: dict) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())


def summarise(runs: dict, n: int) -> dict:
    summary = {}
    for threads, by_name in runs.items():
        s = {}
        for name in PIPELINES:
            if by_name.get(f"{name}_components"):
                s[f"{name}_components"] = comp = {k: statistics.median(r[k] for r in by_name[f"{name}_components"])
                                                  for k in by_name[f"{name}_components"][0]}
            if by_name.get(name):
                med = statistics.median(by_name[name])
                s[name] = {"median_seconds": med, "examples_per_second": n / med,
                           # per-example cost once the one-time set-up (matrix generation) is paid
                           "steady_state_examples_per_second": n / (comp["grads"] + comp["project"])}
        for name in ("proposed_generation", "current_generation"):
            s[name] = statistics.median(by_name[name])
        for ours in ("ours", "ours_countsketch"):
            for ref in ("traker", "traker_cached"):
                if ref in s and ours in s:
                    per_repeat = [b / a for a, b in zip(by_name[ours], by_name[ref])]
                    s[f"ratio_{ours}_vs_{ref}"] = {
                        "of_medians": s[ref]["median_seconds"] / s[ours]["median_seconds"],
                        "median_of_paired_repeats": statistics.median(per_repeat),
                        "steady_state": s[ours]["steady_state_examples_per_second"] / s[ref]["steady_state_examples_per_second"]}
        summary[str(threads)] = s
    return summary


def markdown(result: dict) -> str:
    st = result["settings"]
    lines = [f"Gradient features, {st['n_examples']} examples, K={st['timesteps']}, d={st['projection_dim']}, "
             f"batch {st['batch_size']}, {st['model_parameters']:,} parameters, median of {st['repeats']} runs",
             "", "| threads | pipeline | median s | examples/s | steady-state examples/s | ours speed-up (e2e / steady) "
             "| set-up s | grads s | project s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for threads, s in result["summary"].items():
        for name in PIPELINES:
            if name not in s:
                continue
            comp = s.get(f"{name}_components", {})
            ratio = s.get(f"ratio_ours_vs_{name}")
            speed = "" if ratio is None else f"{ratio['of_medians']:.2f}x / {ratio['steady_state']:.2f}x"
            lines.append(f"| {threads} | {name} | {s[name]['median_seconds']:.2f} | {s[name]['examples_per_second']:.1f} | "
                         f"{s[name]['steady_state_examples_per_second']:.1f} | {speed} | "
                         + " | ".join(f"{comp[k]:.2f}" if k in comp else "" for k in ("setup", "grads", "project")) + " |")
    for threads, s in result["summary"].items():
        for ref in ("traker", "traker_cached"):
            r = s.get(f"ratio_ours_countsketch_vs_{ref}")
            if r:
                lines.append(f"\nthreads={threads}: ours_countsketch (proposal) vs {ref}: {r['of_medians']:.2f}x end to end, "
                             f"{r['steady_state']:.2f}x steady state")
    lines += ["", "Per-query Pearson correlation of scores (median / min over queries):", "",
              "| scores | median | min |", "| --- | --- | --- |"]
    for key, r in result["score_agreement_pearson"].items():
        lines.append(f"| {key} | {r['median']:.4f} | {r['min']:.4f} |")
    gen = {k: v for k, v in result["summary"].items()}
    lines += ["", "Projection-matrix generation (s): "
              + "; ".join(f"threads={k}: current {v['current_generation']:.2f}, proposed {v['proposed_generation']:.2f}"
                          for k, v in gen.items())]
    return "\n".join(lines)


def profile(model, images, grad_cfg, config, t, eps, a_bar) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    x = torch.from_numpy(images[: grad_cfg["batch_size"]])
    n_params = sum(p.numel() for p in model.parameters())
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        project = Projector(n_params, grad_cfg["projection_dim"], "gaussian", config["seeds"]["projection"], 1 << 30)
        project(G.per_example_gradients(model, x, FN, t, eps, a_bar))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    sys.exit(main())
