"""Stage `gradients`: cached per-example gradient features for train and query images.

One store per (checkpoint, output function, feature kind, timestep budget K, projection); its tag
(see dag/paths.py) is `<output function>_<kind>_K<K>_<projection><dim>`, projection gaussian, rademacher or
sjlt (projection.py). The sjlt sketch's nonzeros per input (gradients.sjlt_nonzeros) are not in the
tag but in the sidecar's `made_by` (like the seeds), so a store made with another s is recomputed.
Timesteps are the uniform grid range(0, T, T // K) with eps_k seeded per timestep and shared by all
examples. Feature kinds:

- avg:       phi(z) = P^T mean_k grad_theta f(z, t_k, eps_k), f the scorer's output function (TRAK: the
             simple loss; D-TRAK: e.g. the mean squared noise prediction), averaged over the K timesteps
             BEFORE the random projection P.
- unitnorm:  phi(z) = P^T mean_k g_k / ||g_k||, g_k = grad_theta f(z, t_k, eps_k): per-timestep gradients
             unit-normalised (in full parameter space) before averaging (DAS eq. 17, reference code).
- sketch<r>: the DAS vector-output form. r random output directions u_{k,j} ~ N(0, I_D / r) per timestep
             (seeded by (seeds.projection, t_k, j), shared by all examples) sketch the noise predictor's
             output; rows J_kj = grad_theta <u_{k,j}, eps_theta(x_{t_k}, t_k)>, each timestep weighted by
             w_k = 1 / ||J_k||_F (the (r x n_params) block), averaged over k and projected: (n, r, d).
             Averaging independently sketched timesteps is exactly an r-row sketch of the stacked
             (timestep, pixel) output, so the least-squares algebra of scorers/das.py applies unchanged.
- journey:   generated queries only (Journey-TRAK): at K of the stored sampling steps s (timestep t_s,
             state x_s of the trajectory) the x0-prediction x0_hat = (x_s - sqrt(1 - a_bar) eps_theta) /
             sqrt(a_bar), clipped to [-1, 1] as the sampler does, is re-noised to t_s with fresh noise
             seeded by (seeds.gradients, query, t_s); phi = P^T mean_s grad_theta loss there.

- --measurement m (TRAK-family query_measurement; rule gradients_measurement): query features only,
             phi(x_q) = P^T grad_theta m(x_q) for a likelihood measurement m (likelihood.target_measurement:
             exactly the measured target's draws), with store <tag>'s projector, so they pair with its train
             features; written to <tag>/measurement_<m>/ (trajectory: generated queries only).

Non-journey stores also hold `train_residual`: the training residuals at the store's own (t, eps)
draws, used by DAS. Scalar kinds: rho_k = sqrt(mean_pix (eps_k - eps_theta)^2) and, as the DAS
reference code does, r = mean_k rho_k / ||rho||_2 (normalised over timesteps, then averaged). Sketch
kind: the sketched residual vector mean_k w_k U_k (eps_k - eps_theta) in R^r, same weights w_k.

Per-example gradients come from torch.func.vmap(grad(.)) (vjp for sketch rows). Memory per batch is
bounded by gradients.batch_size x gradients.timestep_chunk x n_params floats. Stores are float32
.npy (memory-mappable) with a JSON sidecar that records what made them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import ArtefactError, generator, load_npz, log, select_device
from workflow_scripts.core.contracts import RESIDUAL, STORE_SPLITS, VECTOR_OUTPUT, config_hash, measurement_sets
from workflow_scripts.core.contracts import config_hash as hash_of
from workflow_scripts.core.curvature import ParamLayout
from workflow_scripts.core.data import load_queries
from workflow_scripts.core.measurement import iter_gradients
from workflow_scripts.core.projection import SPARSE, build_projector
from workflow_scripts.core.store import array_digest, new_store, reusable, store_provenance, write_store
from workflow_scripts.dag.paths import parse_feature_tag
from workflow_scripts.families.ddpm import add_noise, alphas_cumprod, output_function, predict_noise, timestep_grid
from workflow_scripts.families.latent import guidance_scale, guided_noise_prediction
from workflow_scripts.families.likelihood import target_measurement
from workflow_scripts.families.registry import load_family_model

SKETCH_STREAM, JOURNEY_STREAM = 101, 102  # sub-streams of seeds.projection / seeds.gradients


def feature_draws(num_train_timesteps: int, k: int, image_shape, seed: int):
    """The K timesteps and their noise, eps_t seeded by (seed, t) so every example sees the same draws."""
    import torch

    t = timestep_grid(num_train_timesteps, k)
    eps = torch.stack([torch.randn(*image_shape, generator=generator(seed, int(ti))) for ti in t])
    return torch.from_numpy(t), eps


def output_directions(t, r: int, image_shape, seed: int):
    """(K, r, *image_shape) random output directions, N(0, I / r) so that E[U^T U] = I; seeded per t."""
    import torch

    return (
        torch.stack([torch.randn(r, *image_shape, generator=generator(seed, SKETCH_STREAM, int(ti))) for ti in t])
        / r**0.5
    )


def journey_steps(n_steps: int, k: int) -> np.ndarray:
    """Indices of K sampling steps spread evenly over the trajectory's n_steps (all of them when K = n_steps)."""
    if not 1 <= k <= n_steps:
        raise ValueError(f"Journey-TRAK: {k} sampling steps requested, the trajectories have {n_steps}")
    return np.linspace(0, n_steps - 1, k).round().astype(np.int64)


def _params(model) -> dict:
    return {name: p.detach() for name, p in model.named_parameters()}


def _flatten(grads: dict, lead: int):
    import torch

    return torch.cat([g.flatten(lead) for g in grads.values()], dim=lead)


def _denoise(model, params, x_t, t, c):
    """eps_theta(x_t, t) under `params` (torch.func.functional_call); a conditional model (families/latent.py)
    also gets its example's condition c (a 0-d caption index inside the per-example vmap), repeated per row."""
    from torch.func import functional_call

    args = (x_t, t) if c is None else (x_t, t, c.expand(len(t)))
    out = functional_call(model, params, args)
    return out.sample if hasattr(out, "sample") else out


def _cond_dim(cond):
    """vmap in_dim of the per-example condition: batched when given, absent (None) for unconditional models."""
    return None if cond is None else 0


def per_example_gradients(model, images, fn: str, t, eps, a_bar, cond=None):
    """Flattened grad_theta of mean_k f(x, t_k, eps_k) for each image: (batch, n_params).
    `cond`: the images' conditions (caption indices) for a conditional model, else None (as in every function here)."""
    from torch.func import grad, vmap

    def objective(p, x, c):
        xs = x.unsqueeze(0).expand(len(t), *x.shape)
        prediction = _denoise(model, p, add_noise(xs, t, eps, a_bar), t, c)
        return output_function(fn, prediction, eps).mean()

    return _flatten(vmap(grad(objective), in_dims=(None, 0, _cond_dim(cond)))(_params(model), images, cond), 1)


def per_timestep_gradients(model, images, fn: str, t, eps, a_bar, cond=None):
    """grad_theta f(x, t_k, eps_k) for each image and each timestep separately: (batch, K, n_params)."""
    from torch.func import grad, vmap

    def objective(p, x, c, ti, ei):
        prediction = _denoise(model, p, add_noise(x[None], ti[None], ei[None], a_bar), ti[None], c)
        return output_function(fn, prediction, ei[None]).sum()

    per_t = vmap(grad(objective), in_dims=(None, None, None, 0, 0))
    per_image = vmap(per_t, in_dims=(None, 0, _cond_dim(cond), None, None))
    return _flatten(per_image(_params(model), images, cond, t, eps), 2)


def sketched_jacobians(model, images, t, eps, a_bar, directions, cond=None):
    """Rows grad_theta <u_{k,j}, eps_theta(x_{t_k}, t_k)>: (batch, K, r, n_params); directions (K, r, *shape)."""
    from torch.func import vjp, vmap

    def rows(p, x, c, ti, ei, ui):
        def output(q):
            return _denoise(model, q, add_noise(x[None], ti[None], ei[None], a_bar), ti[None], c)[0]

        _, pullback = vjp(output, p)
        return vmap(pullback)(ui)[0]  # one forward, r backward passes

    per_t = vmap(rows, in_dims=(None, None, None, 0, 0, 0))
    per_image = vmap(per_t, in_dims=(None, 0, _cond_dim(cond), None, None, None))
    return _flatten(per_image(_params(model), images, cond, t, eps, directions), 3)


def per_sample_gradients(model, x0, t, eps, a_bar, fn: str = "loss", cond=None):
    """grad_theta f(x0_b, t_b, eps_b), every sample with its own (x0, t, eps): (batch, n_params)."""
    from torch.func import grad, vmap

    def objective(p, x, c, ti, ei):
        prediction = _denoise(model, p, add_noise(x[None], ti[None], ei[None], a_bar), ti[None], c)
        return output_function(fn, prediction, ei[None]).sum()

    dims = (None, 0, _cond_dim(cond), 0, 0)
    return _flatten(vmap(grad(objective), in_dims=dims)(_params(model), x0, cond, t, eps), 1)


def noise_residuals(model, images, t, eps, a_bar, cond=None):
    """eps_k - eps_theta(x_{t_k}, t_k) for each image and timestep: (batch, K, *image_shape)."""
    import torch

    b, k = len(images), len(t)
    with torch.no_grad():
        x0 = images.unsqueeze(1).expand(b, k, *images.shape[1:]).reshape(b * k, *images.shape[1:])
        tt, ee = t.repeat(b), eps.repeat(b, *([1] * (eps.dim() - 1)))
        prediction = predict_noise(
            model, add_noise(x0, tt, ee, a_bar), tt, None if cond is None else cond.repeat_interleave(k)
        )
    return (ee - prediction).reshape(b, k, *images.shape[1:])


def _unit(x, n_trailing: int):
    """x divided by the norm of its last n_trailing dimensions (a zero block stays zero), and the norms."""
    import torch

    norms = x.flatten(x.dim() - n_trailing).norm(dim=-1)
    return x / norms.clamp_min(torch.finfo(x.dtype).tiny).view(*norms.shape, *([1] * n_trailing)), norms


def _chunks(k: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, k)) for s in range(0, k, max(1, size))]


def make_projector(model, grad_cfg: dict, seeds: dict, device):
    """The store's random projection P (n_params x projection_dim); build once per job, it can be GBs
    (dense kinds; the sparse sjlt sketch is n_params x sjlt_nonzeros indices)."""
    n_params = sum(p.numel() for p in model.parameters())
    kind = grad_cfg["projection"]
    return build_projector(
        n_params,
        grad_cfg["projection_dim"],
        kind,
        seeds["projection"],
        grad_cfg["projection_memory_mb"],
        device,
        nonzeros=grad_cfg["sjlt_nonzeros"] if kind in SPARSE else None,
    )


def compute_features(
    model,
    images: np.ndarray,
    fn: str,
    grad_cfg: dict,
    diffusion_cfg: dict,
    seeds: dict,
    device,
    desc: str = "gradients",
    *,
    kind: str = "avg",
    timesteps: int | None = None,
    directions: int | None = None,
    residuals: bool = False,
    project=None,
    out=None,
    cond=None,
):
    """(n, d) float32 features ((n, r, d) for kind 'sketch'), streamed in batches.
    `cond`: each image's condition (a conditional model's caption indices), None for unconditional models.

    With residuals=True returns (features, residuals): (n,) for scalar kinds, (n, r) for 'sketch'.
    `project`: the job's Projector (make_projector), built here if not given.
    `out`: an array of that shape to fill (the store's memory map: the features are never all in RAM)."""
    import torch
    from tqdm import tqdm

    if kind not in ("avg", "unitnorm", "sketch"):
        raise ValueError(f"unknown feature kind {kind!r} (journey features: compute_journey_features)")
    model.eval()
    k = grad_cfg["timesteps"] if timesteps is None else timesteps
    shape = images.shape[1:]
    t, eps = feature_draws(diffusion_cfg["num_train_timesteps"], k, shape, seeds["gradients"])
    t, eps = t.to(device), eps.to(device)
    sketch = kind == "sketch"
    rows = directions if sketch else 1
    if sketch:
        if not directions:
            raise ValueError("a sketch store needs output_directions >= 1")
        u = output_directions(t, directions, shape, seeds["projection"]).to(device)
    a_bar = alphas_cumprod(diffusion_cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    dim = grad_cfg["projection_dim"]
    project = project or make_projector(model, grad_cfg, seeds, device)
    chunks = _chunks(k, grad_cfg["timestep_chunk"] // rows)
    shape_out = (len(images), rows, dim) if sketch else (len(images), dim)
    if out is None:
        out = np.zeros(shape_out, dtype=np.float32)
    elif tuple(out.shape) != shape_out:
        raise ValueError(f"out has shape {out.shape}, the features {shape_out}")
    res = np.zeros((len(images), rows) if sketch else (len(images),), dtype=np.float32)
    batch = grad_cfg["batch_size"]
    for start in tqdm(range(0, len(images), batch), desc=desc, mininterval=5):
        x = torch.from_numpy(images[start : start + batch]).to(device)
        c = None if cond is None else torch.from_numpy(np.asarray(cond[start : start + batch], np.int64)).to(device)
        b = len(x)
        if kind == "avg":
            acc = sum(
                per_example_gradients(model, x, fn, t[h], eps[h], a_bar, c) * ((h.stop - h.start) / k) for h in chunks
            )
            out[start : start + b] = project(acc).cpu().numpy()
        elif kind == "unitnorm":
            acc = (
                sum(_unit(per_timestep_gradients(model, x, fn, t[h], eps[h], a_bar, c), 1)[0].sum(1) for h in chunks)
                / k
            )
            out[start : start + b] = project(acc).cpu().numpy()
        else:
            acc, racc = 0, 0
            for h in chunks:
                normalised, norms = _unit(sketched_jacobians(model, x, t[h], eps[h], a_bar, u[h], c), 2)
                acc = acc + normalised.sum(1)
                if residuals:
                    e = noise_residuals(model, x, t[h], eps[h], a_bar, c).flatten(2)  # (b, chunk, D)
                    sketched = torch.einsum("bkd,krd->bkr", e, u[h].flatten(2))
                    racc = racc + (sketched / norms.clamp_min(torch.finfo(norms.dtype).tiny)[..., None]).sum(1)
            out[start : start + b] = project((acc / k).reshape(b * rows, n_params)).reshape(b, rows, dim).cpu().numpy()
            if residuals:
                res[start : start + b] = (racc / k).cpu().numpy()
        if residuals and not sketch:
            rms = torch.cat(
                [noise_residuals(model, x, t[h], eps[h], a_bar, c).flatten(2).pow(2).mean(2).sqrt() for h in chunks], 1
            )
            res[start : start + b] = (
                (rms.mean(1) / rms.norm(dim=1).clamp_min(torch.finfo(rms.dtype).tiny)).cpu().numpy()
            )
    return (out, res) if residuals else out


def x0_clip(model) -> bool:
    """Does the model's sampler clip its x0-predictions to [-1, 1]? The DDPM family's sampler always does
    (images); a diffusers scheduler as its config says (Stable Diffusion's latents: clip_sample false)."""
    scheduler_config = getattr(model, "scheduler_config", None)
    return True if scheduler_config is None else bool(scheduler_config.get("clip_sample", True))


def sampler_noise_prediction(model, x, t, cond=None, guidance: float | None = None):
    """The noise prediction the sampler stepped with at (x, t): eps_theta(x, t), or for a conditional model the
    classifier-free-guided one of the query's prompt (families/latent.guided_noise_prediction, as its sampler)."""
    if cond is None:
        out = model(x, t)
        return out.sample if hasattr(out, "sample") else out
    return guided_noise_prediction(model, x, t, cond, guidance)


def journey_gradients(model, trajectories, timesteps, steps, query_index, seed: int, a_bar, cond=None, guidance=None):
    """Unprojected Journey-TRAK query gradients (batch, n_params): mean over the chosen sampling steps of
    the loss gradient at the re-noised x0-prediction (see the module docstring). A conditional model's
    x0-prediction is the guided one its sampler used, and the loss is conditioned on the query's prompt `cond`."""
    import torch

    device = trajectories.device
    clip = x0_clip(model)
    acc = 0
    for s in steps:
        x_s = trajectories[:, s]
        tt = torch.full((len(x_s),), int(timesteps[s]), dtype=torch.long, device=device)
        ab = a_bar[tt].view(-1, *([1] * (x_s.dim() - 1)))
        with torch.no_grad():
            x0_hat = (x_s - (1 - ab).sqrt() * sampler_noise_prediction(model, x_s, tt, cond, guidance)) / ab.sqrt()
            if clip:
                x0_hat = x0_hat.clamp(-1, 1)
        noise = torch.stack(
            [
                torch.randn(*x_s.shape[1:], generator=generator(seed, JOURNEY_STREAM, int(q), int(timesteps[s])))
                for q in query_index
            ]
        ).to(device)
        acc = acc + per_sample_gradients(model, x0_hat, tt, noise, a_bar, "loss", cond=cond)
    return acc / len(steps)


def compute_journey_features(
    model,
    trajectories: np.ndarray,
    timesteps: np.ndarray,
    k: int,
    grad_cfg: dict,
    diffusion_cfg: dict,
    seeds: dict,
    device,
    desc: str = "gradients journey",
    cond: np.ndarray | None = None,
    guidance: float | None = None,
) -> np.ndarray:
    """(n_generated, d) float32 Journey-TRAK query features from the stored sampling trajectories; `cond` the
    generated queries' caption indices and `guidance` the sampler's guidance scale for a conditional model."""
    import torch
    from tqdm import tqdm

    model.eval()
    steps = journey_steps(len(timesteps), k)
    if trajectories.shape[1] != len(timesteps) + 1:
        raise ArtefactError(
            f"trajectories hold {trajectories.shape[1]} states for {len(timesteps)} sampling steps "
            "(expected steps + 1: x_T .. x_0)"
        )
    if cond is not None and len(cond) != len(trajectories):
        raise ArtefactError(f"{len(cond)} prompts for {len(trajectories)} sampling trajectories")
    a_bar = alphas_cumprod(diffusion_cfg).to(device)
    dim = grad_cfg["projection_dim"]
    project = make_projector(model, grad_cfg, seeds, device)
    out = np.zeros((len(trajectories), dim), dtype=np.float32)
    batch = grad_cfg["batch_size"]
    for start in tqdm(range(0, len(trajectories), batch), desc=desc, mininterval=5):
        traj = torch.from_numpy(np.ascontiguousarray(trajectories[start : start + batch], dtype=np.float32)).to(device)
        c = None if cond is None else torch.from_numpy(np.asarray(cond[start : start + len(traj)], np.int64)).to(device)
        g = journey_gradients(
            model, traj, timesteps, steps, range(start, start + len(traj)), seeds["gradients"], a_bar, c, guidance
        )
        out[start : start + len(traj)] = project(g).cpu().numpy()
    return out


def compute_measurement_features(
    model,
    images: np.ndarray,
    measurement,
    grad_cfg: dict,
    device,
    project,
    desc: str = "gradients measurement",
    out=None,
) -> np.ndarray:
    """(n, d) float32 query features P^T grad_theta m(x_q) of a likelihood Measurement (likelihood.py), over ALL
    parameters in the order of the loss stores, with their projector P: they live in the training features' space.
    The per-image gradients are core/measurement.py's (vmap over images, mean over the measurement's own draws).
    `project`: the store's Projector (make_projector with the store's seeds)."""
    from tqdm import tqdm

    model.eval()
    layout = ParamLayout.of(model, [name for name, _ in model.named_parameters()])  # = _flatten's order
    if out is None:
        out = np.zeros((len(images), grad_cfg["projection_dim"]), dtype=np.float32)
    rows = grad_cfg["batch_size"] * grad_cfg["timestep_chunk"]  # images x draws per vmap batch, as compute_features
    batches = iter_gradients(model, layout, images, measurement, rows, device)
    for start, g in tqdm(batches, desc=desc, mininterval=5):
        out[start : start + len(g)] = project(g).cpu().numpy()
    return out


def store_identity(
    config: dict,
    checkpoint_payload: dict,
    fn: str,
    split: str,
    n: int,
    *,
    kind: str = "avg",
    timesteps: int | None = None,
    directions: int | None = None,
    images: np.ndarray | None = None,
    conditions: np.ndarray | None = None,
    guidance: float | None = None,
) -> dict:
    """What a gradient store was made from; a store whose sidecar differs must not be used.
    conditions / guidance: a conditional model's caption indices of the images / the journey's guidance scale.

    split is a query/train split or RESIDUAL (the training residuals of a store)."""
    g = config["gradients"]
    made_by = {
        **store_provenance(config, checkpoint_payload),  # what every store of this run and checkpoint shares
        "kind": kind,
        "timesteps": g["timesteps"] if timesteps is None else timesteps,
        "output_function": fn,
    }
    if kind == "sketch":
        made_by["output_directions"] = directions
    if images is not None:
        made_by["inputs_sha256"] = array_digest(images)
    if conditions is not None:  # only for conditional models, so that the other families keep their hashes
        made_by["conditions_sha256"] = array_digest(np.asarray(conditions, np.int64))
    if guidance is not None:
        made_by["guidance_scale"] = float(guidance)
    rows = [directions] if kind == "sketch" else []
    shape = [n, *rows] if split == RESIDUAL else [n, *rows, g["projection_dim"]]
    lr = checkpoint_payload.get("lr")
    return {
        "split": split,
        "shape": shape,
        "dtype": "float32",
        "config_hash": config_hash(made_by),
        "made_by": made_by,
        "checkpoint": {"step": int(checkpoint_payload["step"]), "lr": None if lr is None else float(lr)},
    }


def check_tag(spec: dict, config: dict, tag: str) -> None:
    """A store tag must agree with the configuration it is computed under."""
    g = config["gradients"]
    for key in ("projection", "projection_dim"):
        if spec[key] != g[key]:
            raise ValueError(f"store tag {tag}: {key} is {spec[key]}, but gradients.{key} is {g[key]}")
    fn, kind = spec["output_function"], spec["kind"]
    if kind == "sketch" and fn != VECTOR_OUTPUT:
        raise ValueError(
            f"store tag {tag}: sketch stores take the noise predictor itself ({VECTOR_OUTPUT!r}), not {fn!r}"
        )
    if kind == "journey" and fn != "loss":
        raise ValueError(f"store tag {tag}: Journey-TRAK features use the TRAK loss, not {fn!r}")
    if kind in ("avg", "unitnorm") and fn == VECTOR_OUTPUT:
        raise ValueError(f"store tag {tag}: {VECTOR_OUTPUT!r} is the output of sketch stores only")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint whose gradients are taken")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--extra-queries", help="the user's own queries as the model takes them (queries.extra)")
    parser.add_argument(
        "--tag", required=True, help="store tag <output function>_<kind>_K<K>_<projection><dim> (dag/paths.py)"
    )
    parser.add_argument(
        "--out-dir", required=True, help="writes <split>.npy (+ .json) and train_residual.npy (+ .json)"
    )
    parser.add_argument(
        "--measurement",
        help="instead: query features of this likelihood measurement (elbo, "
        "timestep_loss_t<t>, trajectory) projected like store --tag; writes <query set>.npy",
    )


def run(args, config: dict) -> None:
    spec = parse_feature_tag(args.tag)
    check_tag(spec, config, args.tag)
    fn, kind, k, r = spec["output_function"], spec["kind"], spec["timesteps"], spec["output_directions"]
    device = select_device(config["compute"])
    model, payload = load_family_model(args.model, config["model"], device)
    out = Path(args.out_dir)
    if args.measurement:
        if kind not in ("avg",):
            raise ValueError(f"--measurement: query features pair with avg stores (TRAK family), not {kind!r}")
        return run_measurement(args, config, model, payload, fn, k, device)
    conditional = getattr(model, "conditional", False)
    conditions = core_data.load_conditions(args.dataset, args.samples, args.extra_queries) if conditional else {}
    if kind == "journey":
        samples = load_npz(args.samples, ("trajectories", "timesteps"))
        trajectories, timesteps = samples["trajectories"], samples["timesteps"]
        prompts = conditions.get("generated")
        guidance = guidance_scale(config["sample"]) if conditional else None
        identity = store_identity(
            config,
            payload,
            fn,
            "generated",
            len(trajectories),
            kind=kind,
            timesteps=k,
            images=trajectories,
            conditions=prompts,
            guidance=guidance,
        )
        path = out / "generated.npy"
        if not reusable(path, identity):
            features = compute_journey_features(
                model,
                trajectories,
                timesteps,
                k,
                config["gradients"],
                config["diffusion"],
                config["seeds"],
                device,
                desc=f"gradients {args.tag} generated",
                cond=prompts,
                guidance=guidance,
            )
            write_store(features, identity, path)
            log.info("gradients: wrote %s %s (%d of %d sampling steps)", path, features.shape, k, len(timesteps))
        return
    queries = load_queries(args.dataset, args.samples, args.extra_queries)
    splits = {"train": core_data.load_dataset(args.dataset)["train_images"], **queries}
    assert tuple(splits)[: len(STORE_SPLITS)] == STORE_SPLITS
    project = None  # built on first use, shared by the splits
    for split, images in splits.items():
        path = out / f"{split}.npy"
        common = dict(kind=kind, timesteps=k, directions=r, images=images, conditions=conditions.get(split))
        identity = store_identity(config, payload, fn, split, len(images), **common)
        residual_path = out / f"{RESIDUAL}.npy"
        residual_identity = (
            store_identity(config, payload, fn, RESIDUAL, len(images), **common) if split == "train" else None
        )
        if reusable(path, identity) and (residual_identity is None or reusable(residual_path, residual_identity)):
            continue
        project = project or make_projector(model, config["gradients"], config["seeds"], device)
        with new_store(identity, path) as features:  # filled batch by batch, never all in RAM (CIFAR-10: GBs)
            result = compute_features(
                model,
                images,
                fn,
                config["gradients"],
                config["diffusion"],
                config["seeds"],
                device,
                desc=f"gradients {args.tag} {split}",
                kind=kind,
                timesteps=k,
                directions=r,
                residuals=split == "train",
                project=project,
                out=features,
                cond=conditions.get(split),
            )
        if split == "train":
            write_store(result[1], residual_identity, residual_path)
        log.info("gradients: wrote %s %s", path, tuple(identity["shape"]))


def measurement_identity(
    config: dict, payload: dict, fn: str, split: str, images: np.ndarray, k: int, target: str, samples: dict | None
) -> dict:
    """store_identity of the base store's projection, plus what defines the measurement (target, its settings and seed)."""
    identity = store_identity(config, payload, fn, split, len(images), kind="avg", timesteps=k, images=images)
    made_by = identity["made_by"]
    made_by.update(
        query_measurement=target,
        measure=config["measure"],
        seed_measure=config["seeds"]["measure"],
        dataset=config["data"]["dataset"],
    )
    if target == "trajectory":
        made_by["trajectories_sha256"] = array_digest(samples["trajectories"])
    identity["config_hash"] = hash_of(made_by)
    return identity


def run_measurement(args, config: dict, model, payload: dict, fn: str, k: int, device) -> None:
    """Query features of args.measurement in the projection of store args.tag (contracts.measurement_sets)."""
    target = args.measurement
    samples = load_npz(args.samples, ("trajectories", "timesteps")) if target == "trajectory" else None
    queries = load_queries(args.dataset, args.samples, args.extra_queries)
    project = None
    for split in measurement_sets(target, queries):
        measurement = target_measurement(config, target, split, samples)
        if measurement is None:
            raise ValueError(f"measurement {target} does not exist for {split} queries")
        images = queries[split]
        path = Path(args.out_dir) / f"{split}.npy"
        identity = measurement_identity(config, payload, fn, split, images, k, target, samples)
        if reusable(path, identity):
            continue
        project = project or make_projector(model, config["gradients"], config["seeds"], device)
        with new_store(identity, path) as features:
            compute_measurement_features(
                model,
                images,
                measurement,
                config["gradients"],
                device,
                project,
                desc=f"gradients {args.tag} {target} {split}",
                out=features,
            )
        log.info("gradients: wrote %s %s (query gradients of %s)", path, tuple(identity["shape"]), target)
