"""Attribution by unlearning, AbU and AbU+ ("Data Attribution for Text-to-Image Models by Unlearning Synthesized
Images", arXiv:2406.09408; docs/methods.md "Attribution by unlearning").

One preconditioned gradient-ASCENT step on the query's loss "unlearns" the query,

    theta' = theta + eta * P^-1 g_q          g_q = grad of the query's simple loss (query_draws draws, its caption),

and a training image's score is how much its own loss rises under that step, at fixed draws:

    S[q, i] = L_i(theta') - L_i(theta) ~ eta * g_i^T P^-1 g_q        (positive: z_i supported the query).

P = N * (F + damping): `fisher: diagonal` (AbU) takes F = the diagonal empirical Fisher, the mean over the N training
images of squared per-example gradients at one random draw each, and damping relative to its mean entry; `fisher:
ekfac` (AbU+) takes F = the fitted K-FAC / EK-FAC curvature of the training loss (rule curvature, the variant of
kfac.* overridden by the method's fisher_type / kfac_approx / ekfac) and damping relative to its mean eigenvalue.
Only the parameters of `params` move: all (every Linear / Conv2d weight and bias; the latent family: every LoRA
adapter), attention (the attention projections to_q / to_k / to_v / to_out) or cross_attention_kv (the key and
value projections of the cross-attention attn2, the paper's choice for text-to-image models; the latent family).
The step size eta is the method's lambda: `lambda_grid` is swept and chosen on the tuning subsets like every other
method's lambda; `params` given as a list is swept with it (every subset x every step size, the pair with the best
tuning LDS kept: Scorer.swept_setting). The computation is workflow_scripts/engines/unlearning.py.
"""

from __future__ import annotations

from workflow_scripts.core.contracts import params_defaults
from workflow_scripts.scorers.base import LAMBDA_GRID, POSINT, Scorer, method_schema

FISHERS = ("diagonal", "ekfac")
# the parameter subsets a method may move: a regular expression searched in each parameter's name
PARAM_SUBSETS = {
    "all": r".",
    "attention": r"(^|\.)to_(q|k|v|out)(\.|$)",
    "cross_attention_kv": r"(^|\.)attn2\.to_(k|v)(\.|$)",
}
DEFAULTS = {
    "params": "all",
    "query_draws": 16,  # (t, eps) draws averaged in the query gradient g_q
    "loss_draws": 1,  # fixed (t, eps) draws per training image of L_i before and after the step
    "damping": 1.0e-3,  # relative: x the mean diagonal Fisher entry (diagonal) / mean eigenvalue (ekfac)
    "batch_size": 256,  # model rows (image x draw) per forward / per-example gradient batch
    "lambda_grid": [1.0e-3, 1.0e-2, 1.0e-1],  # step sizes eta
}
CURVATURE_KEYS = ("fisher_type", "kfac_approx", "ekfac")  # the curvature variant of fisher: ekfac (rule curvature)


def param_subsets(params) -> list:
    """The parameter subsets of a `params` value: one name, or a list of them swept beside the step size."""
    return [params] if isinstance(params, str) else list(params)


def method_options(method_cfg: dict) -> dict:
    """The method's settings with the defaults filled in; ValueError naming a field that is inconsistent."""
    opts = {**DEFAULTS, **{k: v for k, v in method_cfg.items() if k != "family"}}
    if "fisher" not in opts:
        raise ValueError("unlearning: the method entry needs fisher: diagonal (AbU) or ekfac (AbU+)")
    if opts["fisher"] not in FISHERS:
        raise ValueError(f"unlearning: fisher {opts['fisher']!r} is not one of {FISHERS}")
    subsets = param_subsets(opts["params"])
    unknown = [p for p in subsets if p not in PARAM_SUBSETS]
    if unknown or not subsets or len(set(subsets)) != len(subsets):
        raise ValueError(
            f"unlearning: params {opts['params']!r} must be one of {sorted(PARAM_SUBSETS)} or a list of distinct ones"
        )
    stray = [k for k in CURVATURE_KEYS if k in method_cfg and opts["fisher"] != "ekfac"]
    if stray:
        raise ValueError(f"unlearning: {stray} select a fitted curvature, which only fisher: ekfac uses")
    return opts


class Unlearning(Scorer):
    family = "unlearning"
    schemas = (
        method_schema(
            "unlearning",
            ["fisher"],
            fisher={"enum": list(FISHERS)},  # diagonal: AbU; ekfac: AbU+ on the fitted curvature
            # the parameters the unlearning step moves; a list: each is a candidate of the sweep (swept_setting)
            params={
                "oneOf": [
                    {"enum": sorted(PARAM_SUBSETS)},
                    {"type": "array", "items": {"enum": sorted(PARAM_SUBSETS)}, "minItems": 1, "uniqueItems": True},
                ]
            },
            query_draws=POSINT,
            loss_draws=POSINT,
            damping={"type": "number", "minimum": 0},  # relative to the Fisher's mean entry / eigenvalue
            batch_size=POSINT,
            lambda_grid=LAMBDA_GRID,  # the step sizes eta
            # fisher: ekfac only: the curvature variant (default: the kfac section's)
            fisher_type={"enum": ["mc", "empirical", "type-2"]},
            kfac_approx={"enum": ["expand", "reduce"]},
            ekfac={"type": "boolean"},
        ),
    )
    model_families = ("ddpm", "latent")  # latent: the LoRA parameters, each image under its caption
    refused_reason = (
        "its step and losses are the DDPM simple loss (the VE-SDE's denoising score matching is not wired into it)"
    )
    config_keys = ("model", "diffusion", "kfac", "seeds.gradients", "data.dataset", "compute")
    model_inputs = ("model", "curvature")  # the curvature only for fisher: ekfac (method_model_inputs)
    engine = "workflow_scripts.engines.unlearning"
    swept_setting = "params"  # params: [a, b]: each subset is swept with every step size, chosen on tuning subsets

    def method_model_inputs(self, method_cfg):
        return self.model_inputs if method_cfg.get("fisher") == "ekfac" else ("model",)

    def lambdas(self, method_cfg, config):
        """The step sizes eta: the method's lambda_grid, else DEFAULTS' (never scores.lambda_grid, a damping)."""
        return [float(eta) for eta in method_cfg.get("lambda_grid", DEFAULTS["lambda_grid"])]

    def check(self, name, method_cfg, config):
        try:
            method_options(method_cfg)
        except ValueError as exc:
            raise ValueError(f"scores.methods.{name}: {exc}") from None

    def settings(self, method_cfg, config):
        opts = method_options(method_cfg)
        out = {k: opts[k] for k in ("fisher", "params", "query_draws", "loss_draws", "damping")}
        if opts["fisher"] == "ekfac":
            kfac = {**params_defaults("kfac", CURVATURE_KEYS), **config.get("kfac", {})}
            out.update({k: method_cfg.get(k, kfac[k]) for k in CURVATURE_KEYS})
        return out
