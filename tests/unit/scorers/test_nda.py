"""NDA (nonparametric data attribution) against a loop-by-loop float64 reference of its definition, the global
empirical denoiser it reduces to for a patch covering the whole image, and properties that could fail."""

import math

import numpy as np
import pytest

from workflow_scripts.dag.config import ConfigError, validate_config
from workflow_scripts.scorers import get_scorer, nda


def _images(n, c=2, h=5, w=5, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, c, h, w))


def _patch(img, top, left, k, pool):
    """(values, pattern) of the k x k patch with top-left corner (top, left); pixels outside the image are 0 and
    marked invalid; pool > 1 replaces each pool x pool block by its sum / pool."""
    c, h, w = img.shape
    values, pattern = [], []
    for di in range(k):
        for dj in range(k):
            i, j = top + di, left + dj
            pattern.append(0 <= i < h and 0 <= j < w)
    for ch in range(c):
        for bi in range(k // pool):
            for bj in range(k // pool):
                total = 0.0
                for di in range(pool):
                    for dj in range(pool):
                        i, j = top + bi * pool + di, left + bj * pool + dj
                        if 0 <= i < h and 0 <= j < w:
                            total += float(img[ch, i, j])
                values.append(total / pool)
    return values, tuple(pattern)


def _reference(queries, train, sigma, noise, k, pool=1, stride=1, topk=None):
    """S[q, i] = sum over query patches of the posterior mass of training image i's patches, by plain loops."""
    n_q, n_t = len(queries), len(train)
    _, h, w = train.shape[1:]
    pad = (k - 1) // 2
    tops = range(-pad, h + pad - k + 1, stride)
    lefts = range(-pad, w + pad - k + 1, stride)
    positions = [(a, b) for a in tops for b in lefts]
    train_patches = [[_patch(train[i], a, b, k, pool) for a, b in positions] for i in range(n_t)]
    out = np.zeros((n_q, n_t))
    for q in range(n_q):
        noisy = queries[q] + sigma * noise
        for a, b in positions:
            xq, pattern = _patch(noisy, a, b, k, pool)
            logits = {}
            for i in range(n_t):
                for r, (z, pattern_r) in enumerate(train_patches[i]):
                    if pattern_r == pattern:
                        logits[i, r] = -sum((u - v) ** 2 for u, v in zip(xq, z)) / (2 * sigma**2)
            top = max(logits.values())
            norm = sum(math.exp(v - top) for v in logits.values())
            for i in range(n_t):
                weights = sorted((math.exp(v - top) / norm for (j, _), v in logits.items() if j == i), reverse=True)
                out[q, i] += sum(weights if topk is None else weights[:topk])
    return out


@pytest.mark.parametrize(
    "k, pool, stride, topk, sigma",
    [(3, 1, 1, None, 0.7), (3, 1, 2, 2, 0.4), (4, 2, 1, None, 0.9), (2, 1, 1, 3, 1.5), (1, 1, 1, None, 0.5)],
)
def test_matches_the_loop_reference(k, pool, stride, topk, sigma):
    train, queries = _images(4, seed=1), _images(3, seed=2)
    noise = np.random.default_rng(3).standard_normal(train.shape[1:])
    got = nda.nda_scores(queries, train, sigma, noise, [{"patch_size": k, "pool": pool}], stride, topk)
    np.testing.assert_allclose(got, _reference(queries, train, sigma, noise, k, pool, stride, topk), rtol=1e-9)


def test_chunks_of_the_training_set_change_nothing(monkeypatch):
    """A training set read one image at a time (two passes: normalisers, then weights) gives the same scores."""
    train, queries = _images(7, seed=24), _images(2, seed=25)
    noise = np.random.default_rng(26).standard_normal(train.shape[1:])
    scales = [{"patch_size": 3}, {"patch_size": 4, "pool": 2}]
    whole = nda.nda_scores(queries, train, 0.3, noise, scales, topk=2)
    monkeypatch.setattr(nda, "CHUNK_BYTES", 1)
    np.testing.assert_allclose(nda.nda_scores(queries, train, 0.3, noise, scales, topk=2), whole, rtol=1e-10)


def test_two_scales_add_with_their_weights():
    train, queries = _images(3, seed=4), _images(2, seed=5)
    noise = np.random.default_rng(6).standard_normal(train.shape[1:])
    scales = [{"patch_size": 3, "weight": 0.25}, {"patch_size": 4, "pool": 2, "weight": 0.75}]
    got = nda.nda_scores(queries, train, 0.6, noise, scales)
    want = 0.25 * _reference(queries, train, 0.6, noise, 3) + 0.75 * _reference(queries, train, 0.6, noise, 4, pool=2)
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_a_whole_image_patch_is_the_empirical_optimal_denoiser():
    """With k = 2H + 1 every position's patch holds the whole image at its own offset, so each of the H * W positions
    contributes the posterior weights of the empirical optimal denoiser, written here in the DDPM form
    softmax_i(-||a x + s eps - a z_i||^2 / (2 s^2)), abar_t on the linear schedule from 1e-4 to 0.02."""
    train, queries = _images(6, c=1, h=4, w=4, seed=7), _images(2, c=1, h=4, w=4, seed=8)
    noise = np.random.default_rng(9).standard_normal(train.shape[1:])
    t = 150
    abar = 1.0
    for step in range(t + 1):
        abar *= 1.0 - (1e-4 + (0.02 - 1e-4) * step / 999)
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    want = np.zeros((2, 6))
    for q in range(2):
        xt = a * queries[q] + s * noise
        logits = [-np.sum((xt - a * z) ** 2) / (2 * s**2) for z in train]
        weights = np.exp(np.array(logits) - max(logits))
        want[q] = 16 * weights / weights.sum()
    got = nda.nda_scores(queries, train, nda.sigma_of_timestep(t), noise, [{"patch_size": 9}])
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_mass_is_conserved_without_topk():
    """Each query patch distributes a posterior mass of 1 over the training patches."""
    train, queries = _images(5, seed=10), _images(3, seed=11)
    noise = np.zeros(train.shape[1:])
    got = nda.nda_scores(queries, train, 0.8, noise, [{"patch_size": 3, "weight": 2.0}], stride=2)
    np.testing.assert_allclose(got.sum(axis=1), 2.0 * 9, rtol=1e-12)  # 3 x 3 positions at stride 2 on 5 x 5


def test_a_copy_of_the_query_ranks_first_at_low_noise():
    train = _images(8, seed=12)
    queries = train[[5, 2]] + 1e-3  # near-copies of training images 5 and 2
    noise = np.random.default_rng(13).standard_normal(train.shape[1:])
    got = nda.nda_scores(queries, train, nda.sigma_of_timestep(0), noise, [{"patch_size": 3}], topk=1)
    assert got.argmax(axis=1).tolist() == [5, 2]


def test_scores_follow_the_training_order():
    train, queries = _images(6, seed=14), _images(2, seed=15)
    noise = np.random.default_rng(16).standard_normal(train.shape[1:])
    order = np.random.default_rng(17).permutation(6)
    scales = [{"patch_size": 3}, {"patch_size": 2, "pool": 2}]
    base = nda.nda_scores(queries, train, 0.5, noise, scales, topk=4)
    permuted = nda.nda_scores(queries, train[order], 0.5, noise, scales, topk=4)
    np.testing.assert_allclose(permuted, base[:, order], rtol=1e-10)


def test_timestep_sigma_on_the_schedule():
    assert nda.sigma_of_timestep(0) == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)))
    assert 0.33 < nda.sigma_of_timestep(100) < 0.36  # abar_100 ~ 0.896 (the paper's default noise level)
    with pytest.raises(ValueError, match="timestep 1000"):
        nda.sigma_of_timestep(1000)


class _Inputs:
    query_sets = ("generated", "heldout")

    def __init__(self, train, queries, inputs=None):
        self._train, self._queries = train, queries
        self._inputs = inputs or (train, queries)

    def train_pixels(self):
        return self._train

    def query_pixels(self):
        return self._queries

    def train_images(self):
        return self._inputs[0]

    def queries(self):
        return self._inputs[1]


def test_compute_sweeps_the_timesteps_and_reads_the_chosen_space():
    train, gen, held = _images(5, seed=18), _images(2, seed=19), _images(3, seed=20)
    scorer = get_scorer("nda")
    cfg = {"family": "nda", "timesteps": [20, 200], "scales": [{"patch_size": 3}], "noise_draws": 2}
    lambdas = scorer.lambdas(cfg, {})
    results = scorer.compute(cfg, _Inputs(train, {"generated": gen, "heldout": held}), lambdas)
    assert [lam for lam, _ in results] == [20, 200]
    for t, matrices in results:
        want = np.mean(
            [
                nda.nda_scores(
                    held,
                    train,
                    nda.sigma_of_timestep(t),
                    np.random.default_rng([0, t, d]).standard_normal(train.shape[1:]),
                    cfg["scales"],
                )
                for d in range(2)
            ],
            axis=0,
        )
        np.testing.assert_allclose(matrices["heldout"], want, rtol=1e-5)
        assert matrices["generated"].shape == (2, 5) and matrices["generated"].dtype == np.float32
    # one timestep: no lambda; the shared noise draw makes a query's row independent of the other queries
    one = {**cfg, "timesteps": [50], "noise_draws": 1}
    ((lam, alone),) = scorer.compute(one, _Inputs(train, {"generated": gen, "heldout": held}), [50])
    ((_, mixed),) = scorer.compute(one, _Inputs(train, {"generated": held[:1], "heldout": gen}), [50])
    assert lam is None
    np.testing.assert_allclose(mixed["generated"][0], alone["heldout"][0], rtol=1e-6)
    # space: inputs reads the model inputs (the latent family's latents), not the images
    latents = (
        _images(5, c=4, h=3, w=3, seed=21),
        {"generated": _images(2, c=4, h=3, w=3, seed=22), "heldout": _images(1, c=4, h=3, w=3, seed=23)},
    )
    ((_, on_latents),) = scorer.compute({**one, "space": "inputs"}, _Inputs(train, {}, latents), [50])
    assert on_latents["generated"].shape == (2, 5)


def test_bad_entries_are_refused(smoke_config):
    def with_method(entry):
        methods = {**smoke_config["scores"]["methods"], "n": {"family": "nda", **entry}}
        return {**smoke_config, "scores": {**smoke_config["scores"], "methods": methods}}

    good = {"timesteps": [100], "scales": [{"patch_size": 3}]}
    validate_config(with_method(good))
    with pytest.raises(ConfigError, match=r"scales\[0\]: patch_size 3 is not a multiple of pool 2"):
        validate_config(with_method({**good, "scales": [{"patch_size": 3, "pool": 2}]}))
    for bad in ({**good, "topk": 0}, {**good, "timesteps": [1000]}, {**good, "scales": []}, {"scales": [{}]}):
        with pytest.raises(ConfigError, match=r"scores\.methods\.n"):
            validate_config(with_method(bad))
    with pytest.raises(ValueError, match="differ in shape"):
        nda.nda_scores(_images(1), _images(2, c=1), 0.5, np.zeros((2, 5, 5)), [{"patch_size": 3}])
