"""Seeded draws shared by every model family.

Every random draw at training step s is a pure function of (seed, s): the initialisation comes from the seed, the
data order of epoch e is the permutation of the members drawn from (seed, e), and the (t, eps) draws of step s come
from (seed, s). Generated image i has its own seed (image_seed), so one query can be regenerated alone.
training_identity() is what a checkpoint records to be reproducible and checkable.
"""

from __future__ import annotations

import hashlib

import numpy as np

from workflow_scripts.core.common import rng
from workflow_scripts.core.precision import amp_mode

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
    identity = {
        "model": config["model"],
        "diffusion": config["diffusion"],
        "train": config["train"],
        "data": config["data"],
        "seed": training_seed(config, replicate),
        "members_sha256": hashlib.sha256(np.asarray(members, np.int64).tobytes()).hexdigest(),
        "n_members": int(len(members)),
    }
    if amp_mode(config) != "float32":  # recorded only when used, so full-precision checkpoints keep their identity
        identity["amp"] = amp_mode(config)
    return identity


def image_seed(sample_seed: int, i: int) -> int:
    return sample_seed * 1000 + i
