"""CLIP similarity: dot product or cosine of open_clip image embeddings (docs/methods.md, Scorers).

Method config: {family: clip, similarity: dot | cosine, model: NAME_OR_JSON, weights: PATH | null,
batch_size: 64 (optional)}.
- `model` is an open_clip built-in architecture name (e.g. ViT-B-32, or ViT-B-32-quickgelu for the
  OpenAI weights) or the path of an open_clip model-config JSON file (either the bare form
  {embed_dim, vision_cfg, text_cfg} of open_clip's model_configs/, or the open_clip_config.json of a
  downloaded hub snapshot, {model_cfg: ..., preprocess_cfg: ...}).
- `weights` is a LOCAL checkpoint file (.pt / .pth / .bin / .safetensors). Nothing is ever
  downloaded: a pretrained tag such as "openai" is not accepted. Without weights (null or a file
  that does not exist) the scorer does not produce numbers: it raises ScorerNotRun with the reason
  "not run: no CLIP weights", which the scores stage records instead of a score matrix. A random
  network would give numbers that look like results; that is never done.

Images are 8x8 grayscale in [-1, 1]: mapped to [0, 1], upsampled bilinearly to the model's input
size, replicated to 3 channels and normalised with the model's mean / std (open_clip's
preprocess_cfg; OpenAI's statistics when a model config names none).
Score convention as for raw pixels: S[q, i] = similarity(query q, training image i).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from workflow_scripts.core.common import ArtefactError, log
from workflow_scripts.scorers.base import POSINT, SIMILARITY, Scorer, ScorerNotRun, method_schema
from workflow_scripts.scorers.pixel import similarity

if TYPE_CHECKING:
    import torch

NO_WEIGHTS = "not run: no CLIP weights"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def check_weights(method_cfg: dict) -> Path:
    """The configured weights file, or ScorerNotRun when there is none to use."""
    weights = method_cfg.get("weights")
    if weights is None or str(weights).strip() == "":
        raise ScorerNotRun(NO_WEIGHTS, "no weights file is configured (weights: null)")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ScorerNotRun(NO_WEIGHTS, f"weights file {path} does not exist")
    return path


def load_clip(model: str, weights: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """An open_clip model with the weights of a local file, in eval mode, preprocess_cfg attached."""
    try:
        import open_clip
        from open_clip.model import set_model_preprocess_cfg
    except ImportError as exc:
        raise ScorerNotRun(
            "not run: open_clip is not installed", "pip install open-clip-torch (see requirements.txt)"
        ) from exc
    weights = str(weights)
    try:
        if str(model).endswith(".json"):
            spec = json.loads(Path(model).read_text())
            model_cfg = dict(spec.get("model_cfg", spec))
            custom_text = model_cfg.pop("custom_text", False) or "hf_model_name" in model_cfg.get("text_cfg", {})
            net = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**model_cfg)
            open_clip.load_checkpoint(net, weights, strict=True)
            preprocess = {
                "mean": OPENAI_MEAN,
                "std": OPENAI_STD,
                **spec.get("preprocess_cfg", {}),
                "size": net.visual.image_size,
            }
            set_model_preprocess_cfg(net, preprocess)
        else:
            # A file path as `pretrained` is loaded as is; tags were excluded by check_weights.
            net = open_clip.create_model(
                model,
                pretrained=weights,
                pretrained_image=False,
                pretrained_text=False,
                require_pretrained=True,
                device="cpu",
            )
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise ArtefactError(f"CLIP model config {model}: {exc}") from exc
    except RuntimeError as exc:  # wrong architecture for the state dict, unknown model name, corrupt file
        raise ArtefactError(f"CLIP weights {weights} do not load into model {model!r}: {exc}") from exc
    return net.to(device).eval()


def preprocess(images: np.ndarray | torch.Tensor, size, mean, std) -> torch.Tensor:
    """(n, 1, h, w) in [-1, 1] -> (n, 3, H, W) CLIP input: bilinear upsampling, 3 channels, normalised."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (n, 1 or 3, h, w), got {tuple(x.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = (x + 1.0) / 2.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def embed(net: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(n, embed_dim) float32 image embeddings (not normalised)."""
    import torch
    from open_clip.model import get_model_preprocess_cfg

    cfg = get_model_preprocess_cfg(net)
    device = next(net.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = preprocess(images[start : start + batch_size], cfg["size"], cfg["mean"], cfg["std"]).to(device)
            out.append(net.encode_image(x).float().cpu())
    return torch.cat(out).numpy()


def compute(method_cfg: dict, inputs, lambdas) -> list:
    weights = check_weights(method_cfg)  # before touching any data: no weights, no numbers
    device = getattr(inputs, "device", None) or "cpu"
    net = load_clip(method_cfg.get("model", "ViT-B-32"), weights, device)
    batch = int(method_cfg.get("batch_size", 64))
    train = embed(net, inputs.train_pixels(), batch)
    log.info("clip: %s embeddings of %d training images (dim %d)", method_cfg.get("model"), len(train), train.shape[1])
    return [
        (
            None,
            {
                name: similarity(embed(net, images, batch), train, method_cfg["similarity"])
                for name, images in inputs.query_pixels().items()
            },
        )
    ]


class Clip(Scorer):
    family = "clip"
    schemas = (
        method_schema(
            "clip",
            ["similarity", "model", "weights"],
            similarity=SIMILARITY,
            model={"type": "string", "minLength": 1},
            weights={"type": ["string", "null"]},
            batch_size=POSINT,
        ),
    )
    model_families = ("ddpm", "vesde", "latent")  # model-free: it reads images only (latent: decoded samples)

    def compute(self, method_cfg, inputs, lambdas):
        return compute(method_cfg, inputs, lambdas)

    def unavailable(self, name, method_cfg):
        if not method_cfg.get("weights"):
            return f"without CLIP weights (scores.methods.{name}.weights is null)"
        return None
