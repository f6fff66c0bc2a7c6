"""Journey-TRAK: query features from sampling trajectories against a direct per-step loop, and the scorer."""

import numpy as np
import pytest
import torch
from fakes import TINY_MODEL, Float64Model, float64_default, float64_projection_atol

from workflow_scripts.core.common import generator
from workflow_scripts.core.projection import Projector
from workflow_scripts.families.ddpm import alphas_cumprod, build_model
from workflow_scripts.scorers import get_scorer, journey
from workflow_scripts.scorers.trak import KernelSolver
from workflow_scripts.stages import gradients

torch.set_num_threads(1)

DIFFUSION = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}
SHAPE = (1, 8, 8)
TIMESTEPS = np.array([900, 600, 300, 0])  # a 4-step sampler; trajectories hold x_T .. x_0 (5 states)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, SHAPE).eval()
    trajectories = torch.rand(3, len(TIMESTEPS) + 1, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return model, trajectories, alphas_cumprod(DIFFUSION)


def loop_journey(model, trajectories, steps, seed, a_bar):
    """Reference: one query and one sampling step at a time, loss.backward()."""
    rows = []
    for q, traj in enumerate(trajectories):
        total = 0
        for s in steps:
            t = int(TIMESTEPS[s])
            x_t = traj[s]
            ab = a_bar[t]  # float32, as the sampler's schedule: the coefficients below are rounded as in the module
            with torch.no_grad():
                eps_hat = model(x_t[None], torch.tensor([t])).sample[0]
            x0_hat = ((x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()).clamp(-1, 1)
            noise = torch.randn(*SHAPE, generator=generator(seed, gradients.JOURNEY_STREAM, q, t))
            model.zero_grad(set_to_none=True)
            x_noisy = ab.sqrt() * x0_hat + (1 - ab).sqrt() * noise
            loss = (noise - model(x_noisy[None], torch.tensor([t])).sample[0]).pow(2).mean()
            loss.backward()
            total = total + torch.cat([p.grad.flatten() for p in model.parameters()])
        rows.append(total / len(steps))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def test_journey_gradients_equal_per_step_loop(setup):
    model, trajectories, a_bar = setup
    steps = gradients.journey_steps(len(TIMESTEPS), len(TIMESTEPS))
    fast = gradients.journey_gradients(model, trajectories, TIMESTEPS, steps, range(3), 5, a_bar)
    slow = loop_journey(model, trajectories, steps, 5, a_bar)
    assert fast.shape == slow.shape
    assert ((fast - slow).norm() / slow.norm()).item() < 1e-4
    # a different subset of steps is a different feature
    fewer = gradients.journey_gradients(
        model, trajectories, TIMESTEPS, gradients.journey_steps(4, 2), range(3), 5, a_bar
    )
    assert not torch.allclose(fewer, fast)


def test_journey_features_projected_and_batch_independent(setup):
    """In float64 (model, projection, noise; stored float32): batch sizes and the per-step loop differ only by float64
    rounding, which float32 kernels of another CPU would turn into ~1e-4 relative differences of small features."""
    model, trajectories, a_bar = setup
    model = Float64Model(model)
    cfg = {"projection": "gaussian", "projection_dim": 16, "batch_size": 2, "projection_memory_mb": 64}
    seeds = {"gradients": 5, "projection": 6}
    with float64_default():
        out = gradients.compute_journey_features(
            model, trajectories.numpy(), TIMESTEPS, 3, cfg, DIFFUSION, seeds, torch.device("cpu")
        )
        steps = gradients.journey_steps(4, 3)
        raw = loop_journey(model, trajectories, steps, 5, a_bar)
        project = Projector(raw.shape[1], 16, "gaussian", 6, 64)
        expected = project(raw).numpy()
        one_by_one = gradients.compute_journey_features(
            model, trajectories.numpy(), TIMESTEPS, 3, {**cfg, "batch_size": 1}, DIFFUSION, seeds, torch.device("cpu")
        )
        # two float64 orders of the n_params products g_k P_kj / sqrt(dim): <= n_params eps64 sum |g_k P_kj| / sqrt(dim)
        atol = float64_projection_atol(raw, project.matrix / 16**0.5)
    assert out.shape == (3, 16) and out.dtype == np.float32
    # out is the float64 feature rounded once to float32 (2^-24); a dropped step, another query's noise or another
    # projection seed changes features by O(1)
    np.testing.assert_array_less(np.abs(out - expected), atol + 2**-24 * np.abs(expected))
    # both float64 features rounded to float32: at most one float32 spacing (2^-23) apart; a query's row at another batch
    # position (its noise seeded by its index) is O(1) away
    np.testing.assert_array_less(np.abs(one_by_one - out), atol + 2**-23 * np.abs(out))


def test_journey_steps():
    assert gradients.journey_steps(50, 50).tolist() == list(range(50))
    assert gradients.journey_steps(50, 5).tolist() == [0, 12, 24, 37, 49]
    assert gradients.journey_steps(10, 1).tolist() == [0]
    with pytest.raises(ValueError, match="6 sampling steps requested, the trajectories have 5"):
        gradients.journey_steps(5, 6)


def test_journey_rejects_trajectories_without_final_state(setup):
    model, trajectories, _ = setup
    from workflow_scripts.core.common import ArtefactError

    cfg = {"projection": "gaussian", "projection_dim": 4, "batch_size": 2, "projection_memory_mb": 64}
    with pytest.raises(ArtefactError, match="expected steps \\+ 1"):
        gradients.compute_journey_features(
            model,
            trajectories[:, :-1].numpy(),
            TIMESTEPS,
            2,
            cfg,
            DIFFUSION,
            {"gradients": 5, "projection": 6},
            torch.device("cpu"),
        )


class _Inputs:
    query_sets = ("generated", "heldout")

    def __init__(self, stores):
        self.stores, self.calls, self.checkpoints = stores, [], {}

    def features(self, role, split, expect=None):
        self.calls.append((role, split, expect["kind"]))
        return self.stores[role][split]

    def sidecar(self, role, split):
        return {
            "made_by": {
                "model": "m",
                "projection": "gaussian",
                "projection_dim": 6,
                "seed_projection": 6,
                "checkpoint": self.checkpoints.get(role, "c1"),
            }
        }


def test_journey_scorer_uses_journey_features_for_generated_only():
    rng = np.random.default_rng(0)
    train, gen_journey, gen_trak, held = (rng.normal(size=s) for s in [(9, 6), (3, 6), (3, 6), (2, 6)])
    inputs = _Inputs(
        {"final": {"train": train, "generated": gen_trak, "heldout": held}, "journey": {"generated": gen_journey}}
    )
    out = get_scorer("journey").compute({"family": "journey", "output_function": "loss"}, inputs, [0.1, 1.0])
    solver = KernelSolver(train)
    np.testing.assert_allclose(out[0][1]["generated"], solver.scores(gen_journey, 0.1), rtol=1e-5)
    np.testing.assert_allclose(out[1][1]["heldout"], solver.scores(held, 1.0), rtol=1e-5)  # standard TRAK features
    assert ("journey", "generated", "journey") in inputs.calls and ("final", "generated", "avg") not in inputs.calls
    assert "generated queries only" in journey.notes({})["heldout"]


def test_journey_scorer_rejects_features_of_another_checkpoint():
    from workflow_scripts.core.common import ArtefactError

    rng = np.random.default_rng(1)
    inputs = _Inputs(
        {
            "final": {"train": rng.normal(size=(4, 3)), "heldout": rng.normal(size=(2, 3))},
            "journey": {"generated": rng.normal(size=(2, 3))},
        }
    )
    inputs.checkpoints["journey"] = "c2"
    with pytest.raises(ArtefactError, match="differ in checkpoint"):
        journey.compute({"family": "journey", "output_function": "loss"}, inputs, [1.0])
