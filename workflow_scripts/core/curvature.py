"""K-FAC / EK-FAC curvature of the GGN of the diffusion training loss: its blocks, fitting with
curvlinops, storage and inverse-vector products (the `curvature` stage fits one variant per file).

The loss (docs/methods.md) is the mean over the N training examples of the simple loss, each estimated with
K Monte Carlo draws (t_k ~ U{0..T-1}, eps_k ~ N(0, I)) seeded per example:

    L(theta) = 1/N sum_i 1/K sum_k ||eps_ik - eps_theta(x_t_ik, t_ik)||^2 / D          (D = pixels)

Its GGN (Option 1 of the paper: linearise the network, keep the convex square loss) is

    G = 2 / (N K D) sum_{i,k} J_ik^T J_ik          (J_ik = d eps_theta(x_t_ik, t_ik) / d theta)

and this is exactly what curvlinops builds when every (example, draw) pair is one ROW of a batch, the
network output is flattened to (rows, D) and the loss is MSELoss(reduction="mean"): MSELoss(mean) over
all N*K rows and D outputs IS L, and curvlinops normalises by num_data = N*K rows (tests check G against
torch.autograd.functional.hessian of L for a denoiser that is linear in theta, where GGN = Hessian).
Variants:
- fisher_type "mc": MC-Fisher (paper eq. 10, recommended): one target per row sampled from N(eps_theta, 1/2)
  (fisher_mc_samples of them), so E[G_mc] = G. "empirical": uncentred covariance of the per-row loss
  gradients, curvlinops' convention 4/(N K D) sum J^T r r^T J (r = residual), which equals G in
  expectation when the residuals follow the model's Gaussian; note the paper's G_model averages the
  gradients over the K draws of an example BEFORE the outer product, which has no Kronecker-factored
  form; K-FAC of the per-draw version is what its K-FAC ablation can compute too. "type-2": the exact
  G (one backward pass per output pixel; for tests and tiny models).
- kfac_approx "expand" (recommended; the diffusion loss is an expand-type loss: one term per pixel)
  or "reduce" for weight-shared layers (convolutions, attention projections over positions).
- ekfac: eigenvalue-corrected K-FAC (curvlinops' EKFACLinearOperator, one more data pass): the
  eigenvalues in the K-FAC eigenbasis are replaced by the second moments of the per-row gradients
  in that basis, i.e. by the diagonal of the GGN in the K-FAC eigenbasis.

Layers: every nn.Linear and nn.Conv2d of the UNet (time embedding, resnets, attention projections
to_q/k/v/out, up/down samplers), weights and biases; GroupNorm and other normalisation parameters
are excluded (as in the paper, Appendix G), also from the gradients that the scores use.

Conditional models (class attribute `conditional`, forward(x_t, t, cond); families/latent.py): eps_theta also takes
each example's condition c_i (a caption index), the same for all its K draws; it rides in the rows as one more packed
column (PackedDenoiser, DrawBatches(cond=...)). The only parameters of the latent family are its LoRA adapters, so
the layers are the lora_A / lora_B Linear modules. Unconditional models get cond = None and are called model(x_t, t).

Damping: (G + lambda I)^-1 with lambda = relative_lambda * mean eigenvalue of G (trace / n_params of
the fitted K-FAC or EK-FAC), applied through the eigendecompositions of the Kronecker factors: one fit
serves every lambda. The paper's "damping 1e-8" is absolute for the mean-loss GGN; `absolute_damping`
converts.

curvlinops 3.0.1 trap: KFACLinearOperator(check_deterministic=True) already computes and caches the
Kronecker factors (the determinism check multiplies with the operator); compute_kronecker_factors()
then ADDS into the cache and doubles them. `_compute_factors_once` only computes when nothing is cached.

Speed: a fit is dominated by the input covariances (a (rows*positions, d_in) Gram matrix per layer and batch)
and, for EK-FAC, by rotating per-row gradients. FastKFACLinearOperator / FastEKFACLinearOperator (subclasses of
curvlinops' operators, used unless settings["fast_factors"] is False) compute the same factors and corrections
with one unfold, a symmetric rank-k update (scipy BLAS, threads bounded by threadpoolctl) and batched per-row
gradients; tests compare them with the stock classes.

Precision: the model, its activations and output gradients stay in its dtype (float32), but every Kronecker factor
is accumulated in float64 (float64 copies of a layer's inputs / output gradients, a bounded chunk of rows at a time,
_CHUNK_BYTES) and eigendecomposed in float64; the EK-FAC corrections are float64 sums of squares of float32
products (_CORRECTION_PRODUCTS: their rounding enters squared). A factor with fewer data rows than
dimensions is rank-deficient; accumulated in float32 its null space holds rounding noise of ~1e-7 x its norm, as
large as the smallest relative damping of the grid (1e-7), which tilts the eigenbasis and moves the scores by
tens of percent (tests/unit/scorers/test_kfac_precision.py, docs/methods.md).

The file (torch.save of plain tensors, lists and the config dict) stores the eigendecompositions of the
float64 factors, the K-FAC eigenvalues and, for EK-FAC, the corrected eigenvalues, plus the config
that made them; `load_curvature` refuses a file whose config differs from the expected one.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workflow_scripts.core.common import ArtefactError, generator, load_torch, save_torch
from workflow_scripts.core.contracts import config_hash, params_defaults

FILE_KIND = "kfac-curvature"


# 2: factors and EK-FAC corrections accumulated in float64; version 1 (float32 accumulation) is refused, i.e. refitted
FILE_VERSION = 2


FISHER_TYPES = ("mc", "empirical", "type-2")


KFAC_APPROX = ("expand", "reduce")


# Streams of seeds.gradients: every draw of this method comes from generator(seed, stream, index).
CURVATURE_STREAM, TRAIN_GRADIENT_STREAM, QUERY_GRADIENT_STREAM, LABEL_STREAM = 41, 42, 43, 44


CURVATURE_KEYS = ("fisher_type", "kfac_approx", "ekfac", "draws", "fisher_mc_samples", "separate_weight_and_bias")


DEFAULTS = {  # params.yaml's kfac settings of a fit; fast_factors (optional, absent there): curvlinops' factors faster
    **params_defaults(
        "kfac",
        ("fisher_type", "kfac_approx", "ekfac", "draws", "fisher_mc_samples", "separate_weight_and_bias", "batch_size"),
    ),
    "fast_factors": True,
}


# ----------------------------------------------------------------------------------------------------------------
# Model side: which parameters, and a single-tensor interface for curvlinops
# ----------------------------------------------------------------------------------------------------------------
def is_conditional(model: nn.Module) -> bool:
    """Whether the denoiser takes a condition per example, forward(x_t, t, cond) (class attribute `conditional`,
    e.g. families/latent.py's LatentDenoiser); unconditional models are called model(x_t, t)."""
    return bool(getattr(model, "conditional", False))


def denoise(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """eps_theta(x_t, t[, cond]) of a diffusers UNet2DModel (`.sample`) or of any module returning a tensor.

    cond: the per-row condition (LongTensor) of a conditional model, None for an unconditional one."""
    if cond is None:
        if is_conditional(model):
            raise ValueError("the model is conditional: denoise needs its condition (cond) per row")
        out = model(x_t, t)
    else:
        if not is_conditional(model):
            raise ValueError("a condition was given for an unconditional model")
        out = model(x_t, t, cond)
    return out.sample if hasattr(out, "sample") else out


def curvature_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear and Conv2d modules (attention projections included) that have parameters."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def curvature_param_names(model: nn.Module) -> list[str]:
    """Names of the parameters K-FAC covers, in module order (weight before bias): norm layers excluded."""
    names = []
    for mod_name, module in curvature_modules(model):
        for p_name in ("weight", "bias"):
            p = getattr(module, p_name, None)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


class PackedDenoiser(nn.Module):
    """forward(X) with X = [x_t flattened, t(, cond)] of shape (rows, D + 1 (+ 1)) -> eps_theta(x_t, t(, cond))
    flattened (rows, D).

    curvlinops feeds one tensor per batch and compares a 2d output with a 2d target; the timestep rides
    along as the last column (an integer < 2^24, exact in float32), followed, for a conditional model, by the
    condition (an integer index < 2^24: exact too).
    """

    def __init__(self, model: nn.Module, image_shape):
        super().__init__()
        self.model = model
        self.image_shape = tuple(int(s) for s in image_shape)
        self.conditional = is_conditional(model)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        extra = 2 if self.conditional else 1
        if packed.shape[1] != int(np.prod(self.image_shape)) + extra:
            raise ValueError(
                f"packed rows have {packed.shape[1]} columns, expected pixels + {extra} "
                f"({'t and cond' if self.conditional else 't'}) for images of shape {self.image_shape}"
            )
        x_t = packed[:, :-extra].reshape(-1, *self.image_shape)
        t = packed[:, -extra].round().long()
        cond = packed[:, -1].round().long() if self.conditional else None
        return denoise(self.model, x_t, t, cond).flatten(1)


def pack(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    columns = [x_t.flatten(1), t.to(x_t.dtype)[:, None]]
    if cond is not None:
        columns.append(cond.to(x_t.dtype)[:, None])
    return torch.cat(columns, dim=1)


def example_draws(index: int, k: int, image_shape, num_train_timesteps: int, seed: int, stream: int):
    """K (t, eps) draws of example `index`: a pure function of (seed, stream, index), independent of batching."""
    g = generator(seed, stream, index)
    t = torch.randint(0, num_train_timesteps, (k,), generator=g)
    eps = torch.randn(k, *image_shape, generator=g)
    return t, eps


def random_draws(n: int, k: int, image_shape, num_train_timesteps: int, seed: int, stream: int, start: int = 0):
    """Draws of examples start..start+n-1: t (n, K) long, eps (n, K, *image_shape)."""
    pairs = [example_draws(start + i, k, image_shape, num_train_timesteps, seed, stream) for i in range(n)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class DrawBatches:
    """Re-iterable (X, y) batches for curvlinops: one row per (example, draw), X = pack(x_t, t(, cond)), y = eps.

    cond: the per-example condition (n,) of a conditional model (None: unconditional), repeated for every draw.
    Rows are generated on the fly (nothing of size N*K is held); every pass yields the same batches.
    """

    def __init__(
        self,
        images: torch.Tensor,
        k: int,
        a_bar: torch.Tensor,
        seed: int,
        stream: int,
        batch_rows: int,
        cond: torch.Tensor | None = None,
    ):
        self.images, self.k, self.a_bar, self.seed, self.stream = images, int(k), a_bar.cpu(), seed, stream
        self.examples_per_batch = max(1, int(batch_rows) // self.k)
        self.cond = None if cond is None else torch.as_tensor(cond).long().cpu()
        if self.cond is not None and self.cond.shape != (len(images),):
            raise ValueError(f"cond has shape {tuple(self.cond.shape)}, expected one per image ({len(images)},)")
        if self.cond is not None and len(self.cond) and int(self.cond.abs().max()) >= 2**24:
            raise ValueError("conditions must be integers below 2^24 (packed exactly as float32)")

    @property
    def num_rows(self) -> int:
        return len(self.images) * self.k

    def __len__(self) -> int:
        return -(-len(self.images) // self.examples_per_batch)

    def __iter__(self):
        shape, T = self.images.shape[1:], len(self.a_bar)
        for start in range(0, len(self.images), self.examples_per_batch):
            x0 = self.images[start : start + self.examples_per_batch].cpu()
            t, eps = random_draws(len(x0), self.k, shape, T, self.seed, self.stream, start)
            t, eps = t.flatten(), eps.flatten(0, 1)
            x0 = x0.repeat_interleave(self.k, dim=0)
            a = self.a_bar[t].view(-1, *([1] * len(shape)))
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            cond = None
            if self.cond is not None:
                cond = self.cond[start : start + self.examples_per_batch].repeat_interleave(self.k, dim=0)
            yield pack(x_t, t, cond), eps.flatten(1)


# ----------------------------------------------------------------------------------------------------------------
# Curvature objects: eigenbasis, eigenvalues, preconditioning
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ParamLayout:
    """Order and shapes of the parameters in every flat (n, P) gradient matrix of this method."""

    names: list[str]
    shapes: list[tuple[int, ...]]

    def __post_init__(self):
        self.shapes = [tuple(int(s) for s in shape) for shape in self.shapes]
        sizes = [int(np.prod(s)) if len(s) else 1 for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
        self.index = {name: i for i, name in enumerate(self.names)}

    @property
    def n_params(self) -> int:
        return self.offsets[-1]

    def slice(self, name: str) -> slice:
        i = self.index[name]
        return slice(self.offsets[i], self.offsets[i + 1])

    @classmethod
    def of(cls, model: nn.Module, names: list[str] | None = None) -> ParamLayout:
        params = dict(model.named_parameters())
        names = curvature_param_names(model) if names is None else names
        return cls(list(names), [tuple(params[n].shape) for n in names])

    def to_dict(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}


class Curvature:
    """A PSD curvature matrix in an orthonormal eigenbasis: apply (C + damping I)^-1 to flat gradients."""

    layout: ParamLayout
    config: dict

    def eigenvalues(self) -> torch.Tensor:  # (P,) float64 in eigen-coordinate order
        raise NotImplementedError

    def to_eigenbasis(self, flat: torch.Tensor) -> torch.Tensor:  # (n, P) -> (n, P)
        raise NotImplementedError

    def from_eigenbasis(self, coords: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean_eigenvalue(self) -> float:
        return float(self.eigenvalues().sum() / self.layout.n_params)

    def absolute_damping(self, relative_lambda: float) -> float:
        return float(relative_lambda) * self.mean_eigenvalue()

    def precondition(self, flat: torch.Tensor, relative_lambda: float) -> torch.Tensor:
        """(C + lambda I)^-1 flat, lambda = relative_lambda * mean eigenvalue; float64."""
        coords = self.to_eigenbasis(flat.double())
        return self.from_eigenbasis(
            coords / (self.eigenvalues().to(coords.device) + self.absolute_damping(relative_lambda))
        )

    def dense(self) -> torch.Tensor:
        """The (P, P) matrix (tests and tiny models only)."""
        basis = self.to_eigenbasis(torch.eye(self.layout.n_params, dtype=torch.float64))  # = V (P, P)
        return (basis * self.eigenvalues()) @ basis.T


@dataclass
class Block:
    """One Kronecker block: a layer's weight (flattened to d_out x d_in) and/or bias (one more column).

    K-FAC approximates the block by A (x) G acting on vec(M) of the block matrix M (d_out, d_in'):
    G M A in matrix form, with A = input covariance (d_in', d_in') and G = output-gradient covariance.
    """

    module: str
    weight: str | None
    bias: str | None
    d_out: int
    d_in: int  # columns of the weight part (0 if the block has no weight)
    a_vecs: torch.Tensor  # (d_in', d_in') eigenvectors of A; [[1]] for a bias-only block
    a_vals: torch.Tensor
    g_vecs: torch.Tensor  # (d_out, d_out)
    g_vals: torch.Tensor
    corrected: torch.Tensor | None = None  # EK-FAC eigenvalues (d_out, d_in')
    use_corrected: bool = field(default=True, repr=False)

    @property
    def cols(self) -> int:
        return self.d_in + (1 if self.bias is not None else 0)

    @property
    def size(self) -> int:
        return self.d_out * self.cols

    def eigenvalues(self) -> torch.Tensor:
        if self.corrected is not None and self.use_corrected:
            return self.corrected
        return torch.outer(self.g_vals, self.a_vals)

    def to_dict(self) -> dict:
        return {
            "module": self.module,
            "weight": self.weight,
            "bias": self.bias,
            "d_out": self.d_out,
            "d_in": self.d_in,
            "a_vecs": self.a_vecs,
            "a_vals": self.a_vals,
            "g_vecs": self.g_vecs,
            "g_vals": self.g_vals,
            "corrected": self.corrected,
        }


class KFACCurvature(Curvature):
    """Block-diagonal K-FAC / EK-FAC in the Kronecker eigenbasis Q_G (x) Q_A of every block."""

    def __init__(self, blocks: list[Block], layout: ParamLayout, config: dict):
        self.blocks, self.layout, self.config = blocks, layout, dict(config)
        covered = sorted(n for b in blocks for n in (b.weight, b.bias) if n is not None)
        if covered != sorted(layout.names):
            raise ValueError("K-FAC blocks do not cover exactly the parameters of the layout")

    @property
    def is_ekfac(self) -> bool:
        return all(b.corrected is not None for b in self.blocks)

    def kfac_view(self) -> KFACCurvature:
        """The plain K-FAC eigenvalues of an EK-FAC fit (same eigenbasis)."""
        blocks = [Block(**{**b.to_dict(), "corrected": None}) for b in self.blocks]
        return KFACCurvature(blocks, self.layout, {**self.config, "ekfac": False})

    def eigenvalues(self) -> torch.Tensor:
        return torch.cat([b.eigenvalues().flatten() for b in self.blocks])

    def _gather(self, flat: torch.Tensor, b: Block) -> torch.Tensor:
        parts = []
        if b.weight is not None:
            parts.append(flat[:, self.layout.slice(b.weight)].reshape(len(flat), b.d_out, b.d_in))
        if b.bias is not None:
            parts.append(flat[:, self.layout.slice(b.bias)].reshape(len(flat), b.d_out, 1))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def to_eigenbasis(self, flat):
        out = []
        for b in self.blocks:
            m = self._gather(flat, b).to(b.g_vecs.dtype)
            out.append((b.g_vecs.T.to(m.device) @ m @ b.a_vecs.to(m.device)).flatten(1))
        return torch.cat(out, dim=1)

    def from_eigenbasis(self, coords):
        flat = coords.new_zeros(len(coords), self.layout.n_params)
        offset = 0
        for b in self.blocks:
            m = coords[:, offset : offset + b.size].reshape(len(coords), b.d_out, b.cols)
            offset += b.size
            m = b.g_vecs.to(m.device) @ m @ b.a_vecs.T.to(m.device)
            if b.weight is not None:
                flat[:, self.layout.slice(b.weight)] = m[:, :, : b.d_in].flatten(1)
            if b.bias is not None:
                flat[:, self.layout.slice(b.bias)] = m[:, :, -1]
        return flat

    def save(self, path: str | Path) -> None:
        save_torch(
            {
                "kind": FILE_KIND,
                "version": FILE_VERSION,
                "config": self.config,
                "layout": self.layout.to_dict(),
                "blocks": [b.to_dict() for b in self.blocks],
            },
            path,
        )


def config_differences(stored: dict, expected: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(stored) | set(expected))
    out = []
    for k in keys:
        a, b = stored.get(k, "<missing>"), expected.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: file {a!r}, expected {b!r}")
    return out


def load_curvature(path: str | Path, expected_config: dict | None = None) -> KFACCurvature:
    """Load a saved fit; with expected_config, refuse a file made by any other configuration."""
    payload = load_torch(path)
    if not isinstance(payload, dict) or payload.get("kind") != FILE_KIND or payload.get("version") != FILE_VERSION:
        found = payload.get("version") if isinstance(payload, dict) and payload.get("kind") == FILE_KIND else None
        hint = (
            f" (version {found}: factors accumulated in float32, too coarse at small damping; rerun the curvature "
            "rule to refit it)"
            if found == 1
            else ""
        )
        raise ArtefactError(f"{path}: not a version-{FILE_VERSION} K-FAC curvature file of this workflow{hint}")
    if expected_config is not None:
        diff = config_differences(payload["config"], expected_config)
        if diff:
            raise ArtefactError(f"{path}: made by a different configuration ({'; '.join(diff[:8])})")
    layout = ParamLayout(payload["layout"]["names"], [tuple(s) for s in payload["layout"]["shapes"]])
    return KFACCurvature([Block(**b) for b in payload["blocks"]], layout, payload["config"])


# ----------------------------------------------------------------------------------------------------------------
# Fitting with curvlinops
# ----------------------------------------------------------------------------------------------------------------
_SYRK = {"enabled": False}


@contextlib.contextmanager
def _limited_blas():
    """Let _gram use scipy's BLAS syrk, with scipy's BLAS held to torch's thread count (left alone, OpenBLAS
    starts one thread per core and oversubscribes shared machines: several times slower, measured)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # no way to bound scipy's threads: stay with torch's matmul
        yield
        return
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        _SYRK["enabled"] = True
        try:
            yield
        finally:
            _SYRK["enabled"] = False


# Rows of a layer's inputs / output gradients cast to float64 at a time: bounds the extra memory of the float64
# accumulation (16 MiB of float64 copies, a few times that in intermediates) whatever the batch, layer width or positions.
_CHUNK_BYTES = 16 * 2**20


# The Gram's float64 chunks are smaller still: a chunk cast and then read by the rank-k update while it is in the
# CPU's cache is ~20 % faster than 16 MiB chunks (d_in 289-577, measured side by side; same sums up to order).
_GRAM_CHUNK_BYTES = 2 * 2**20


def _row_chunks(n_rows: int, row_bytes: int, budget: int | None = None):
    step = max(1, min(_CHUNK_BYTES, budget or _CHUNK_BYTES) // max(1, row_bytes))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x^T x and the column sums of a (rows, d) matrix of any float dtype, in float64, cast a chunk of rows at a time.

    float64 because a rank-deficient factor's null space must stay at ~1e-16 of its norm: float32 products and sums
    leave ~1e-7 there, as large as the smallest damping of the grid (docs/methods.md). On CPU a symmetric rank-k
    update (half the flops of a GEMM)."""
    d = x.shape[1]
    col = torch.zeros(d, dtype=torch.float64, device=x.device)
    syrk = _SYRK["enabled"] and x.device.type == "cpu"
    if syrk:
        from scipy.linalg.blas import dsyrk

        upper = np.zeros((d, d), dtype=np.float64, order="F")  # summed in place by the BLAS (beta = 1)
    else:
        out = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for rows in _row_chunks(x.shape[0], 8 * d, _GRAM_CHUNK_BYTES):
        chunk = x[rows].to(torch.float64)
        col += chunk.sum(0)
        if syrk:
            upper = dsyrk(1.0, chunk.contiguous().numpy().T, beta=1.0, c=upper, trans=0, lower=0, overwrite_c=1)
        else:
            out += chunk.T @ chunk
    if syrk:  # only the upper triangle was summed
        out = torch.from_numpy(np.triu(upper) + np.triu(upper, 1).T)
    return out, col


def _float64_kfac_class():
    """curvlinops' KFACLinearOperator with its Kronecker factors accumulated in float64 (curvlinops accumulates in
    the model's dtype): its own hooks run on float64 copies of a layer's inputs and output gradients (one layer and
    batch at a time). Products with the operator (its determinism check) take and return the model's dtype."""
    from curvlinops import KFACLinearOperator

    class Float64KFACLinearOperator(KFACLinearOperator):
        def _hook_accumulate_input_covariance(self, module, inputs, module_name):
            inputs = tuple(x.to(torch.float64) for x in inputs)
            return super()._hook_accumulate_input_covariance(module, inputs, module_name)

        def _accumulate_gradient_covariance(self, grad_output, module, module_name):
            return super()._accumulate_gradient_covariance(grad_output.to(torch.float64), module, module_name)

        def _matmat(self, M):
            out = super()._matmat([m.to(torch.float64) for m in M])
            return [o.to(m.dtype) for o, m in zip(out, M)]

    return Float64KFACLinearOperator


def _fast_kfac_class():
    """_float64_kfac_class() whose K-FAC-expand covariances (the cost of a fit: one (rows*positions, d_in)^T
    (rows*positions, d_in) product per layer and batch) are computed with one unfold and a chunked float64
    symmetric rank-k update (_gram) instead of curvlinops' patch rearrangements and a full GEMM. Same factors
    (tested against the stock class); every other case is delegated to curvlinops (in float64)."""
    from curvlinops.kfac import KFACType

    class FastKFACLinearOperator(_float64_kfac_class()):
        def _hook_accumulate_input_covariance(self, module, inputs, module_name):
            conv = isinstance(module, nn.Conv2d)
            if (
                self._kfac_approx != KFACType.EXPAND
                or len(inputs) != 1
                or (conv and (module.groups != 1 or isinstance(module.padding, str)))
            ):
                return super()._hook_accumulate_input_covariance(module, inputs, module_name)
            x = inputs[0].data.detach()
            if conv:
                u = nn.functional.unfold(
                    x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
                )  # (batch, c_in * k1 * k2, positions)
                positions, x = u.shape[2], u.transpose(1, 2).reshape(-1, u.shape[1])
            else:
                positions, x = x.shape[1:-1].numel(), x.reshape(-1, x.shape[-1])
            gram, col = _gram(x)
            params = self._mapping[module_name]
            if "weight" in params and "bias" in params and not self._separate_weight_and_bias:
                d = x.shape[1]  # homogeneous coordinates [x, 1] without materialising them
                full = gram.new_empty(d + 1, d + 1)
                full[:d, :d], full[:d, d], full[d, :d], full[d, d] = gram, col, col, x.shape[0]
                gram = full
            self._input_covariances = self._set_or_add_(
                self._input_covariances, module_name, gram.div_(self._N_data * positions)
            )

        def _accumulate_gradient_covariance(self, grad_output, module, module_name):
            if self._kfac_approx != KFACType.EXPAND:
                return super()._accumulate_gradient_covariance(grad_output, module, module_name)
            g = grad_output.data.detach()
            batch = g.shape[0]
            g = g.movedim(1, -1) if isinstance(module, nn.Conv2d) else g  # channels last
            correction = {  # curvlinops' scale of the loss reduction
                "sum": 1.0 / self._mc_samples,
                "mean": (batch * self._num_per_example_loss_terms) ** 2
                / (self._N_data * self._mc_samples * self._num_per_example_loss_terms),
            }[self._loss_func.reduction]
            covariance = _gram(g.reshape(-1, g.shape[-1]))[0].mul_(correction)
            self._gradient_covariances = self._set_or_add_(self._gradient_covariances, module_name, covariance)

    return FastKFACLinearOperator


def _float64_ekfac_class():
    """curvlinops' EKFACLinearOperator with the eigenvalue corrections accumulated in float64 (float64 copies of a
    layer's cached inputs and output gradients, one layer and batch at a time; give it float64 eigenvectors)."""
    from curvlinops import EKFACLinearOperator

    class Float64EKFACLinearOperator(EKFACLinearOperator):
        def _accumulate_corrected_eigenvalues(self, grad_output, module, module_name):
            cached = self._cached_activations.get(module_name)
            if cached is not None:  # restored after: with several MC samples the same inputs serve every backward
                self._cached_activations[module_name] = cached.to(torch.float64)
            try:
                return super()._accumulate_corrected_eigenvalues(grad_output.to(torch.float64), module, module_name)
            finally:
                if cached is not None:
                    self._cached_activations[module_name] = cached

    return Float64EKFACLinearOperator


# EK-FAC correction, rows x (d_out x positions) output gradients and (d_in x positions) inputs: forming each row's
# weight gradient and rotating it costs d_out P d_in + d_out^2 d_in + d_out d_in^2 flops per row; rotating the two
# sides first and multiplying them, d_out^2 P + P d_in^2 + d_out P d_in. "auto" takes the cheaper (the second where
# a layer has few positions: the 4x4 levels, attention over few tokens); tests force each.
_EKFAC_ORDER = "auto"


def _rotate_first(d_out: int, positions: int, d_in: int) -> bool:
    if _EKFAC_ORDER != "auto":
        return _EKFAC_ORDER == "rotate_first"
    form_then_rotate = d_out * positions * d_in + d_out * d_out * d_in + d_out * d_in * d_in
    rotate_then_form = d_out * d_out * positions + positions * d_in * d_in + d_out * positions * d_in
    return rotate_then_form < form_then_rotate


# EK-FAC correction: each row's rotated gradient coordinate r = q_g^T (g x^T) q_a is formed in the model's dtype
# (float32) and only its square is summed in float64. Unlike a Kronecker factor, whose float32 entries carry
# rounding ~eps32 x its norm straight into its null space, a corrected eigenvalue is a sum of SQUARES: a coordinate
# that is exactly 0 (a null direction of a factor) comes out as ~eps32 x |g||x| and contributes ~eps32^2 x |g|^2|x|^2,
# ~1e-14 of the largest corrected eigenvalue, far below the smallest damping (1e-7 x their mean). "float64" forms
# the products in float64 too (the reference in tests; 1.8-2.4x the CPU time of the float32 correction pass,
# benchmarks/README.md).
_CORRECTION_PRODUCTS = "model"


def _correction_dtype(model_dtype: torch.dtype) -> torch.dtype:
    if _CORRECTION_PRODUCTS == "float64" or model_dtype == torch.float64:
        return torch.float64
    return torch.float32  # float32 models, and half / bfloat16 ones (whose products would lose too much)


def _fast_ekfac_class():
    """_float64_ekfac_class() whose eigenvalue correction forms each row's weight gradient with one batched matmul
    (output gradients x unfolded inputs, a chunk of rows at a time, in _correction_dtype) and rotates that, or, where
    a layer has few positions, rotates both sides first and multiplies them (_rotate_first), instead of rotating every
    position's inputs (curvlinops' einsum path): the same corrected eigenvalues (tested against the stock class),
    fewer flops."""

    class FastEKFACLinearOperator(_float64_ekfac_class()):
        def _accumulate_corrected_eigenvalues(self, grad_output, module, module_name):
            conv = isinstance(module, nn.Conv2d)
            if conv and (module.groups != 1 or isinstance(module.padding, str)):
                return super()._accumulate_corrected_eigenvalues(grad_output, module, module_name)
            g = grad_output.data.detach()
            batch = g.shape[0]
            g = g.flatten(2) if conv else g.reshape(batch, -1, g.shape[-1]).transpose(1, 2)  # (batch, d_out, positions)
            terms = batch * self._num_per_example_loss_terms
            correction = {
                "sum": 1.0 / self._mc_samples,
                "mean": terms**2 / (self._N_data * self._mc_samples * self._num_per_example_loss_terms),
            }[self._loss_func.reduction]
            pos = self._mapping[module_name]
            # Products in the model's dtype, sums of squares in float64 (see _CORRECTION_PRODUCTS)
            work = _correction_dtype(g.dtype)
            q_g = self._gradient_covariances_eigenvectors[module_name].to(work)
            q_a = self._input_covariances_eigenvectors.get(module_name)
            q_a = None if q_a is None else q_a.to(work)
            x = None
            if "weight" in pos:
                x = self._cached_activations[module_name]
                if conv:  # (batch, c_in * k1 * k2, positions)
                    x = nn.functional.unfold(
                        x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
                    )
                else:
                    x = x.reshape(batch, -1, x.shape[-1]).transpose(1, 2)
            joint = "weight" in pos and "bias" in pos and not self._separate_weight_and_bias
            cols = (x.shape[1] if x is not None else 0) + 1
            first = x is not None and _rotate_first(g.shape[1], g.shape[2], x.shape[1] + joint)
            sums = {}
            for rows in _row_chunks(batch, 8 * g.shape[1] * cols):
                gc = g[rows].to(work)
                xc = None if x is None else x[rows].to(work)
                if joint:  # the bias is the weight of a constant input 1: (W | b) = g (x | 1)^T
                    xc = torch.cat([xc, xc.new_ones(xc.shape[0], 1, xc.shape[2])], dim=1)
                if first:  # Q_g^T (g x^T) Q_a = (Q_g^T g)(x^T Q_a): rotate both sides, then one product per row
                    rotated_weight = torch.matmul(q_g.T, gc) @ (xc.transpose(1, 2) @ q_a)
                elif xc is not None:  # each row's weight gradient (rows, d_out, d_in), then rotated
                    rotated_weight = q_g.T @ torch.bmm(gc, xc.transpose(1, 2)) @ q_a
                if joint:
                    parts = {"joint": rotated_weight}
                else:  # a separate bias: each row's bias gradient (the output gradients summed over positions)
                    parts = {p: rotated_weight if p == "weight" else gc.sum(2) @ q_g for p in pos}
                for key, rotated in parts.items():
                    value = rotated.square_().sum(0).to(torch.float64)  # positive terms: float32 sums lose ~eps32
                    sums[key] = value if key not in sums else sums[key].add_(value)
            if joint:
                self._corrected_eigenvalues = self._set_or_add_(
                    self._corrected_eigenvalues, module_name, sums["joint"].mul_(correction)
                )
                return
            self._corrected_eigenvalues.setdefault(module_name, {})
            for p_name, p_pos in pos.items():
                self._corrected_eigenvalues[module_name] = self._set_or_add_(
                    self._corrected_eigenvalues[module_name], p_pos, sums[p_name].mul_(correction)
                )

    return FastEKFACLinearOperator


def _compute_factors_once(op) -> None:
    """Compute K-FAC's factors unless the operator already cached them (the check_deterministic trap)."""
    if not (op._input_covariances or op._gradient_covariances):
        op.compute_kronecker_factors()


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = matrix.detach().double().cpu()
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return values.clamp_min(0.0), vectors


def kfac_from_data(
    model_func: nn.Module,
    param_names: list[str],
    data,
    num_rows: int,
    settings: dict,
    seed: int,
    config: dict | None = None,
    check_deterministic: bool = False,
    progressbar: bool = False,
    prefix: str = "",
) -> KFACCurvature:
    """Fit K-FAC (and EK-FAC if settings['ekfac']) of MSELoss(mean) on 2d outputs of model_func over `data`.

    param_names are names in model_func.named_parameters(); `prefix` is stripped from them (and from module
    names) in the result, e.g. "model." for a PackedDenoiser.
    """
    s = {**DEFAULTS, **settings}
    if s["fisher_type"] not in FISHER_TYPES:
        raise ValueError(f"fisher_type {s['fisher_type']!r} is not one of {FISHER_TYPES}")
    if s["kfac_approx"] not in KFAC_APPROX:
        raise ValueError(f"kfac_approx {s['kfac_approx']!r} is not one of {KFAC_APPROX}")
    named = dict(model_func.named_parameters())
    params = [named[n] for n in param_names]
    kwargs = dict(
        fisher_type=s["fisher_type"],
        mc_samples=int(s["fisher_mc_samples"]) if s["fisher_type"] == "mc" else 1,
        kfac_approx=s["kfac_approx"],
        num_per_example_loss_terms=1,
        separate_weight_and_bias=bool(s["separate_weight_and_bias"]),
        num_data=int(num_rows),
        seed=int(seed),
        progressbar=progressbar,
    )
    loss = nn.MSELoss(reduction="mean")
    op_class = _fast_kfac_class() if s.get("fast_factors", True) else _float64_kfac_class()
    with _limited_blas():
        op = op_class(model_func, loss, params, data, check_deterministic=check_deterministic, **kwargs)
        _compute_factors_once(op)
    mapping = op._mapping  # module name -> {"weight"/"bias": position in params}
    eig_a = {m: _eigh(op._input_covariances[m]) for m in mapping if m in op._input_covariances}
    eig_g = {m: _eigh(op._gradient_covariances[m]) for m in mapping}
    corrected = {}
    if s["ekfac"]:
        # One more pass with curvlinops' EK-FAC, in OUR eigenbasis (float64 eigh of the float64 factors above),
        # the corrections accumulated in float64 too.
        ek_class = _fast_ekfac_class() if s.get("fast_factors", True) else _float64_ekfac_class()
        ek = ek_class(model_func, loss, params, data, check_deterministic=False, **kwargs)
        device = params[0].device
        ek._input_covariances_eigenvectors = {m: v.to(device) for m, (_, v) in eig_a.items()}
        ek._gradient_covariances_eigenvectors = {m: v.to(device) for m, (_, v) in eig_g.items()}
        ek.compute_eigenvalue_correction()
        corrected = ek._corrected_eigenvalues
    joint = not s["separate_weight_and_bias"]
    strip = lambda n: n[len(prefix) :] if prefix and n.startswith(prefix) else n
    blocks = []
    for mod_name, pos in mapping.items():
        module = model_func.get_submodule(mod_name)
        w = f"{mod_name}.weight" if "weight" in pos else None
        b = f"{mod_name}.bias" if "bias" in pos else None
        d_out = module.weight.shape[0] if w else module.bias.shape[0]
        d_in = int(np.prod(module.weight.shape[1:])) if w else 0
        g_vals, g_vecs = eig_g[mod_name]
        one = (torch.ones(1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
        corr = corrected.get(mod_name)
        if joint or w is None or b is None:
            a_vals, a_vecs = eig_a[mod_name] if w else one
            c = None
            if corr is not None:
                c = (
                    corr
                    if isinstance(corr, torch.Tensor)
                    else torch.cat([corr[pos[k]].reshape(d_out, -1) for k in ("weight", "bias") if k in pos], dim=1)
                )
                c = c.detach().double().cpu().reshape(d_out, -1)
            blocks.append(
                Block(
                    strip(mod_name),
                    strip(w) if w else None,
                    strip(b) if b else None,
                    d_out,
                    d_in,
                    a_vecs,
                    a_vals,
                    g_vecs,
                    g_vals,
                    c,
                )
            )
        else:  # separate weight and bias blocks
            a_vals, a_vecs = eig_a[mod_name]
            cw = None if corr is None else corr[pos["weight"]].detach().double().cpu().reshape(d_out, d_in)
            cb = None if corr is None else corr[pos["bias"]].detach().double().cpu().reshape(d_out, 1)
            blocks.append(Block(strip(mod_name), strip(w), None, d_out, d_in, a_vecs, a_vals, g_vecs, g_vals, cw))
            blocks.append(Block(strip(mod_name), None, strip(b), d_out, 0, *one[::-1], g_vecs, g_vals, cb))
    layout = ParamLayout([strip(n) for n in param_names], [tuple(named[n].shape) for n in param_names])
    return KFACCurvature(blocks, layout, config or {})


def images_digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.float32).tobytes()).hexdigest()[:16]


def conditions_digest(cond: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(cond, dtype=np.int64).tobytes()).hexdigest()[:16]


def curvature_config(
    settings: dict,
    diffusion_cfg: dict,
    seed: int,
    images: np.ndarray,
    extra: dict | None = None,
    cond: np.ndarray | None = None,
) -> dict:
    """Everything a fit depends on (batch_size and fast_factors excluded: they change only float rounding).
    cond: the training examples' conditions of a conditional model (None: unconditional, no entry)."""
    s = {**DEFAULTS, **settings}
    conditions = {} if cond is None else {"conditions": conditions_digest(cond)}
    return {
        "kfac": {k: s[k] for k in CURVATURE_KEYS},
        "diffusion": dict(diffusion_cfg),
        "seed": int(seed),
        "n_train": int(len(images)),
        "images": images_digest(images),
        **conditions,
        **(extra or {}),
    }


def checkpoint_identity(payload: dict, model_cfg: dict) -> dict:
    """What identifies the model a curvature belongs to (stored in the file's config)."""
    return {"model": model_cfg, "checkpoint": config_hash({"identity": payload["config"], "step": payload["step"]})}


def settings_from(config: dict, args=None) -> dict:
    s = {**DEFAULTS, **config.get("kfac", {})}
    for key in ("fisher_type", "kfac_approx", "ekfac"):
        value = getattr(args, key, None) if args is not None else None
        if value is not None:
            s[key] = value
    return s
