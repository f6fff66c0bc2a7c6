"""Gradient store kinds of the scorers (unitnorm, sketch, residuals, journey), their sidecar checks,
the store tags of dag/paths.py, ScorerInputs and the per-method sweep plot."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from fakes import TINY_MODEL, Float64Model, float64_default, float64_projection_atol

from workflow_scripts.core import store as store_mod
from workflow_scripts.core.common import ArtefactError
from workflow_scripts.core.contracts import RESIDUAL
from workflow_scripts.core.projection import Projector
from workflow_scripts.dag import paths
from workflow_scripts.families.ddpm import add_noise, alphas_cumprod, build_model, output_function
from workflow_scripts.stages import gradients
from workflow_scripts.stages.scores import ScorerInputs, plot_sweep

torch.set_num_threads(1)

DIFFUSION = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}
SHAPE = (1, 8, 8)
SEEDS = {"gradients": 5, "projection": 6}
CPU = torch.device("cpu")


def grad_cfg(**kw):
    return {
        "timesteps": 3,
        "projection": "gaussian",
        "projection_dim": 16,
        "batch_size": 2,
        "timestep_chunk": 10,
        "projection_memory_mb": 64,
        **kw,
    }


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, SHAPE).eval()
    images = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    n_params = sum(p.numel() for p in model.parameters())
    return model, images, alphas_cumprod(DIFFUSION), Projector(n_params, 16, "gaussian", 6, 64)


def _grad(model):
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return g


def _prediction(model, x, t, e, a_bar):
    return model(add_noise(x[None], t[None], e[None], a_bar), t[None]).sample[0]


# ---------------------------------------------------------------- feature kinds against loops


def test_unitnorm_features_equal_loop(setup):
    """In float64 (model, projection, draws; stored float32), like the avg features below."""
    model, images, a_bar, _ = setup
    model, images = Float64Model(model), images.double()
    with float64_default():
        t, eps = gradients.feature_draws(1000, 3, SHAPE, 5)
        rows, sizes = [], []
        for x in images:
            total, size = 0, 0
            for k in range(3):
                output_function("mean", _prediction(model, x, t[k], eps[k], a_bar)[None], eps[k][None]).sum().backward()
                g = _grad(model)
                total, size = total + g / g.norm(), size + g.abs() / g.norm()
            rows.append(total / 3)
            sizes.append(size / 3)
        project = Projector(len(rows[0]), 16, "gaussian", 6, 64)
        expected = project(torch.stack(rows)).numpy()
        # two n_params-term float64 sums: the projection and the norm that weights each timestep
        atol = float64_projection_atol(torch.stack(sizes), project.matrix / 16**0.5, reductions=2)
        for chunk in (10, 1):  # chunking over timesteps does not change the result
            out = gradients.compute_features(
                model, images.numpy(), "mean", grad_cfg(timestep_chunk=chunk), DIFFUSION, SEEDS, CPU, kind="unitnorm"
            )
            # the float64 feature rounded once to float32; an unnormalised or misweighted timestep is O(|feature|) away
            np.testing.assert_array_less(np.abs(out - expected), atol + 2**-24 * np.abs(expected))
        # not the plain average
        plain = gradients.compute_features(model, images.numpy(), "mean", grad_cfg(), DIFFUSION, SEEDS, CPU)
    assert not np.allclose(plain, out, rtol=0.1)


def test_avg_features_chunked_and_per_method_timesteps(setup):
    """In float64 (model, projection, draws; stored float32): chunked and whole sums over timesteps differ only by
    float64 rounding (float32 kernels of another CPU: ~4e-6 absolute)."""
    model, images, a_bar, _ = setup
    model, x = Float64Model(model), images.double()
    with float64_default():
        whole = gradients.compute_features(model, x.numpy(), "loss", grad_cfg(), DIFFUSION, SEEDS, CPU, timesteps=4)
        chunked = gradients.compute_features(
            model, x.numpy(), "loss", grad_cfg(timestep_chunk=3), DIFFUSION, SEEDS, CPU, timesteps=4
        )
        t, eps = gradients.feature_draws(1000, 4, SHAPE, 5)
        g = gradients.per_example_gradients(model, x, "loss", t, eps, a_bar)
        project = Projector(g.shape[1], 16, "gaussian", 6, 64)
        expected = project(g).numpy()
        atol = float64_projection_atol(g, project.matrix / 16**0.5)
    # both float64 features rounded to float32: <= one float32 spacing (2^-23) apart; chunks weighted 1/n_chunks
    # instead of by their timesteps, or a chunk's timestep dropped, moves features by ~40% (1e8 x this bound)
    np.testing.assert_array_less(np.abs(chunked - whole), atol + 2**-23 * np.abs(whole))
    # whole: the float64 feature rounded once (2^-24); the store's K = 3 instead of the method's 4 is O(1) away
    np.testing.assert_array_less(np.abs(whole - expected), atol + 2**-24 * np.abs(expected))


def test_sketch_features_and_residuals_equal_loop(setup):
    """In float64 (model, projection, draws, directions; stored float32), like the avg features below."""
    model, images, a_bar, _ = setup
    model, images = Float64Model(model), images.double()
    r, K = 2, 3
    with float64_default():
        t, eps = gradients.feature_draws(1000, K, SHAPE, 5)
        u = gradients.output_directions(t, r, SHAPE, 6)
        assert u.shape == (K, r, *SHAPE)
        feats, sizes, resid, resid_sizes = [], [], [], []
        for x in images:
            acc, size, racc, rsize = 0, 0, 0, 0
            for k in range(K):
                block = []
                for j in range(r):
                    (u[k, j] * _prediction(model, x, t[k], eps[k], a_bar)).sum().backward()
                    block.append(_grad(model))
                block = torch.stack(block)  # (r, n_params) = U_k J_k
                w = 1 / block.norm()  # Frobenius norm of the timestep's block
                acc, size = acc + w * block, size + w * block.abs()
                with torch.no_grad():
                    e = eps[k] - _prediction(model, x, t[k], eps[k], a_bar)
                racc, rsize = (
                    racc + w * (u[k].flatten(1) @ e.flatten()),
                    rsize + w * (u[k].flatten(1).abs() @ e.flatten().abs()),
                )
            feats.append(acc / K)
            sizes.append(size / K)
            resid.append(racc / K)
            resid_sizes.append(rsize / K)
        project = Projector(feats[0].shape[1], 16, "gaussian", 6, 64)
        expected = torch.stack([project(f) for f in feats]).numpy()
        # the projection (n_params terms) and the Frobenius norm weighting each timestep (r x n_params terms)
        atol = np.stack([float64_projection_atol(s, project.matrix / 16**0.5, reductions=r + 1) for s in sizes])
        out, residuals = gradients.compute_features(
            model, images.numpy(), "eps", grad_cfg(), DIFFUSION, SEEDS, CPU, kind="sketch", directions=r, residuals=True
        )
    assert out.shape == (3, r, 16) and residuals.shape == (3, r)
    # the float64 feature rounded once to float32; another timestep weight or direction is O(|feature|) away
    np.testing.assert_array_less(np.abs(out - expected), atol + 2**-24 * np.abs(expected))
    # residuals: the weight's (r x n_params)-term norm and the D-pixel dot product in float64, rounded to float32
    expected, terms = torch.stack(resid).numpy(), r * feats[0].shape[1] + int(np.prod(SHAPE))
    bound = terms * np.finfo(np.float64).eps * torch.stack(resid_sizes).numpy()
    np.testing.assert_array_less(np.abs(residuals - expected), bound + 2**-24 * np.abs(expected))


def test_output_directions_are_seeded_per_timestep():
    t10, _ = gradients.feature_draws(1000, 10, SHAPE, 5)
    t5, _ = gradients.feature_draws(1000, 5, SHAPE, 5)
    u10, u5 = gradients.output_directions(t10, 3, SHAPE, 6), gradients.output_directions(t5, 3, SHAPE, 6)
    assert torch.equal(u10[2], u5[1])  # t = 200 in both grids
    assert not torch.equal(u10[0], u10[1])
    big = gradients.output_directions(torch.arange(0, 1000, 1), 4, SHAPE, 6)
    # E[U^T U] = I: the squared norm of a sketched vector is unbiased
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    ratio = ((big.flatten(2) @ v).pow(2).sum(1) / v.pow(2).sum()).mean().item()
    assert ratio == pytest.approx(1.0, abs=0.1)


def test_scalar_residuals_follow_reference_normalisation(setup):
    model, images, a_bar, _ = setup
    _, res = gradients.compute_features(
        model, images.numpy(), "loss", grad_cfg(), DIFFUSION, SEEDS, CPU, residuals=True
    )
    t, eps = gradients.feature_draws(1000, 3, SHAPE, 5)
    for i, x in enumerate(images):
        with torch.no_grad():
            rho = np.array(
                [float((eps[k] - _prediction(model, x, t[k], eps[k], a_bar)).pow(2).mean().sqrt()) for k in range(3)]
            )
        assert res[i] == pytest.approx(rho.mean() / np.linalg.norm(rho), rel=1e-5)
    assert np.all((res > 1 / 3) & (res <= 1 / np.sqrt(3) + 1e-6))  # mean / l2-norm of 3 positive values


def test_unknown_kind(setup):
    model, images, _, _ = setup
    with pytest.raises(ValueError, match="journey features: compute_journey_features"):
        gradients.compute_features(model, images.numpy(), "loss", grad_cfg(), DIFFUSION, SEEDS, CPU, kind="journey")


# ---------------------------------------------------------------- store identities and mismatch errors


PAYLOAD = {"config": {"seed": 2}, "step": 20}


def _write(tmp_path, identity, name="train.npy"):
    path = tmp_path / name
    store_mod.write_store(np.zeros(identity["shape"], np.float32), identity, path)
    return path


def test_new_kind_identities_and_shapes(smoke_config):
    d = smoke_config["gradients"]["projection_dim"]
    sketch = gradients.store_identity(smoke_config, PAYLOAD, "eps", "train", 5, kind="sketch", directions=4)
    assert sketch["shape"] == [5, 4, d] and sketch["made_by"]["output_directions"] == 4
    residual = gradients.store_identity(smoke_config, PAYLOAD, "eps", RESIDUAL, 5, kind="sketch", directions=4)
    assert residual["shape"] == [5, 4] and residual["config_hash"] == sketch["config_hash"]
    scalar_residual = gradients.store_identity(smoke_config, PAYLOAD, "mean", RESIDUAL, 5, kind="unitnorm")
    assert scalar_residual["shape"] == [5]
    journey = gradients.store_identity(
        smoke_config, {**PAYLOAD, "lr": 1e-3}, "loss", "generated", 4, kind="journey", timesteps=5
    )
    assert journey["made_by"]["timesteps"] == 5 and journey["checkpoint"] == {"step": 20, "lr": 1e-3}
    assert len({sketch["config_hash"], scalar_residual["config_hash"], journey["config_hash"]}) == 3


@pytest.mark.parametrize(
    "written, expected, field",
    [
        (dict(fn="mean", kind="unitnorm"), dict(fn="mean", kind="avg"), "kind"),
        (dict(fn="eps", kind="sketch", directions=4), dict(fn="eps", kind="sketch", directions=8), "output_directions"),
        (dict(fn="loss", kind="journey", timesteps=50), dict(fn="loss", kind="journey", timesteps=25), "timesteps"),
        (dict(fn="loss", kind="avg", timesteps=10), dict(fn="loss", kind="avg", timesteps=100), "timesteps"),
        (
            dict(fn="loss", kind="avg", images=np.zeros(3)),
            dict(fn="loss", kind="avg", images=np.ones(3)),
            "inputs_sha256",
        ),
    ],
)
def test_store_mismatch_names_the_field(tmp_path, smoke_config, written, expected, field):
    def identity(spec):
        spec = dict(spec)
        fn = spec.pop("fn")
        return gradients.store_identity(smoke_config, PAYLOAD, fn, "train", 3, **spec)

    path = _write(tmp_path, identity(written))
    with pytest.raises(ArtefactError, match=r"config_hash|shape") as info:
        store_mod.open_store(path, identity(expected))
    assert field in str(info.value) and str(path) in str(info.value)


def test_other_checkpoint_store_is_rejected(tmp_path, smoke_config):
    path = _write(tmp_path, gradients.store_identity(smoke_config, PAYLOAD, "loss", "train", 3))
    with pytest.raises(ArtefactError, match="checkpoint"):
        store_mod.open_store(path, gradients.store_identity(smoke_config, {**PAYLOAD, "step": 10}, "loss", "train", 3))


def test_check_tag(smoke_config):
    smoke_config = copy.deepcopy(smoke_config)
    smoke_config["gradients"]["projection"] = "gaussian"  # the tags below name a Gaussian projection
    ok = paths.feature_tag(smoke_config, "eps", kind="sketch", directions=4)
    gradients.check_tag(paths.parse_feature_tag(ok), smoke_config, ok)
    bad = {
        "eps_avg_K2_gaussian64": "sketch stores only",
        "mean_sketch4_K2_gaussian64": "noise predictor itself",
        "mean_journey_K5_gaussian64": "TRAK loss",
        "loss_avg_K2_gaussian32": "projection_dim is 32",
        "loss_avg_K2_rademacher64": "projection is rademacher",
    }
    for tag, message in bad.items():
        with pytest.raises(ValueError, match=message):
            gradients.check_tag(paths.parse_feature_tag(tag), smoke_config, tag)
    sparse = copy.deepcopy(smoke_config)
    sparse["gradients"]["projection"] = "sjlt"
    tag = paths.feature_tag(sparse, "loss")
    assert tag == "loss_avg_K2_sjlt64"
    gradients.check_tag(paths.parse_feature_tag(tag), sparse, tag)
    with pytest.raises(ValueError, match="projection is sjlt"):
        gradients.check_tag(paths.parse_feature_tag(tag), smoke_config, tag)


def test_stores_of_another_sparse_sketch_are_not_combined():
    from workflow_scripts.scorers.base import check_same_space

    class Inputs:
        def __init__(self, made_by):
            self.made_by = made_by

        def sidecar(self, role, split):
            return {"made_by": self.made_by[role]}

    stores = [("final", "train"), ("step0000010", "train")]
    dense = {"model": "m", "diffusion": "d", "projection": "gaussian", "projection_dim": 8, "seed_projection": 6}
    check_same_space(Inputs({"final": dense, "step0000010": dict(dense)}), stores)
    sparse = {**dense, "projection": "sjlt", "sjlt_nonzeros": 4}
    check_same_space(Inputs({"final": sparse, "step0000010": dict(sparse)}), stores)
    with pytest.raises(ArtefactError, match=r"differ in sjlt_nonzeros \(4 vs 2\)"):
        check_same_space(Inputs({"final": sparse, "step0000010": {**sparse, "sjlt_nonzeros": 2}}), stores)
    with pytest.raises(ArtefactError, match="differ in projection"):
        check_same_space(Inputs({"final": sparse, "step0000010": dense}), stores)


# ---------------------------------------------------------------- store tags and per-method stores


def test_tags_round_trip(smoke_config):
    cases = [
        ("loss", None, "avg", None),
        ("mean-squared-l2-norm", 100, "avg", None),
        ("mean", None, "unitnorm", None),
        ("eps", 10, "sketch", 4),
        ("loss", 50, "journey", None),
    ]
    for fn, k, kind, r in cases:
        tag = paths.feature_tag(smoke_config, fn, k, kind, r)
        spec = paths.parse_feature_tag(tag)
        assert spec == {
            "output_function": fn,
            "kind": kind,
            "timesteps": k or smoke_config["gradients"]["timesteps"],
            "projection": smoke_config["gradients"]["projection"],
            "projection_dim": 64,
            "output_directions": r,
        }
        import re

        pattern = paths.JOURNEY_STORE_PATTERN if kind == "journey" else paths.SPLIT_STORE_PATTERN
        other = paths.SPLIT_STORE_PATTERN if kind == "journey" else paths.JOURNEY_STORE_PATTERN
        assert re.fullmatch(pattern, tag) and not re.fullmatch(other, tag)
    sparse = copy.deepcopy(smoke_config)
    sparse["gradients"]["projection"] = "sjlt"
    for kind, pattern in (("avg", paths.SPLIT_STORE_PATTERN), ("journey", paths.JOURNEY_STORE_PATTERN)):
        tag = paths.feature_tag(sparse, "loss", kind=kind)
        assert tag == f"loss_{kind}_K2_sjlt64" and re.fullmatch(pattern, tag)
        assert paths.parse_feature_tag(tag)["projection"] == "sjlt"
    with pytest.raises(ValueError, match="bad gradient store tag"):
        paths.parse_feature_tag("loss_K10_gaussian2048")  # the old tag format names no kind
    with pytest.raises(ValueError, match="bad gradient store tag"):
        paths.parse_feature_tag("loss_avg_K10_sparse2048")
    with pytest.raises(ValueError, match="output directions"):
        paths.feature_tag(smoke_config, "eps", kind="sketch")


def test_method_stores(base_config):
    c = base_config
    steps = paths.checkpoint_names(c)
    assert steps == ["step0000150", "step0000300", "step0000450", "step0000600"]
    assert paths.checkpoint_model(c, "step0000150") == "results/digits/models/full/checkpoints/step0000150.pt"
    assert paths.checkpoint_model(c, "full") == "results/digits/models/full/model.pt"
    assert all(p in paths.full_checkpoints(c) for p in (paths.checkpoint_model(c, s) for s in steps))
    cfg = copy.deepcopy(c)
    cfg["gradients"]["projection"] = "gaussian"  # the paths below name a Gaussian projection
    cfg["scores"]["methods"] = {
        "t100": {"family": "trak", "output_function": "loss", "timesteps": 100},
        "tr": {"family": "tracin", "output_function": "loss", "similarity": "dot"},
        "j": {"family": "journey", "output_function": "loss", "sampling_steps": 10},
        "dv": {"family": "das", "form": "vector", "output_directions": 4, "leverage": True},
        "ds": {"family": "das", "form": "scalar", "output_function": "mean", "leverage": False},
        "px": {"family": "pixel", "similarity": "dot"},
    }
    assert paths.method_stores(cfg, "t100") == {
        "final": ("results/digits/gradients/full/loss_avg_K100_gaussian2048", "avg")
    }
    assert list(paths.method_stores(cfg, "tr")) == steps
    assert paths.method_stores(cfg, "j")["journey"] == (
        "results/digits/gradients/full/loss_journey_K10_gaussian2048",
        "journey",
    )
    assert paths.method_stores(cfg, "dv")["final"][0].endswith("/full/eps_sketch4_K10_gaussian2048")
    assert paths.method_stores(cfg, "ds")["final"][0].endswith("/full/mean_unitnorm_K10_gaussian2048")
    assert paths.method_stores(cfg, "px") == {} and paths.method_feature_args(cfg, "px") == ""
    files = paths.method_feature_stores(cfg, "j")
    assert "results/digits/gradients/full/loss_journey_K10_gaussian2048/generated.npy" in files
    assert not any("journey" in f and ("heldout" in f or "train" in f) for f in files)
    assert "results/digits/gradients/full/loss_avg_K10_gaussian2048/train_residual.json" in files
    assert paths.method_feature_args(cfg, "j") == (
        "--features final=results/digits/gradients/full/loss_avg_K10_gaussian2048 "
        "journey=results/digits/gradients/full/loss_journey_K10_gaussian2048"
    )


def test_every_configured_method_has_a_family(base_config):
    from workflow_scripts.scorers import SCORERS

    for name, method in base_config["scores"]["methods"].items():
        assert method["family"] in SCORERS, name
        if method["family"] in ("pixel", "clip", "nda"):  # need no model artefact
            continue
        # every other family reads gradient stores, a model file or (metagradient) its chunk jobs' scores
        assert (
            paths.method_stores(base_config, name)
            or paths.method_model_inputs(base_config, name)
            or paths.metagradient_chunk_files(base_config, name)
        ), name


# ---------------------------------------------------------------- ScorerInputs


def test_scorer_inputs_check_stores(tmp_path, smoke_config):
    store = tmp_path / "s"
    ident = gradients.store_identity(smoke_config, {**PAYLOAD, "lr": 2e-4}, "mean", "train", 3, kind="unitnorm")
    store_mod.write_store(np.ones(ident["shape"], np.float32), ident, store / "train.npy")
    resid = gradients.store_identity(smoke_config, PAYLOAD, "mean", RESIDUAL, 3, kind="unitnorm")
    store_mod.write_store(np.full(3, 0.5, np.float32), resid, store / f"{RESIDUAL}.npy")
    inputs = ScorerInputs("unused", "unused", paths.parse_stores([f"final={store}"]))
    assert inputs.roles() == ["final"]
    np.testing.assert_array_equal(
        inputs.features("final", "train", {"kind": "unitnorm", "output_function": "mean"}), 1.0
    )
    np.testing.assert_array_equal(inputs.residuals("final"), 0.5)
    assert inputs.checkpoint("final") == {"step": 20, "lr": 2e-4}
    with pytest.raises(ArtefactError, match="kind 'unitnorm', the method needs 'avg'"):
        inputs.features("final", "train", {"kind": "avg"})
    with pytest.raises(ArtefactError, match="needs the gradient store 'journey'"):
        inputs.features("journey", "generated")
    # residuals of another configuration do not belong to these features
    other = gradients.store_identity(smoke_config, PAYLOAD, "mean", RESIDUAL, 3, kind="unitnorm", timesteps=7)
    store_mod.write_store(np.full(3, 0.5, np.float32), other, store / f"{RESIDUAL}.npy")
    with pytest.raises(ArtefactError, match="does not belong"):
        inputs.residuals("final")
    with pytest.raises(ValueError, match="ROLE=DIRECTORY"):
        paths.parse_stores(["final"])


# ---------------------------------------------------------------- sweep plot


@pytest.mark.parametrize("with_lambda", [True, False])
def test_sweep_plot_is_a_png(tmp_path, with_lambda):
    from PIL import Image

    lambdas = [1e-3, 1e-2, 1e-1, 1.0] if with_lambda else [np.nan]
    table = pd.DataFrame(
        [
            {"lambda": lam, "query_set": q, "lds_tuning": 0.1 * i, "lds_evaluation": 0.05 * i + 0.01}
            for i, lam in enumerate(lambdas)
            for q in ("generated", "heldout")
        ]
    )
    path = tmp_path / "m" / "sweep.png"
    plot_sweep(table, 1e-2 if with_lambda else None, "m", path, {"heldout": "a caveat"} if with_lambda else None)
    image = Image.open(path)
    assert image.size[0] > 300 and len(set(image.convert("L").tobytes())) > 10
    assert not list(path.parent.glob(".*tmp*"))
