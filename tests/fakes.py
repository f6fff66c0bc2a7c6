"""Test doubles, float64 references, dense references and tiny configurations shared by several test modules."""

import contextlib
import copy
import math

import torch

from workflow_scripts.core.curvature import Curvature, ParamLayout
from workflow_scripts.families.latent import LatentDenoiser, add_lora


class FakeInputs:
    """The part of scores.ScorerInputs the image scorers read (train images, queries, classifier path)."""

    def __init__(self, train, queries, classifier_path=None):
        self._train, self._queries = train, queries
        if classifier_path is not None:
            self.classifier_path = classifier_path

    def train_images(self):
        return self._train

    def queries(self):
        return self._queries

    # a pixel-space family: the images are the model inputs
    train_pixels, query_pixels = train_images, queries


# The tiny DDPM UNet the unit tests build (two blocks, attention on the second; a few thousand parameters).
TINY_MODEL = {
    "block_out_channels": [8, 16],
    "attention": [False, True],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}


# The tiny text-conditional UNet of tiny_latent_denoiser (2-channel 4x4 latents; ~51k frozen base weights).
TINY_LATENT_UNET = {
    "sample_size": 4,
    "in_channels": 2,
    "out_channels": 2,
    "block_out_channels": (8, 16),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 8,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}


def tiny_latent_denoiser(
    seed: int = 0, n_captions: int = 3, caption_length: int = 2, targets=None, lora_b_std: float = 0.3
) -> LatentDenoiser:
    """A LatentDenoiser (families/latent.py) without a pipeline directory: a tiny diffusers UNet2DConditionModel with
    random weights, random caption embeddings (n_captions + 1 rows, the last the empty caption; caption_length
    tokens of dimension 8) and peft LoRA (rank 2, alpha 2; model.lora.targets `targets`, default the family's) added
    by the family's own add_lora. The LoRA B matrices are drawn N(0, lora_b_std^2) instead of peft's zeros (a
    "fine-tuned" state: with B = 0 every lora_A gradient would vanish). Only the LoRA weights are parameters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_LATENT_UNET)
    embeddings = torch.randn(n_captions + 1, caption_length, TINY_LATENT_UNET["cross_attention_dim"])
    lora = {"rank": 2, "alpha": 2, **({} if targets is None else {"targets": list(targets)})}
    add_lora(unet, {"lora": lora}, seed)
    model = LatentDenoiser(unet, embeddings)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(lora_b_std * torch.randn(p.shape, generator=generator))
    return model.eval()


class DenseCurvature(Curvature):
    """Exact curvature from a dense symmetric matrix (e.g. the GGN of a tiny model), same interface as K-FAC."""

    def __init__(self, matrix: torch.Tensor, layout: ParamLayout, config: dict | None = None):
        matrix = matrix.double()
        values, self.vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
        self.values = values.clamp_min(0.0)
        self.layout, self.config = layout, dict(config or {})

    def eigenvalues(self) -> torch.Tensor:
        return self.values

    def to_eigenbasis(self, flat):
        return flat.double() @ self.vectors.to(flat.device)

    def from_eigenbasis(self, coords):
        return coords @ self.vectors.to(coords.device).T


class Float64Model(torch.nn.Module):
    """A float64 copy of a diffusers model for order-independence tests: float32 inputs (stored trajectories, images)
    are cast to float64 on the way in, so code that casts its inputs to float32 still computes in float64 throughout.
    diffusers keeps two float32 steps in a float64 model, both replaced: the sinusoidal timestep embedding and the
    attention softmax "upcast" (a downcast from float64; its rounding made batch sizes differ by ~5e-9 here)."""

    def __init__(self, model):
        from diffusers.models.attention_processor import Attention
        from diffusers.models.embeddings import Timesteps

        super().__init__()
        self.inner = copy.deepcopy(model).double()
        for name, module in list(self.inner.named_modules()):
            if isinstance(module, Attention):
                module.upcast_attention = module.upcast_softmax = False
            elif isinstance(module, Timesteps):
                parent, _, attribute = name.rpartition(".")
                setattr(self.inner.get_submodule(parent), attribute, _Float64Timesteps(module))
        self.train(model.training)

    def forward(self, x, t):
        return self.inner(x.double(), t)


class _Float64Timesteps(torch.nn.Module):
    """diffusers.models.embeddings.get_timestep_embedding (max_period 10000) in float64 instead of float32."""

    def __init__(self, timesteps):
        super().__init__()
        self.channels, self.flip, self.shift, self.scale = (
            timesteps.num_channels,
            timesteps.flip_sin_to_cos,
            timesteps.downscale_freq_shift,
            timesteps.scale,
        )

    def forward(self, t):
        half = self.channels // 2
        frequencies = torch.exp(
            -math.log(10000) * torch.arange(half, dtype=torch.float64, device=t.device) / (half - self.shift)
        )
        angles = self.scale * t[:, None].double() * frequencies[None]
        parts = [angles.cos(), angles.sin()] if self.flip else [angles.sin(), angles.cos()]
        return torch.nn.functional.pad(torch.cat(parts, dim=-1), (0, self.channels % 2))


@contextlib.contextmanager
def float64_default():
    """torch's default dtype float64 (projection matrices, noise draws) inside, restored afterwards. Its draws differ
    from float32 ones (same seeds, other values): features made inside match only others made inside."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def float64_gradient_atol(model, gradient) -> float:
    """How far two float64 evaluations of one of the model's per-example gradients (vmap vs autograd, other batches)
    may be apart: n_params eps64 max|g|, the rounding of a float64 sum as long as the model (longer than any reduction
    in its backward pass) over terms of the gradient's scale; ~1e-11 max|g|, 1e4 x the measured ~1e-15 max|g|. A
    gradient of another image, draw or parameter is O(max|g|) away."""
    n_params = sum(p.numel() for p in model.parameters())
    return n_params * torch.finfo(torch.float64).eps * float(gradient.abs().max())


def float64_projection_atol(gradients, matrix, reductions: int = 1):
    """How far two float64 evaluations of projected features gradients @ matrix (matrix: n_params x dim, as applied,
    e.g. a dense Projector's matrix / sqrt(dim)) may be apart, elementwise: n_params eps64 sum_k |g_k R_kj|, the
    worst-case rounding of a float64 sum of n_params products (~1e-9 |feature| for the tiny models; the gradients'
    own float64 rounding is ~1e-15 of their norm). `reductions` such sums in a row (e.g. a norm that weights the
    gradient) add up. A dropped timestep, another seed or query is O(|feature|) away."""
    n_params = matrix.shape[0]
    magnitude = gradients.double().abs() @ matrix.double().abs()
    return (reductions * n_params * torch.finfo(torch.float64).eps * magnitude).numpy()
