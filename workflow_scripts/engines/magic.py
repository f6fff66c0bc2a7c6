"""Metagradient / MAGIC attribution (docs/methods.md "Metagradient / MAGIC").

Training as a deterministic function of per-example weights w (one weight per training example):

    theta_T(w) = A(w),  state s_{k+1} = h_k(s_k, w),  s = (theta, m, v)  (AdamW parameters and moments),

with the family's training exactly (its train_family_model on ALL training examples), as the family describes it
(families.registry.training_replay): the same initialisation (seed; the latent family: its LoRA adapters), the same
data order (core.seeds.batch_indices over all N examples, so removing an example by w_i = 0 does not change the
order), the same per-step draws (a pure function of (seed, step): t and eps; the latent family also its caption
dropout and latent flips, and the condition of every example), the batch loss sum_{i in B_k} w_i l_i / |B_k|,
gradient-norm clipping (torch.nn.utils.clip_grad_norm_; the latent family only when train.grad_clip is set), AdamW
(torch's single-tensor CPU algorithm: decoupled weight decay, bias corrections, eps outside the square root) and the
diffusers cosine schedule with linear warm-up. The parameters are the model's named_parameters(): all of the DDPM
UNet, the LoRA adapters alone for the latent family (its base weights are buffers). Everything here is written
functionally on dicts of tensors so that torch.autograd differentiates through it; with w = 1 (and with 0/1 weights)
it reproduces the family's training bit for bit on CPU (tests/unit/scorers/test_metagradient.py,
tests/unit/families/test_latent_metagradient.py; same kernels: foreach norms in the clipping, lerp / addcmul /
addcdiv in AdamW, the schedule's own lr values).

Scores (docs/methods.md sign convention): S[q, i] = -d m_q(theta_T(w)) / d w_i at w = 1, m_q = the simple loss of query q
over the fixed measurement draws of measure.py (diffusion.measurement_draws, seeds.measure, stream = query-set
index), conditioned on the query's caption for the latent family (core.data.load_conditions, as the measure stage). Removing z_i is w_i: 1 -> 0, so to first order m_q(w^{-i}) - m_q(1) = -dm_q/dw_i = S[q, i]: positive = the
removal raises the loss (z_i helped). LDS prediction for a subset: sum_{i not in S_j} S[q, i] (first-order Taylor
expansion in w, the MAGIC estimate).

Reverse mode with checkpointing (memory O(sqrt(T)) states instead of O(T)):
1. forward: run the T steps once, keeping the full state (params, exp_avg, exp_avg_sq; the step count is the
   index) every `every` steps (default ceil(sqrt(T))) -> ceil(T / every) checkpoints;
2. the query adjoints dm_q/dtheta_T (and zero adjoints of m, v) start the backward pass;
3. for each segment, last first: recompute its states from its checkpoint (every - 1 training steps), then for
   each step k of the segment in reverse order rebuild the step's graph (forward, and the parameter gradient with
   create_graph=True so the adjoint reaches through the gradient: a Hessian-vector product of the batch loss) and
   take one vector-Jacobian product per query of (theta_{k+1}, m_{k+1}, v_{k+1}) w.r.t. (theta_k, m_k, v_k, w_B):
   the new state adjoints, and dm_q/dw_i for the examples of the batch (accumulated).
Peak memory: ceil(T/every) + every states (3 x n_params floats each) + one step's double-backward graph + the
query adjoints (3 x n_params per query).

Queries: all queries of one call share ONE forward pass, ONE recomputation and ONE graph per step; each query
costs one extra vector-Jacobian product per step (the graph is retained between them). Several queries are thus
much cheaper than several reverse passes, but the per-query cost is still about one double-backward per training
step (see benchmarks/metagradient_cost.py). Queries can be split across jobs (any subset of query indices) and
the score rows concatenated: rows do not depend on which other queries were in the call.

Deviation (documented): d sqrt(v)/dv is taken as 0 where v == 0 exactly (an element whose gradient has been exactly
0 at every step so far), instead of inf/NaN; the forward values are identical.
Precision: diffusers' attention computes its softmax in float32 even in a float64 model (upcast_softmax); float64
problems (tests) switch that off (`full_precision_attention`), else finite differences in w see float32 noise.

Cost (benchmarks/metagradient_cost.py, default model, 600 steps, CPU time): 5.6 training runs for the first query
(forward 1x, recomputation ~1x, per step the graph = forward + create_graph gradient, and one double-backward VJP),
2.6 training runs for each further query (its VJPs); peak RSS ~440 MB above the ~820 MB baseline. Vectorising the
queries (autograd.grad(is_grads_batched=True), or torch.func vmap over forward-over-reverse HVPs) measured no faster
on CPU: the per-query work is FLOP-bound, not overhead-bound. The latent family (configs/latent.yaml: 15,360 LoRA
parameters, 300 examples, batch 64; measured over 40 steps, CPU time, loaded machine): 5.1 fine-tunings for the
first query, 1.35 for each further one (the frozen base's forward dominates both), one fine-tuning ~55 s at 400 steps.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

from workflow_scripts.core.common import log
from workflow_scripts.core.contracts import ALL_QUERY_SETS, query_stream
from workflow_scripts.families.ddpm import Batch, add_noise, alphas_cumprod, measurement_draws
from workflow_scripts.families.registry import is_conditional, train_family_model, training_replay
from workflow_scripts.scorers.metagradient import default_every

# torch.optim.AdamW defaults (the families' trainings do not override them)
BETAS = (0.9, 0.999)


ADAM_EPS = 1e-8


CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)


State = dict  # {"params": {name: tensor}, "exp_avg": {...}, "exp_avg_sq": {...}}


def lr_schedule(train_cfg: dict) -> list[float]:
    """The learning rate of every optimizer step, exactly as the families' diffusers schedule gives it."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    steps = int(train_cfg["steps"])
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train_cfg["lr"])
    schedule = get_cosine_schedule_with_warmup(dummy, int(train_cfg["warmup_fraction"] * steps), steps)
    lrs = []
    for _ in range(steps):
        lrs.append(float(schedule.get_last_lr()[0]))
        dummy.step()
        schedule.step()
    return lrs


@dataclass
class TrainingProblem:
    """Everything the training function needs besides the weights: model template, data, per-step randomness."""

    model: torch.nn.Module  # used only as a functional template (functional_call)
    images: torch.Tensor  # (N, C, H, W) model inputs on device, in the training dtype
    a_bar: torch.Tensor
    batches: Callable[[int], Batch]  # step -> the family's batch of that step (ddpm.TrainingBatches and subclasses)
    steps: int
    lrs: list[float]
    weight_decay: float
    grad_clip: float | None  # None: no clipping
    betas: tuple[float, float] = BETAS
    adam_eps: float = ADAM_EPS
    names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.names:
            self.names = [n for n, _ in self.model.named_parameters()]
        if len(self.lrs) != self.steps:
            raise ValueError(f"{len(self.lrs)} learning rates for {self.steps} steps")

    @property
    def n_train(self) -> int:
        return int(self.images.shape[0])

    @property
    def device(self):
        return self.images.device

    @property
    def dtype(self):
        return self.images.dtype

    def batch(self, step: int) -> Batch:
        """The examples and draws of step `step`, as the family's training makes them (members = all examples)."""
        return self.batches(step)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def model_inputs(dataset) -> dict:
    """The family's model inputs as a dict (dataset.npz / latents.npz); a bare array is a pixel family's training
    images."""
    return dataset if isinstance(dataset, dict) else {"train_images": np.asarray(dataset)}


def build_problem(
    config: dict,
    dataset,
    replicate: int = 0,
    dtype=torch.float32,
    device: torch.device | str = "cpu",
    model: torch.nn.Module | None = None,
) -> tuple[TrainingProblem, State]:
    """The training problem of the family's train_family_model(config, dataset, all members, replicate) and its
    initial state. dataset: the model inputs (model_inputs).

    `model`: another denoiser of the same signature for tests; default: the family's model initialised exactly as
    its training initialises it."""
    train_cfg = config["train"]
    replay = training_replay(config, model_inputs(dataset), replicate, device, dtype)
    model = (replay.model if model is None else model).to(device=device, dtype=dtype)
    if dtype != torch.float32:
        full_precision_attention(model)
    model.train()
    problem = TrainingProblem(
        model=model,
        images=replay.batches.images,
        a_bar=alphas_cumprod(config["diffusion"]).to(device=device, dtype=dtype),
        batches=replay.batches,
        steps=int(train_cfg["steps"]),
        lrs=lr_schedule(train_cfg),
        weight_decay=float(train_cfg["weight_decay"]),
        grad_clip=replay.grad_clip,
    )
    return problem, initial_state(model)


def full_precision_attention(model: torch.nn.Module) -> None:
    """diffusers' attention blocks compute the softmax in float32 (upcast_softmax=True): in a float64 model that
    rounds every step to float32 precision and makes finite differences in w meaningless. Compute it in the model's
    dtype instead (a no-op for float32 models, whose softmax is float32 anyway)."""
    from diffusers.models.attention_processor import Attention

    # the attention layers only: a UNet2DConditionModel also answers upcast_attention, from its (deprecated) config
    for module in model.modules():
        if isinstance(module, Attention):
            module.upcast_softmax = module.upcast_attention = False


def initial_state(model: torch.nn.Module) -> State:
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {
        "params": params,
        "exp_avg": {n: torch.zeros_like(p) for n, p in params.items()},
        "exp_avg_sq": {n: torch.zeros_like(p) for n, p in params.items()},
    }


def check_weights(problem: TrainingProblem, weights) -> torch.Tensor:
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64) if not torch.is_tensor(weights) else weights)
    if w.shape != (problem.n_train,):
        raise ValueError(
            f"weights must have shape ({problem.n_train},) (one per training example), got {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weights must be finite")
    return w.to(device=problem.device, dtype=problem.dtype)


# ----------------------------------------------------------------------------------------------------------------
# One training step, functionally
# ----------------------------------------------------------------------------------------------------------------
def _predict(model, params, x_t, t, cond=None):
    """eps_theta(x_t, t) of an unconditional model, eps_theta(x_t, t, cond) of a conditional one."""
    out = functional_call(model, params, (x_t, t) if cond is None else (x_t, t, cond))
    return out.sample if hasattr(out, "sample") else out


def batch_loss(problem: TrainingProblem, params: dict, weights_batch: torch.Tensor, batch: Batch) -> torch.Tensor:
    """sum_{i in B} w_i l_i / |B| with l_i the simple loss of ddpm.simple_loss."""
    x_t = add_noise(batch.x0, batch.t, batch.eps, problem.a_bar)
    per_example = (batch.eps - _predict(problem.model, params, x_t, batch.t, batch.cond)).pow(2).flatten(1).mean(1)
    return (weights_batch * per_example).mean()


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt(v) with derivative 0 instead of inf where v == 0 (forward values identical)."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def training_step(
    problem: TrainingProblem,
    state: State,
    weights_batch: torch.Tensor,
    step: int,
    batch=None,
    create_graph: bool = False,
) -> State:
    """h_step(state, w): gradient of the weighted batch loss, clip_grad_norm_ (when the family clips), AdamW;
    returns the new state.

    With create_graph the result is a differentiable function of state and weights_batch (whatever of them
    requires grad); otherwise the new state is detached."""
    batch = batch if batch is not None else problem.batch(step)
    params = state["params"]
    names = problem.names
    with torch.enable_grad():
        if create_graph:
            leaves = params
        else:
            leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        loss = batch_loss(problem, leaves, weights_batch, batch)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=create_graph, materialize_grads=True)
    # contiguous: the layout AccumulateGrad gives .grad in training (autograd.grad may return e.g. transposed conv
    # weight gradients); _foreach_norm sums in memory order, so another layout changes the norm in the last bit
    grads = [g.detach().contiguous() if not create_graph else g.contiguous() for g in grads]
    if problem.grad_clip is not None:
        # torch.nn.utils.clip_grad_norm_ (foreach norms on CPU), differentiable
        total_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        coef = torch.clamp(problem.grad_clip / (total_norm + CLIP_EPS), max=1.0)
        grads = [g * coef for g in grads]
    # torch.optim.AdamW, single-tensor algorithm, step count k + 1
    lr = problem.lrs[step]
    beta1, beta2 = problem.betas
    k = step + 1
    bias_correction1 = 1 - beta1**k
    bias_correction2_sqrt = (1 - beta2**k) ** 0.5
    step_size = lr / bias_correction1
    new = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for n, g in zip(names, grads):
        p = params[n]
        if problem.weight_decay != 0:
            p = p * (1 - lr * problem.weight_decay)
        m = torch.lerp(state["exp_avg"][n], g, 1 - beta1)
        v = torch.addcmul(state["exp_avg_sq"][n] * beta2, g, g, value=1 - beta2)
        denom = _safe_sqrt(v) / bias_correction2_sqrt + problem.adam_eps
        new["params"][n] = torch.addcdiv(p, m, denom, value=-step_size)
        new["exp_avg"][n], new["exp_avg_sq"][n] = m, v
    if not create_graph:
        new = {key: {n: x.detach() for n, x in part.items()} for key, part in new.items()}
    return new


def train(
    problem: TrainingProblem, state: State, weights, every: int | None = None, start: int = 0, stop: int | None = None
) -> tuple[State, dict[int, State]]:
    """Run steps start..stop-1 from `state`; returns the final state and the checkpoints {step: state before
    that step} kept every `every` steps (every=None: none)."""
    w = check_weights(problem, weights)
    stop = problem.steps if stop is None else stop
    checkpoints = {}
    for step in range(start, stop):
        if every is not None and (step - start) % every == 0:
            checkpoints[step] = state
        batch = problem.batch(step)
        state = training_step(problem, state, w[batch.idx], step, batch)
    return state, checkpoints


def train_function(problem: TrainingProblem, state0: State, weights) -> dict[str, torch.Tensor]:
    """theta_T(w): the final parameters."""
    return train(problem, state0, weights)[0]["params"]


def retrain_weighted(config: dict, dataset, weights: np.ndarray, replicate: int, out) -> Path:
    """This method's own ground truth (fixed seed and order, removed examples weighted 0): the family's
    train_family_model on ALL training examples with per-example weights. Returns the checkpoint path."""
    dataset = model_inputs(dataset)
    members = np.arange(len(dataset["train_images"]))
    train_family_model(config, dataset, members, replicate, out, weights=np.asarray(weights, np.float64))
    return Path(out)


# ----------------------------------------------------------------------------------------------------------------
# Queries: the loss measurement and its gradient at the final parameters
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class QueryDraws:
    """Query images with their fixed measurement draws: m_q = mean_k ||eps_qk - eps_theta(x_t, t_k[, c_q])||^2 / D."""

    images: torch.Tensor  # (Q, C, H, W)
    t: torch.Tensor  # (K,) long, shared by all queries (measure.py)
    eps: torch.Tensor  # (Q, K, C, H, W)
    cond: torch.Tensor | None = None  # (Q,) long: each query's condition (caption index) for a conditional model

    def __len__(self):
        return int(self.images.shape[0])


def measurement_queries(
    config: dict, images: np.ndarray, stream: int, indices=None, dtype=torch.float32, device="cpu", cond=None
) -> QueryDraws:
    """The measure stage's draws for queries `indices` (default: all) of a query set (stream = contracts.query_stream).
    cond: the conditions of ALL the set's images (core.data.load_conditions), for a conditional model."""
    n = len(images)
    indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(f"query indices must lie in [0, {n}), got {indices.min()}..{indices.max()}")
    m = config["measure"]
    upto = int(indices.max()) + 1 if len(indices) else 1  # eps are seeded per query: draw up to the last selected
    t, eps = measurement_draws(
        upto,
        images.shape[1:],
        m["n_timesteps"],
        m["n_noise"],
        config["diffusion"]["num_train_timesteps"],
        config["seeds"]["measure"],
        stream,
    )
    x = torch.as_tensor(np.asarray(images)[indices], dtype=dtype, device=device)
    eps = eps[torch.from_numpy(indices)]
    c = None if cond is None else torch.as_tensor(np.asarray(cond, np.int64)[indices], device=device)
    return QueryDraws(x, t.to(device), eps.to(device=device, dtype=dtype), c)


def query_value_and_grad(
    problem: TrainingProblem, params: dict, queries: QueryDraws, q: int, batch_size: int = 500
) -> tuple[float, dict[str, torch.Tensor]]:
    """m_q at `params` and dm_q/dparams (the initial adjoint of the reverse pass)."""
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    total_draws = len(queries.t)
    grads = {n: torch.zeros_like(p) for n, p in leaves.items()}
    value = 0.0
    with torch.enable_grad():
        for start in range(0, total_draws, batch_size):
            t = queries.t[start : start + batch_size]
            eps = queries.eps[q, start : start + batch_size]
            x0 = queries.images[q].expand(len(t), *queries.images.shape[1:])
            cond = None if queries.cond is None else queries.cond[q].expand(len(t))
            pred = _predict(problem.model, leaves, add_noise(x0, t, eps, problem.a_bar), t, cond)
            part = (eps - pred).pow(2).flatten(1).mean(1).sum() / total_draws
            g = torch.autograd.grad(part, [leaves[n] for n in problem.names], materialize_grads=True)
            for n, gi in zip(problem.names, g):
                grads[n] += gi
            value += float(part.detach().double())
    return value, grads


# ----------------------------------------------------------------------------------------------------------------
# Reverse pass
# ----------------------------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class MetagradientResult:
    dm_dw: np.ndarray  # (Q, N) float64: d m_q / d w_i at the given weights
    values: np.ndarray  # (Q,) m_q at theta_T(w)
    final_params: dict
    info: dict

    @property
    def scores(self) -> np.ndarray:
        """S[q, i] = -dm_q/dw_i: predicted change of m_q when z_i is removed (w_i: 1 -> 0)."""
        return -self.dm_dw


def metagradients(
    problem: TrainingProblem,
    state0: State,
    queries: QueryDraws,
    weights=None,
    every: int | None = None,
    measure_batch_size: int = 500,
    progress_every: int = 0,
) -> MetagradientResult:
    """d m_q(theta_T(w)) / d w for every query of `queries` by reverse-mode through every training step.

    weights: default all ones (the MAGIC point). every: checkpoint interval (default ceil(sqrt(T))). States held at
    once: ceil(T / every) checkpoints + the `every` recomputed states of the current segment, minimal near sqrt(T);
    every=1 keeps all T states as checkpoints (no recomputation), every >= T one checkpoint but a T-state segment."""
    w = check_weights(problem, np.ones(problem.n_train) if weights is None else weights)
    T = problem.steps
    every = default_every(T) if every is None else every
    if not isinstance(every, (int, np.integer)) or isinstance(every, bool) or every < 1:
        raise ValueError(f"checkpoint interval `every` must be a positive integer, got {every!r}")
    every = int(min(every, T))
    if len(queries) == 0:
        raise ValueError("no queries to attribute")
    info = {
        "steps": T,
        "every": every,
        "n_queries": len(queries),
        "n_train": problem.n_train,
        "n_params": problem.n_params(),
        "dtype": str(problem.dtype).replace("torch.", ""),
    }
    state_bytes = 3 * info["n_params"] * problem.images.element_size()

    # 1. forward pass with checkpoints
    t0 = time.perf_counter()
    final, checkpoints = train(problem, state0, w, every=every)
    info["time_forward"] = time.perf_counter() - t0
    info["n_checkpoints"] = len(checkpoints)
    info["checkpoint_mb"] = len(checkpoints) * state_bytes / 2**20
    info["segment_mb"] = every * state_bytes / 2**20

    # 2. query adjoints at theta_T
    t0 = time.perf_counter()
    values, adjoints = [], []
    for q in range(len(queries)):
        value, g = query_value_and_grad(problem, final["params"], queries, q, measure_batch_size)
        values.append(value)
        adjoints.append(
            {
                "params": g,
                "exp_avg": {n: torch.zeros_like(x) for n, x in g.items()},
                "exp_avg_sq": {n: torch.zeros_like(x) for n, x in g.items()},
            }
        )
    info["time_query_gradients"] = time.perf_counter() - t0
    info["adjoint_mb"] = len(queries) * state_bytes / 2**20

    # 3. backward pass, segment by segment
    names = problem.names
    keys = ("params", "exp_avg", "exp_avg_sq")
    dm_dw = torch.zeros(len(queries), problem.n_train, dtype=torch.float64, device=problem.device)
    t0 = time.perf_counter()
    time_recompute = 0.0
    done = 0
    for seg_start in sorted(checkpoints, reverse=True):
        seg_stop = min(seg_start + every, T)
        tr = time.perf_counter()
        states = [checkpoints[seg_start]]
        for step in range(seg_start, seg_stop - 1):
            batch = problem.batch(step)
            states.append(training_step(problem, states[-1], w[batch.idx], step, batch))
        time_recompute += time.perf_counter() - tr
        for step in range(seg_stop - 1, seg_start - 1, -1):
            state = states.pop()
            batch = problem.batch(step)
            leaves = {key: {n: x.detach().requires_grad_() for n, x in state[key].items()} for key in keys}
            wb = w[batch.idx].detach().clone().requires_grad_()
            new = training_step(problem, leaves, wb, step, batch, create_graph=True)
            outputs = [new[key][n] for key in keys for n in names]
            inputs = [leaves[key][n] for key in keys for n in names] + [wb]
            for q, adj in enumerate(adjoints):
                grads = torch.autograd.grad(
                    outputs,
                    inputs,
                    grad_outputs=[adj[key][n] for key in keys for n in names],
                    retain_graph=q < len(adjoints) - 1,
                    materialize_grads=True,
                )
                it = iter(grads)
                adjoints[q] = {key: {n: next(it).detach() for n in names} for key in keys}
                dm_dw[q].index_add_(0, batch.idx, next(it).detach().to(torch.float64))
            del new, outputs, inputs, leaves
            done += 1
            if progress_every and done % progress_every == 0:
                log.info("metagradient: %d / %d reverse steps (%.1f s)", done, T, time.perf_counter() - t0)
    info["time_reverse"] = time.perf_counter() - t0
    info["time_recompute"] = time_recompute
    info["peak_rss_mb"] = _peak_rss_mb()
    return MetagradientResult(dm_dw.cpu().numpy(), np.asarray(values), final["params"], info)


# ----------------------------------------------------------------------------------------------------------------
# Query sets of the workflow
# ----------------------------------------------------------------------------------------------------------------
def concat_queries(parts: list[QueryDraws]) -> QueryDraws:
    if any(not torch.equal(parts[0].t, p.t) for p in parts[1:]):
        raise ValueError("query sets with different measurement timesteps cannot share a reverse pass")
    cond = None if parts[0].cond is None else torch.cat([p.cond for p in parts])
    return QueryDraws(torch.cat([p.images for p in parts]), parts[0].t, torch.cat([p.eps for p in parts]), cond)


def attribute(
    config: dict,
    dataset,
    query_sets: dict[str, np.ndarray],
    indices: dict[str, np.ndarray] | None = None,
    replicate: int = 0,
    every: int | None = None,
    device="cpu",
    dtype=torch.float32,
    conditions: dict[str, np.ndarray] | None = None,
) -> Attribution:
    """MAGIC scores of the selected queries of every query set, in ONE forward + reverse pass.

    dataset: the family's model inputs (model_inputs). query_sets: {name: images}; the measurement stream of a set
    is contracts.query_stream (else its position in query_sets). indices: {name: query indices to
    attribute} (default: all). conditions: {name: the set's conditions} (core.data.load_conditions), required for a
    conditional family: its queries are measured under their own captions, as in the measure stage.
    Returns scores {name: (len(indices), N) float64, S = -dm/dw at w = 1}, the measurements m_q at theta_T(1),
    the final parameters and cost information (times, memory)."""
    indices = {name: np.arange(len(images)) for name, images in query_sets.items()} if indices is None else indices
    unknown = sorted(set(indices) - set(query_sets))
    if unknown:
        raise ValueError(f"indices for unknown query sets {unknown}; known: {sorted(query_sets)}")
    conditional = is_conditional(config["model"])
    problem, state0 = build_problem(config, dataset, replicate, dtype=dtype, device=device)
    parts, names, sizes = [], [], []
    for position, (name, images) in enumerate(query_sets.items()):
        idx = np.asarray(indices.get(name, []), dtype=np.int64)
        if len(idx) == 0:
            continue
        cond = (conditions or {}).get(name) if conditional else None
        if conditional and cond is None:
            raise ValueError(f"the {name} queries need their conditions: the family measures a query under its caption")
        stream = query_stream(name) if name in ALL_QUERY_SETS else position
        parts.append(measurement_queries(config, images, stream, idx, dtype=dtype, device=device, cond=cond))
        names.append(name)
        sizes.append(len(idx))
    if not parts:
        raise ValueError("no queries selected for attribution")
    log.info(
        "metagradient: %d training steps, %d examples, queries %s, checkpoint every %s steps",
        problem.steps,
        problem.n_train,
        dict(zip(names, sizes)),
        every or default_every(problem.steps),
    )
    result = metagradients(
        problem,
        state0,
        concat_queries(parts),
        every=every,
        measure_batch_size=int(config["measure"]["batch_size"]),
        progress_every=50,
    )
    scores, values, start = {}, {}, 0
    for name, size in zip(names, sizes):
        scores[name] = result.scores[start : start + size]
        values[name] = result.values[start : start + size]
        start += size
    return Attribution(
        scores, values, {name: np.asarray(indices[name], np.int64) for name in names}, result.final_params, result.info
    )


@dataclass
class Attribution:
    scores: dict  # {query set: (n_attributed, N) float64}
    values: dict  # {query set: (n_attributed,) m_q at theta_T(1)}
    indices: dict  # {query set: attributed query indices}
    final_params: dict
    info: dict
