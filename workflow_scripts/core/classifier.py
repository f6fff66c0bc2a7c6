"""A small CNN trained on the benchmark's own training images and labels (the `classifier` stage trains it).

It needs no download, so it is the embedding model of the `embedding` scorer (dot / cosine of its
penultimate features) and the fallback image embedding of the counterfactual evaluation when no
CLIP weights exist (docs/methods.md). Architecture: [conv3x3-ReLU]*2 -> maxpool -> [conv3x3-ReLU] ->
maxpool -> flatten -> linear-ReLU (the FEATURES, feature_dim wide) -> linear (10 logits).
Training: AdamW on cross-entropy with random +-augment_shift pixel shifts; every random draw
(init, data order, shifts) comes from seeds.classifier, so the same config gives the same weights
(on CPU, bit for bit). The checkpoint records its configuration and a fingerprint of the training
data; a checkpoint made by another configuration or for other data is refused.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workflow_scripts.core.common import ArtefactError, check_training_loss, generator, load_torch, log, rng
from workflow_scripts.core.contracts import params_defaults

KIND = "digit-classifier"


DEFAULTS = params_defaults("classifier")  # the keys a classifier section may set, and their defaults


INIT_STREAM, ORDER_STREAM, SHIFT_STREAM = 1, 2, 3


class DigitClassifier(nn.Module):
    def __init__(self, channels: list[int], feature_dim: int, n_classes: int, image_shape=(1, 8, 8)):
        super().__init__()
        c_in, h, w = image_shape
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(c2 * (h // 4) * (w // 4), feature_dim)
        self.head = nn.Linear(feature_dim, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (after the ReLU): the embedding of the `embedding` scorer."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def classifier_config(config: dict) -> dict:
    """The classifier section with defaults filled in (an unknown key is an error, not ignored)."""
    section = config.get("classifier", {})
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"classifier: unknown keys {unknown}; known: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **section}
    if len(cfg["channels"]) != 2:
        raise ValueError("classifier.channels needs exactly two widths")
    return cfg


def data_fingerprint(images: np.ndarray, labels: np.ndarray | None = None) -> str:
    h = hashlib.sha256(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def identity(cfg: dict, seed: int, images: np.ndarray, labels: np.ndarray) -> dict:
    """What a checkpoint was made from; a checkpoint whose identity differs must not be used."""
    return {
        "classifier": dict(cfg),
        "seed": int(seed),
        "n_train": int(len(images)),
        "n_classes": int(labels.max()) + 1,
        "image_shape": [int(s) for s in images.shape[1:]],
        "images_sha256": data_fingerprint(images),
        "data_sha256": data_fingerprint(images, labels),
    }


def shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Random integer translation per image (zero padding at -1 = background), seeded by g."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=g)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, device="cpu") -> float:
    if len(images) == 0:
        return float("nan")
    with torch.no_grad():
        logits = model(torch.as_tensor(images, dtype=torch.float32, device=device))
    return float((logits.argmax(1).cpu().numpy() == np.asarray(labels)).mean())


def train_classifier(
    cfg: dict, seed: int, images: np.ndarray, labels: np.ndarray, device: torch.device | str = "cpu"
) -> tuple[DigitClassifier, dict]:
    """Train on (images, labels); returns the model (eval mode) and the checkpoint payload."""
    ident = identity(cfg, seed, images, labels)
    torch.manual_seed(int(rng(seed, INIT_STREAM).integers(2**31)))
    model = DigitClassifier(cfg["channels"], cfg["feature_dim"], ident["n_classes"], images.shape[1:]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"], total_steps=cfg["steps"], pct_start=0.1)
    x_all = torch.as_tensor(images, dtype=torch.float32, device=device)
    y_all = torch.as_tensor(labels, dtype=torch.int64, device=device)
    batch = min(cfg["batch_size"], len(images))
    per_epoch = len(images) // batch
    model.train()
    for step in range(cfg["steps"]):
        epoch, position = divmod(step, per_epoch)
        if position == 0:
            order = torch.from_numpy(rng(seed, ORDER_STREAM, epoch).permutation(len(images))).to(device)
        idx = order[position * batch : (position + 1) * batch]
        x = shift(x_all[idx].cpu(), cfg["augment_shift"], generator(seed, SHIFT_STREAM, step)).to(device)
        loss = F.cross_entropy(model(x), y_all[idx])
        check_training_loss(loss.item(), step, cfg["steps"], "the embedding classifier", "classifier.lr", cfg["lr"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == cfg["steps"] - 1:
            log.info("classifier: step %d/%d loss %.4f", step + 1, cfg["steps"], loss.item())
    model.eval()
    payload = {
        "kind": KIND,
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "identity": ident,
        "metrics": {"train_accuracy": accuracy(model, images, labels, device)},
    }
    return model, payload


def load_classifier(
    path, expected: dict | None = None, train_images: np.ndarray | None = None, device: torch.device | str = "cpu"
) -> tuple[DigitClassifier, dict]:
    """Load a classifier checkpoint, refusing one made by another configuration or for other data.

    `expected`: the identity it must have (see identity()); `train_images`: the training images it
    must have been trained on (what a scorer can check without the labels).
    """
    payload = load_torch(path)
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise ArtefactError(f"{path}: not a classifier checkpoint of this workflow")
    ident = payload["identity"]
    if expected is not None and ident != expected:
        diff = sorted(k for k in set(ident) | set(expected) if ident.get(k) != expected.get(k))
        raise ArtefactError(
            f"{path}: made by a different configuration (differs in {', '.join(diff)}); rerun the classifier stage"
        )
    if train_images is not None and data_fingerprint(train_images) != ident["images_sha256"]:
        raise ArtefactError(
            f"{path}: trained on other images than this benchmark's training set; rerun the classifier stage"
        )
    cfg = ident["classifier"]
    model = DigitClassifier(cfg["channels"], cfg["feature_dim"], ident["n_classes"], tuple(ident["image_shape"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ArtefactError(f"{path}: state dict does not fit the classifier ({exc})") from exc
    return model.to(device).eval(), payload


@torch.no_grad()
def embed(model: DigitClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(n, feature_dim) float32 penultimate features."""
    device = next(model.parameters()).device
    out = [
        model.features(torch.as_tensor(images[s : s + batch_size], dtype=torch.float32, device=device)).cpu()
        for s in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, model.fc.out_features), np.float32)
