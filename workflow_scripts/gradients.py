"""Stage `gradients`: cached per-example gradient features phi(z) for train and query images.

phi(z) = P^T mean_k grad_theta f(z, t_k, eps_k): the scorer's output function f (TRAK: the simple
loss; D-TRAK: e.g. the mean squared noise prediction) on the uniform timestep grid
range(0, T, T // K), eps_k seeded per timestep and shared by all examples, averaged over the K
timesteps BEFORE the random projection P. Per-example gradients come from torch.func.vmap(grad(.)).
Stores are float32 .npy (memory-mappable) with a JSON sidecar that records what made them.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

from .common import ArtefactError, generator, log, save_json, select_device
from .config import config_hash
from .diffusion import add_noise, alphas_cumprod, load_model, output_function, timestep_grid
from .measure import load_queries
from . import data as data_stage
from .projection import Projector


def feature_draws(num_train_timesteps: int, k: int, image_shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K timesteps and their noise, eps_t seeded by (seed, t) so every example sees the same draws."""
    t = timestep_grid(num_train_timesteps, k)
    eps = torch.stack([torch.randn(*image_shape, generator=generator(seed, int(ti))) for ti in t])
    return torch.from_numpy(t), eps


def per_example_gradients(model, images: torch.Tensor, fn: str, t: torch.Tensor, eps: torch.Tensor, a_bar: torch.Tensor):
    """Flattened grad_theta of mean_k f(x, t_k, eps_k) for each image: (batch, n_params)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def objective(p, x):
        xs = x.unsqueeze(0).expand(len(t), *x.shape)
        prediction = functional_call(model, p, (add_noise(xs, t, eps, a_bar), t)).sample
        return output_function(fn, prediction, eps).mean()

    grads = vmap(grad(objective), in_dims=(None, 0))(params, images)
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


def compute_features(model, images: np.ndarray, fn: str, grad_cfg: dict, diffusion_cfg: dict, seeds: dict,
                     device: torch.device, desc: str = "gradients") -> np.ndarray:
    """(n, projection_dim) float32 features, streamed in batches."""
    model.eval()
    t, eps = feature_draws(diffusion_cfg["num_train_timesteps"], grad_cfg["timesteps"], images.shape[1:], seeds["gradients"])
    t, eps = t.to(device), eps.to(device)
    a_bar = alphas_cumprod(diffusion_cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    project = Projector(n_params, grad_cfg["projection_dim"], grad_cfg["projection"], seeds["projection"],
                        grad_cfg["projection_memory_mb"], device)
    out = np.zeros((len(images), grad_cfg["projection_dim"]), dtype=np.float32)
    batch = grad_cfg["batch_size"]
    for start in tqdm(range(0, len(images), batch), desc=desc, mininterval=5):
        x = torch.from_numpy(images[start : start + batch]).to(device)
        out[start : start + len(x)] = project(per_example_gradients(model, x, fn, t, eps, a_bar)).cpu().numpy()
    return out


def store_identity(config: dict, checkpoint_payload: dict, fn: str, split: str, n: int) -> dict:
    """What a gradient store was made from; a store whose sidecar differs must not be used."""
    g = config["gradients"]
    made_by = {"model": config["model"], "diffusion": config["diffusion"], "timesteps": g["timesteps"],
               "projection": g["projection"], "projection_dim": g["projection_dim"], "output_function": fn,
               "seed_gradients": config["seeds"]["gradients"], "seed_projection": config["seeds"]["projection"],
               "checkpoint": config_hash({"identity": checkpoint_payload["config"], "step": checkpoint_payload["step"]})}
    return {"split": split, "shape": [n, g["projection_dim"]], "dtype": "float32", "config_hash": config_hash(made_by), "made_by": made_by}


def write_store(features: np.ndarray, identity: dict, path: str | Path) -> None:
    """Atomic write of the .npy store and its .json sidecar (sidecar last, so it vouches for the array)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=features.shape)
    store[:] = features
    store.flush()
    del store
    os.replace(tmp, path)
    save_json(identity, sidecar_path(path))


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def read_sidecar(path: str | Path) -> dict:
    path, side = Path(path), sidecar_path(path)
    if not path.exists() or not side.exists():
        raise ArtefactError(f"{path}: gradient store or its sidecar {side.name} is missing")
    return json.loads(side.read_text())


def open_store(path: str | Path, expected: dict | None = None) -> np.ndarray:
    """Memory-map a store, checking its sidecar (and, if given, the identity it must have)."""
    sidecar = read_sidecar(path)
    array = np.load(path, mmap_mode="r")
    if list(array.shape) != sidecar["shape"] or str(array.dtype) != sidecar["dtype"]:
        raise ArtefactError(f"{path}: array is {array.dtype}{list(array.shape)}, sidecar says {sidecar['dtype']}{sidecar['shape']}")
    if expected is not None:
        for key in ("split", "shape", "config_hash"):
            if sidecar[key] != expected[key]:
                diff = [k for k in expected["made_by"] if sidecar.get("made_by", {}).get(k) != expected["made_by"][k]]
                raise ArtefactError(f"{path}: store {key} is {sidecar[key]}, config expects {expected[key]}"
                                    + (f" (differs in {', '.join(diff)})" if diff else ""))
    return array


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint whose gradients are taken")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--output-function", required=True)
    parser.add_argument("--out-dir", required=True, help="writes train.npy, generated.npy, heldout.npy (+ .json)")


def run(args, config: dict) -> None:
    device = select_device(config["compute"])
    model, payload = load_model(args.model, config["model"], device)
    splits = {"train": data_stage.load_dataset(args.dataset)["train_images"], **load_queries(args.dataset, args.samples)}
    for split, images in splits.items():
        path = Path(args.out_dir) / f"{split}.npy"
        identity = store_identity(config, payload, args.output_function, split, len(images))
        try:
            open_store(path, identity)
            log.info("gradients: reusing %s (config matches)", path)
            continue
        except ArtefactError:
            pass
        features = compute_features(model, images, args.output_function, config["gradients"], config["diffusion"],
                                    config["seeds"], device, desc=f"gradients {args.output_function} {split}")
        write_store(features, identity, path)
        log.info("gradients: wrote %s %s", path, features.shape)
