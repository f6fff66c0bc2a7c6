"""Test doubles, float64 references, dense references and tiny configurations shared by several test modules."""

import contextlib
import copy
import math

import torch

from workflow_scripts.core.curvature import Curvature, ParamLayout


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


# The tiny DDPM UNet the unit tests build (two blocks, attention on the second; a few thousand parameters).
TINY_MODEL = {
    "block_out_channels": [8, 16],
    "attention": [False, True],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}


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
