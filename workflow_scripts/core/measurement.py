"""The Measurement protocol and the per-example gradient engine.

A Measurement is a differentiable per-image quantity m(x) of a model (the simple loss over fixed draws, an ELBO,
a per-timestep loss, a trajectory log-probability, exact bits/dim): draws() gives its per-image random inputs and
objective() its value for one image. per_example_gradients() differentiates any of them per image with
torch.func (vmap over grad), for the parameters a ParamLayout names; the K-FAC scorer, the gradient stores of
likelihood targets and the metagradient queries all go through it.

Conditional models (core.curvature.is_conditional: forward(x_t, t, cond), families/latent.py): iter_gradients /
gradients take the images' conditions (one integer per image) and put them in the draws as d["cond"] (a 0-d long
per image under vmap); the objective passes d.get("cond") to predict(x_t, t, cond), which repeats it for the
image's draws. Unconditional models: no "cond" key, predict(x_t, t) calls model(x_t, t) as before.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from workflow_scripts.core.curvature import ParamLayout, is_conditional


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------
class Measurement:
    """A differentiable per-image quantity. draws(): per-image tensors (leading dim = image); objective():
    scalar for ONE image and its draws, called under torch.func.vmap with predict(x_t, t, cond=None) -> eps_theta
    (cond: the image's condition d["cond"] of a conditional model, else None)."""

    name = "measurement"

    def draws(self, n: int, image_shape, start: int = 0) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def objective(self, predict, x0: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class SimpleLossMeasurement(Measurement):
    """sum_k w_k ||eps_k - eps_theta(x_t_k, t_k)||^2 / D with w_k = 1/K: the simple loss over fixed draws.

    draw_fn(n, image_shape, start) -> (t (n, K) long, eps (n, K, *image_shape)); images start..start+n-1.
    """

    name = "loss"

    def __init__(self, draw_fn, a_bar: torch.Tensor):
        self.draw_fn, self.a_bar = draw_fn, a_bar.double()

    def draws(self, n, image_shape, start=0):
        t, eps = self.draw_fn(n, image_shape, start)
        a = self.a_bar[t]  # looked up outside vmap
        k = t.shape[1]
        return {
            "t": t,
            "eps": eps.float(),
            "signal": a.sqrt().float(),
            "noise": (1 - a).sqrt().float(),
            "weight": torch.full(t.shape, 1.0 / k),
        }

    def objective(self, predict, x0, d):
        shape = (-1,) + (1,) * x0.dim()
        x_t = d["signal"].view(shape) * x0.unsqueeze(0) + d["noise"].view(shape) * d["eps"]
        cond = d.get("cond")
        per_draw = (d["eps"] - (predict(x_t, d["t"]) if cond is None else predict(x_t, d["t"], cond))).pow(2)
        per_draw = per_draw.flatten(1).mean(1)
        return (d["weight"] * per_draw).sum()


# ----------------------------------------------------------------------------------------------------------------
# Per-example gradients
# ----------------------------------------------------------------------------------------------------------------
def _check_conditions(model, draws: dict) -> None:
    if is_conditional(model) != ("cond" in draws):
        raise ValueError(
            "a conditional model needs the images' conditions (draws['cond'])"
            if is_conditional(model)
            else "conditions (draws['cond']) given for an unconditional model"
        )


def _objective(model, measurement: Measurement, frozen: dict):
    """objective(p, x, d): measurement.objective of one image x and its draws d at the parameters {**frozen, **p}."""
    conditional = is_conditional(model)

    def objective(p, x, d):
        def predict(x_t, t, cond=None):
            if conditional and cond is None:
                raise ValueError(f"measurement {measurement.name!r} does not pass the condition to the model")
            # cond: the image's 0-d condition (under vmap), the same for all of its draws (the rows of x_t)
            inputs = (x_t, t) if cond is None else (x_t, t, cond.expand(t.shape))
            out = functional_call(model, {**frozen, **p}, inputs)
            return out.sample if hasattr(out, "sample") else out

        return measurement.objective(predict, x, d)

    return objective


def per_example_gradients(
    model, layout: ParamLayout, images: torch.Tensor, draws: dict, measurement: Measurement
) -> torch.Tensor:
    """(B, P) float32: grad of measurement.objective per image w.r.t. the layout's parameters (others fixed).

    draws["cond"] (B,) long: the images' conditions, required for a conditional model and refused otherwise."""
    _check_conditions(model, draws)
    params = {n: p.detach() for n, p in model.named_parameters()}
    tracked = {n: params[n] for n in layout.names}
    frozen = {n: p for n, p in params.items() if n not in tracked}
    objective = _objective(model, measurement, frozen)
    grads = vmap(grad(objective), in_dims=(None, 0, 0))(tracked, images, draws)
    return torch.cat([grads[n].flatten(1) for n in layout.names], dim=1)


@torch.no_grad()
def per_example_values(
    model, images: torch.Tensor, draws: dict, measurement: Measurement, params: dict | None = None
) -> torch.Tensor:
    """(B,) measurement.objective per image (vmap over images) at the model's parameters with those named in `params`
    replaced by the given tensors (functional_call: the model itself is not modified). draws["cond"]: as
    per_example_gradients."""
    _check_conditions(model, draws)
    base = {n: p.detach() for n, p in model.named_parameters()}
    unknown = sorted(set(params or {}) - set(base))
    if unknown:
        raise ValueError(f"per_example_values: {unknown[:3]} are not parameters of the model")
    objective = _objective(model, measurement, {**base, **(params or {})})
    return vmap(objective, in_dims=(None, 0, 0))({}, images, draws)


def iter_gradients(
    model,
    layout: ParamLayout,
    images: np.ndarray,
    measurement: Measurement,
    batch_rows: int,
    device,
    offset: int = 0,
    cond: np.ndarray | None = None,
) -> iter[tuple[int, torch.Tensor]]:
    """(start, (B, P) gradients) batch by batch; B * draws-per-image <= batch_rows (at least one image).
    `offset`: images[0] is image `offset` of its set (its draws are that image's). `cond`: the images' conditions
    (len(images),) integers for a conditional model (draws["cond"]), None for an unconditional one."""
    if cond is not None:
        cond = np.asarray(cond)
        if cond.shape != (len(images),) or not np.issubdtype(cond.dtype, np.integer):
            raise ValueError(f"cond: {cond.shape} {cond.dtype}, expected one integer per image ({len(images)},)")
    probe = measurement.draws(1, images.shape[1:], 0)
    per_image = int(probe["t"].shape[1]) if probe["t"].dim() > 1 else 1
    batch = max(1, int(batch_rows) // max(per_image, 1))
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.asarray(images[start : start + batch], dtype=np.float32)).to(device)
        d = {k: v.to(device) for k, v in measurement.draws(len(x), images.shape[1:], offset + start).items()}
        if cond is not None:
            d["cond"] = torch.from_numpy(cond[start : start + batch].astype(np.int64)).to(device)
        yield start, per_example_gradients(model, layout, x, d, measurement)


def gradients(
    model, layout, images, measurement, batch_rows, device, offset: int = 0, cond: np.ndarray | None = None
) -> torch.Tensor:
    """(n, P) per-example gradients of all images (iter_gradients' batches concatenated)."""
    return (
        torch.cat([g for _, g in iter_gradients(model, layout, images, measurement, batch_rows, device, offset, cond)])
        if len(images)
        else torch.zeros(0, layout.n_params)
    )


def values(
    model,
    images: np.ndarray,
    measurement: Measurement,
    batch_rows: int,
    device,
    offset: int = 0,
    cond: np.ndarray | None = None,
    params: dict | None = None,
) -> torch.Tensor:
    """(n,) float64: measurement.objective of every image (per_example_values batch by batch, the batching and draws
    of iter_gradients), at the model's parameters with those named in `params` replaced."""
    if cond is not None:
        cond = np.asarray(cond)
        if cond.shape != (len(images),) or not np.issubdtype(cond.dtype, np.integer):
            raise ValueError(f"cond: {cond.shape} {cond.dtype}, expected one integer per image ({len(images)},)")
    if not len(images):
        return torch.zeros(0, dtype=torch.float64)
    probe = measurement.draws(1, images.shape[1:], 0)
    per_image = int(probe["t"].shape[1]) if probe["t"].dim() > 1 else 1
    batch = max(1, int(batch_rows) // max(per_image, 1))
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.asarray(images[start : start + batch], dtype=np.float32)).to(device)
        d = {k: v.to(device) for k, v in measurement.draws(len(x), images.shape[1:], offset + start).items()}
        if cond is not None:
            d["cond"] = torch.from_numpy(cond[start : start + batch].astype(np.int64)).to(device)
        out.append(per_example_values(model, x, d, measurement, params).double().cpu())
    return torch.cat(out)
