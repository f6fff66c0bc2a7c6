"""NDA, nonparametric data attribution: patch posteriors of the empirical optimal denoiser (no model, no gradient).

From "Nonparametric Data Attribution for Diffusion Models" (Zhao, Du, Zheng, Pang, Lin; ICML 2026, arXiv
2510.14269). The optimal denoiser of a diffusion model trained on a finite set {z_i} is a posterior mean over the
training images; its weights say which training images a noisy query is explained by. NDA takes those weights
patch by patch, at one noise level, and sums them per training image.

Definition (what `nda_scores` computes). Noise the query x once, in the variance-exploding form
y = x + sigma * eps (the DDPM form a * x + s * eps gives the same weights with sigma = s / a, since
||a x + s eps - a z||^2 / (2 s^2) = ||y - z||^2 / (2 sigma^2)). Cut y and every training image z_i into k x k
patches at every stride-th position of the image zero-padded by (k - 1) // 2 on each side; let y_p be the query's
patch at position p and z_{i,r} training image i's patch at position r. A patch that overhangs the border matches only
patches overhanging it in the same way (the padding pattern of p and r agree; the published code does this with a
large penalty on padded pixels, which in practice is the same hard rule). For every query patch, the posterior over
ALL patches of ALL training images is

    w[p, (i, r)] = softmax_{(j, r') : pattern(r') = pattern(p)} ( -||P y_p - P z_{j,r'}||^2 / (2 sigma^2) )

and the score of training image i is S[q, i] = sum_p sum_{r in top-k_r w[p, (i, r)]} w[p, (i, r)]: the posterior mass
image i receives, summed over the query's patches (top-k: only the k heaviest positions of image i count for each
query patch; none = all). P is the identity at the original scale; a coarser scale (`pool` f) replaces each f x f
block of the patch by its sum / f (orthonormal rows: the distance of the f-times downscaled patches, times f^2), so
the same patch position compares coarser content. Several scales add their scores with their `weight`
(the paper's two-scale form: alpha * original + (1 - alpha) * downscaled). Scores are averaged over `noise_draws`
noise draws; one draw eps is shared by every query (as in the published code), so a query's scores do not depend
on the other queries.

Noise level: `timesteps` are DDPM timesteps t of the paper's schedule (1,000 steps, betas linear from 1e-4 to
0.02): sigma_t = sqrt((1 - abar_t) / abar_t). They are the method's lambda grid: with several, the one with the best
TUNING LDS is kept (the softmax temperature 2 sigma^2 is the method's one free scale). Paper defaults (CIFAR-2,
32 x 32): t = 100, patch 7, top-k 100, stride 1; two-scale: patch 14 at the original scale and patch 10 pooled 2x,
alpha 0.5.

`space: images` (default) compares images (the latent family: the data images and the generated queries'
decodings); `space: inputs` the model inputs (the latent family: the VAE latents)."""

from __future__ import annotations

import numpy as np

from workflow_scripts.scorers.base import POSINT, Scorer, method_schema

NUM_TRAIN_TIMESTEPS, BETA_START, BETA_END = 1000, 1e-4, 0.02  # the paper's DDPM schedule (linear betas)
CHUNK_BYTES = 32 * 2**20  # float64 bytes of one query's logits against one chunk of training images

SCALE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["patch_size"],
    "properties": {
        "patch_size": POSINT,
        "pool": POSINT,  # 1 (default): original scale; f: each f x f block of the patch pooled
        "weight": {"type": "number", "exclusiveMinimum": 0},  # default 1
    },
}


def sigma_of_timestep(t: int) -> float:
    """sigma = s / a of DDPM timestep t (0-based, as diffusers' alphas_cumprod[t]) on the paper's schedule."""
    if not 0 <= t < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"timestep {t} is outside 0..{NUM_TRAIN_TIMESTEPS - 1} of the DDPM schedule")
    abar = np.prod(1.0 - np.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS)[: t + 1])
    return float(np.sqrt((1.0 - abar) / abar))


def _patches(images: np.ndarray, k: int, stride: int, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, L, d) float64 patch vectors (pooled when pool > 1) and the (L,) padding-pattern id of each position."""
    n, c, h, w = images.shape
    pad = (k - 1) // 2
    padded = np.pad(np.asarray(images, dtype=np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    inside = np.pad(np.ones((h, w), dtype=bool), pad)
    win = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    ho, wo = win.shape[2:4]
    patches = win.transpose(0, 2, 3, 1, 4, 5)  # (n, ho, wo, c, k, k)
    if pool > 1:  # block sums / pool: orthonormal rows, ||P(a - b)||^2 = pool^2 ||avgpool(a) - avgpool(b)||^2
        patches = patches.reshape(n, ho, wo, c, k // pool, pool, k // pool, pool).sum(axis=(5, 7)) / pool
    masks = np.lib.stride_tricks.sliding_window_view(inside, (k, k))[::stride, ::stride].reshape(ho * wo, k * k)
    _, pattern = np.unique(masks, axis=0, return_inverse=True)
    return patches.reshape(n, ho * wo, -1), pattern.reshape(-1)


def _scale_scores(
    noisy: np.ndarray, train: np.ndarray, sigma: float, k: int, pool: int, stride: int, topk: int | None
) -> np.ndarray:
    """(n_query, n_train) summed patch posterior mass of one scale (module docstring).

    The training set is read in chunks of images so that one query's block of logits (positions x chunk x
    positions) stays near CHUNK_BYTES: a first pass over the chunks gives each query patch's log normaliser, the
    second its weights."""
    _, pattern = _patches(train[:1], k, stride, pool)
    n_pos, n_train = len(pattern), len(train)
    compatible = pattern[:, None] == pattern[None, :]  # (L query positions, L training positions)
    keep = n_pos if topk is None else min(topk, n_pos)
    step = max(1, CHUNK_BYTES // (8 * n_pos * n_pos))
    chunks = [slice(start, min(start + step, n_train)) for start in range(0, n_train, step)]

    def chunk_patches(rows):
        patches = _patches(train[rows], k, stride, pool)[0]
        flat = patches.reshape(-1, patches.shape[-1])
        return flat, (flat**2).sum(axis=1)

    cached = [chunk_patches(chunks[0])] if len(chunks) == 1 else None

    def logits_of(x, rows):
        flat, norm = cached[0] if cached else chunk_patches(rows)
        dist = (x**2).sum(axis=1)[:, None] + norm[None, :] - 2.0 * x @ flat.T
        logits = (-np.maximum(dist, 0.0) / (2.0 * sigma**2)).reshape(len(x), rows.stop - rows.start, n_pos)
        return np.where(compatible[:, None, :], logits, -np.inf)

    q_patches, _ = _patches(noisy, k, stride, pool)
    scores = np.zeros((len(noisy), n_train))
    for q, x in enumerate(q_patches):
        lse = np.full(n_pos, -np.inf)
        for rows in chunks:  # every position has a compatible match in every image: itself
            logits = logits_of(x, rows)
            top = logits.max(axis=(1, 2))
            lse = np.logaddexp(lse, top + np.log(np.exp(logits - top[:, None, None]).sum(axis=(1, 2))))
        for rows in chunks:
            weights = np.exp(logits_of(x, rows) - lse[:, None, None])
            if keep < n_pos:
                weights = np.partition(weights, n_pos - keep, axis=2)[:, :, n_pos - keep :]
            scores[q, rows] = weights.sum(axis=(0, 2))
    return scores


def nda_scores(
    queries: np.ndarray,
    train: np.ndarray,
    sigma: float,
    noise: np.ndarray,
    scales: list[dict],
    stride: int = 1,
    topk: int | None = None,
) -> np.ndarray:
    """(n_query, n_train) float64 NDA scores of (n, C, H, W) queries against training images, at noise level sigma
    with the noise draw `noise` (C, H, W) shared by every query (module docstring)."""
    queries, train = np.asarray(queries, dtype=np.float64), np.asarray(train, dtype=np.float64)
    if queries.shape[1:] != train.shape[1:] or noise.shape != train.shape[1:]:
        raise ValueError(
            f"queries {queries.shape[1:]}, training images {train.shape[1:]} and noise {noise.shape} differ in shape"
        )
    noisy = queries + sigma * noise[None]
    total = np.zeros((len(queries), len(train)))
    for scale in scales:
        k, pool = scale["patch_size"], scale.get("pool", 1)
        total += scale.get("weight", 1.0) * _scale_scores(noisy, train, sigma, k, pool, stride, topk)
    return total


def compute(method_cfg: dict, inputs, lambdas) -> list:
    if method_cfg.get("space", "images") == "inputs":
        train, query_sets = inputs.train_images(), inputs.queries()
    else:
        train, query_sets = inputs.train_pixels(), inputs.query_pixels()
    seed, draws = method_cfg.get("seed", 0), method_cfg.get("noise_draws", 1)
    results = []
    for t in lambdas:
        sigma = sigma_of_timestep(int(t))
        matrices = {}
        for name, queries in query_sets.items():
            total = np.zeros((len(queries), len(train)))
            for draw in range(draws):  # one draw per (seed, t, draw), the same for every query set
                noise = np.random.default_rng([seed, int(t), draw]).standard_normal(train.shape[1:])
                total += nda_scores(
                    queries,
                    train,
                    sigma,
                    noise,
                    method_cfg["scales"],
                    method_cfg.get("stride", 1),
                    method_cfg.get("topk"),
                )
            matrices[name] = (total / draws).astype(np.float32)
        results.append((None if len(lambdas) == 1 else t, matrices))
    return results


class NDA(Scorer):
    family = "nda"
    schemas = (
        method_schema(
            "nda",
            ["timesteps", "scales"],
            timesteps={
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": NUM_TRAIN_TIMESTEPS - 1},
                "minItems": 1,
                "uniqueItems": True,
            },
            scales={"type": "array", "items": SCALE, "minItems": 1},
            stride=POSINT,
            topk={"type": ["integer", "null"], "minimum": 1},
            noise_draws=POSINT,
            seed={"type": "integer", "minimum": 0},
            space={"enum": ["images", "inputs"]},
        ),
    )
    # model-free: it reads images (or the model inputs) only
    model_families = ("ddpm", "vesde", "latent")

    def lambdas(self, method_cfg, config):
        """The noise-level grid: the DDPM timesteps (module docstring), chosen on TUNING subsets."""
        return [int(t) for t in method_cfg["timesteps"]]

    def check(self, name, method_cfg, config):
        for n, scale in enumerate(method_cfg["scales"]):
            pool = scale.get("pool", 1)
            if scale["patch_size"] % pool:
                raise ValueError(
                    f"scores.methods.{name}.scales[{n}]: patch_size {scale['patch_size']} is not a multiple of "
                    f"pool {pool}; the pooled patch is made of whole pool x pool blocks"
                )

    def settings(self, method_cfg, config):
        return {
            "timesteps": list(method_cfg["timesteps"]),
            "sigma": {int(t): sigma_of_timestep(int(t)) for t in method_cfg["timesteps"]},
            "scales": [
                {"patch_size": s["patch_size"], "pool": s.get("pool", 1), "weight": s.get("weight", 1.0)}
                for s in method_cfg["scales"]
            ],
            "stride": method_cfg.get("stride", 1),
            "topk": method_cfg.get("topk"),
            "noise_draws": method_cfg.get("noise_draws", 1),
            "space": method_cfg.get("space", "images"),
        }

    def compute(self, method_cfg, inputs, lambdas):
        return compute(method_cfg, inputs, lambdas)
