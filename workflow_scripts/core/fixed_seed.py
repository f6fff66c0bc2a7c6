"""The fixed-seed sets of the metagradient's own ground truth (docs/methods.md "Metagradient / MAGIC").

The metagradient predicts how the model trained with the full model's seed AND data order changes when examples are
weighted 0. Its ground truth retrains exactly that way (rule train_subset, kind fixed_seed: all training examples,
the removed ones weighted 0; metagradient.retrain_weighted) on
- every EVALUATION subset of the LDS (names subset<j>: the same masks as data/subsets.npz), and
- fixed_seed.loo_sets leave-out sets (names loo<k>): max(1, round(fixed_seed.loo_fraction * N)) random examples
  removed, drawn from seeds.subsets (stream LOO_STREAM, set k): the paper's leave-1%-out check.
Writes fixed_seed/sets.npz: `names` and `masks` (n_sets, N) bool, True = weight 1 (kept).
"""

from __future__ import annotations

import numpy as np

from workflow_scripts.core.common import ArtefactError, load_npz, rng

LOO_STREAM = 11  # seeds.subsets stream of the leave-out draws (the LDS subsets use the bare seed)


def removed_count(fraction: float, n_train: int) -> int:
    count = max(1, int(round(fraction * n_train)))
    if count >= n_train:
        raise ValueError(f"fixed_seed.loo_fraction {fraction} removes all {n_train} training examples")
    return count


def make_sets(subsets: dict, fixed_cfg: dict, seed: int) -> dict[str, np.ndarray]:
    masks = subsets["masks"]
    n_train = masks.shape[1]
    names = [f"subset{j:03d}" for j in subsets["evaluation"]]
    rows = [masks[j] for j in subsets["evaluation"]]
    count = removed_count(fixed_cfg["loo_fraction"], n_train)
    for k in range(fixed_cfg["loo_sets"]):
        keep = np.ones(n_train, dtype=bool)
        keep[rng(seed, LOO_STREAM, k).choice(n_train, size=count, replace=False)] = False
        names.append(f"loo{k:03d}")
        rows.append(keep)
    return {"names": np.array(names), "masks": np.array(rows, dtype=bool).reshape(len(names), n_train)}


def load_sets(path) -> dict[str, np.ndarray]:
    sets = load_npz(path, ("names", "masks"))
    if sets["masks"].dtype != bool or sets["masks"].shape != (len(sets["names"]), sets["masks"].shape[1]):
        raise ArtefactError(f"{path}: expected bool masks, one row per name")
    return sets


def weights(sets: dict, name: str, n_train: int) -> np.ndarray:
    """Per-example weights of fixed-seed set `name`: 1 for kept examples, 0 for removed ones."""
    names = [str(n) for n in sets["names"]]
    if name not in names:
        raise ArtefactError(
            f"fixed-seed set {name!r} is not in the sets file (it has {names[:5]}...); rerun rule fixed_seed_sets"
        )
    mask = sets["masks"][names.index(name)]
    if len(mask) != n_train:
        raise ArtefactError(f"fixed-seed set {name!r} has {len(mask)} entries for {n_train} training examples")
    return mask.astype(np.float64)
