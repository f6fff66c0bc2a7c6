"""Stage `train`: DDPM training of the full model and of every retraining (model.family vesde: the VE-SDE score
model by denoising score matching, vesde.train_vesde, with the same seeds, data order and checkpoints).

A retraining's members come from an LDS subset (--subsets FILE --subset j) or from a file of
training indices (--members FILE: a counterfactual retraining, the training set without what a
method names). Every random draw at step s is a pure function of (seed, s): the initialisation
comes from the seed, the data order of epoch e is the permutation of the MEMBERS drawn from
(seed, e), and the (t, eps) draws of step s come from (seed, s). "The same seed" therefore means the
same initialisation and the same per-step (t, eps) stream; the data order necessarily differs
when the members differ. A run resumed from its last saved state reproduces the uninterrupted run
exactly (on CPU, bit for bit).
"""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm import tqdm

from . import data as data_stage
from .common import ArtefactError, generator, load_torch, log, rng, save_torch, select_device
from .diffusion import alphas_cumprod, build_model, save_checkpoint_payload, simple_loss
from .precision import Precision, amp_mode

ORDER_STREAM, NOISE_STREAM, INIT_STREAM = 1, 2, 3


def training_seed(config: dict, replicate: int) -> int:
    return config["seeds"]["train"] + replicate


def batch_indices(members: np.ndarray, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Examples of step `step`: consecutive slices of a per-epoch permutation of the members."""
    batch_size = min(batch_size, len(members))
    steps_per_epoch = len(members) // batch_size
    epoch, position = divmod(step, steps_per_epoch)
    order = rng(seed, ORDER_STREAM, epoch).permutation(members)
    return order[position * batch_size : (position + 1) * batch_size]


def training_identity(config: dict, members: np.ndarray, replicate: int) -> dict:
    """What a checkpoint must record to be reproducible and checkable."""
    identity = {"model": config["model"], "diffusion": config["diffusion"], "train": config["train"],
                "data": config["data"], "seed": training_seed(config, replicate),
                "members_sha256": hashlib.sha256(np.asarray(members, np.int64).tobytes()).hexdigest(), "n_members": int(len(members))}
    if amp_mode(config) != "float32":  # recorded only when used, so full-precision checkpoints keep their identity
        identity["amp"] = amp_mode(config)
    return identity


def train_model(config: dict, images: np.ndarray, members: np.ndarray, replicate: int, model_out: str | Path,
                checkpoint_paths: dict[int, str] | None = None, weights: np.ndarray | None = None,
                device: torch.device | None = None, stop_after: int | None = None) -> Path | None:
    """Train one model on images[members]; returns the final checkpoint path (None if stopped early).

    `checkpoint_paths` maps step -> path of intermediate checkpoints to keep (with the lr at that step).
    `weights` are optional per-example loss weights (1 = ordinary training).
    `stop_after` simulates an interruption after that many steps (tests).
    """
    device = device or select_device(config["compute"])
    train_cfg = config["train"]
    seed = training_seed(config, replicate)
    identity = training_identity(config, members, replicate)
    if weights is not None:  # a weighted training (fixed-seed ground truth) is another model than the unweighted one
        identity["weights_sha256"] = hashlib.sha256(np.asarray(weights, np.float64).tobytes()).hexdigest()
    model_out = Path(model_out)
    resume_path = model_out.with_name(model_out.stem + ".resume.pt")

    torch.manual_seed(int(rng(seed, INIT_STREAM).integers(2**31)))
    model = build_model(config["model"], images.shape[1:]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])
    schedule = get_cosine_schedule_with_warmup(optimizer, int(train_cfg["warmup_fraction"] * train_cfg["steps"]), train_cfg["steps"])
    precision = Precision(amp_mode(config), device)
    start = 0
    if resume_path.exists():
        state = load_torch(resume_path)
        if state.get("identity") == identity:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            if precision.scaler is not None:
                precision.scaler.load_state_dict(state["scaler"])
            start = state["step"]
            log.info("resuming %s from step %d", model_out, start)
        else:
            log.warning("ignoring %s: made by a different configuration", resume_path)

    a_bar = alphas_cumprod(config["diffusion"]).to(device)
    x_all = torch.from_numpy(images).to(device)
    w_all = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device)
    checkpoint_paths = checkpoint_paths or {}
    T = config["diffusion"]["num_train_timesteps"]
    model.train()
    progress = tqdm(range(start, train_cfg["steps"]), desc=f"train {model_out.parent.name}", mininterval=5, file=None)
    for step in progress:
        if stop_after is not None and step >= stop_after:
            return None
        idx = torch.from_numpy(batch_indices(members, train_cfg["batch_size"], seed, step)).to(device)
        g = generator(seed, NOISE_STREAM, step)
        t = torch.randint(0, T, (len(idx),), generator=g).to(device)
        eps = torch.randn(len(idx), *images.shape[1:], generator=g).to(device)
        with precision.autocast():
            per_example = simple_loss(model, x_all[idx], t, eps, a_bar).float()  # float(): no-op in float32
        loss = per_example.mean() if w_all is None else (w_all[idx] * per_example).mean()
        optimizer.zero_grad(set_to_none=True)
        lr = schedule.get_last_lr()[0]
        precision.step(loss, model, optimizer, train_cfg["grad_clip"])
        schedule.step()
        done = step + 1
        if done in checkpoint_paths:
            save_torch(save_checkpoint_payload(model, identity, done, images.shape[1:], lr=lr), checkpoint_paths[done])
        if done % train_cfg["resume_every"] == 0 and done < train_cfg["steps"]:
            save_torch({"identity": identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": done,
                        **({"scaler": precision.scaler.state_dict()} if precision.scaler else {})}, resume_path)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    save_torch(save_checkpoint_payload(model, identity, train_cfg["steps"], images.shape[1:]), model_out)
    if resume_path.exists():
        os.unlink(resume_path)
    return model_out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--subsets", help="LDS subset masks (data stage); with --subset")
    parser.add_argument("--subset", type=int, default=-1, help="LDS subset index; -1 = the full training set")
    parser.add_argument("--members", help="a .npy of training indices to train on (counterfactual retrainings)")
    parser.add_argument("--fixed-seed-sets", help="fixed_seed/sets.npz; with --fixed-seed-set: train on ALL examples, "
                        "those outside the set weighted 0 (the metagradient's fixed-seed ground truth)")
    parser.add_argument("--fixed-seed-set", help="name of the fixed-seed set (subset<j> or loo<k>)")
    parser.add_argument("--replicate", type=int, default=0, help="training seed index s (seed = seeds.train + s)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoints", nargs="*", default=[], help="intermediate checkpoints, named *step<N>.pt")


def checkpoint_step(path: str) -> int:
    stem = Path(path).stem
    if "step" not in stem:
        raise ValueError(f"checkpoint path {path} must end in step<N>.pt")
    return int(stem.rsplit("step", 1)[1])


def load_members(path: str | Path, n_train: int) -> np.ndarray:
    """Training indices from a .npy file: 1-D, integer, unique, sorted, within [0, n_train), not empty."""
    path = Path(path)
    if not path.exists():
        raise ArtefactError(f"{path}: missing (run the workflow stage that makes it)")
    try:
        members = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ArtefactError(f"{path}: cannot be read ({exc}); delete it and rerun") from exc
    if members.ndim != 1 or not np.issubdtype(members.dtype, np.integer) or len(members) == 0:
        raise ArtefactError(f"{path}: expected a non-empty 1-D integer array of training indices, "
                            f"got {members.dtype} of shape {members.shape}")
    if members.min() < 0 or members.max() >= n_train:
        raise ArtefactError(f"{path}: indices outside [0, {n_train}) (the training set has {n_train} images)")
    if np.any(np.diff(members) <= 0):
        raise ArtefactError(f"{path}: indices must be sorted and unique")
    return members.astype(np.int64)


def run(args, config: dict) -> None:
    dataset = data_stage.load_dataset(args.dataset)
    images = dataset["train_images"]
    if args.fixed_seed_sets or args.fixed_seed_set:
        if not (args.fixed_seed_sets and args.fixed_seed_set) or args.members is not None or args.subset >= 0:
            raise ValueError("a fixed-seed retraining needs --fixed-seed-sets and --fixed-seed-set, and neither "
                             "--members nor --subset")
        from .fixed_seed import load_sets, weights

        w = weights(load_sets(args.fixed_seed_sets), args.fixed_seed_set, len(images))
        log.info("fixed-seed retraining %s: %d of %d examples weighted 0, seed and data order of replicate %d",
                 args.fixed_seed_set, int((w == 0).sum()), len(w), args.replicate)
        train_model(config, images, np.arange(len(images)), args.replicate, args.out, weights=w)
        return
    if args.members is not None:
        if args.subset >= 0:
            raise ValueError("give either --members or --subset, not both")
        members = load_members(args.members, len(images))
    elif args.subset < 0:
        members = np.arange(len(images))
    else:
        if args.subsets is None:
            raise ValueError("--subset needs --subsets (the data stage's subsets.npz)")
        members = np.flatnonzero(data_stage.load_subsets(args.subsets)["masks"][args.subset])
    checkpoints = {checkpoint_step(p): p for p in args.checkpoints}
    if config["model"].get("family", "ddpm") == "vesde":  # the VE-SDE score model, denoising score matching
        from .vesde import train_vesde

        train_vesde(config, images, members, args.replicate, args.out, checkpoint_paths=checkpoints)
        return
    train_model(config, images, members, args.replicate, args.out, checkpoints)
