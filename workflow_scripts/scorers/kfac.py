"""K-FAC influence (Influence Functions for Scalable Data Attribution in Diffusion Models, arXiv:2410.13850):
S[q, i] = (1/N) grad m(x_q)^T (G + lambda I)^-1 grad l(z_i), G the fitted K-FAC / EK-FAC of the training-loss GGN.

The declaration: settings, inputs (the final checkpoint and the curvature variant of its settings), lambda grid and
notes. The computation is workflow_scripts/engines/kfac.py. Every kfac method of a configuration is scored by ONE job
(shared_pass; rule scores_kfac_family): the methods differ only on the query side (curvature variant, quantisation,
damping grid, query measurement), so the training gradients are computed once for all of them.
"""

from __future__ import annotations

from workflow_scripts.core.contracts import ALL_QUERY_SETS, params_defaults
from workflow_scripts.scorers.base import LAMBDA_GRID, QUERY_MEASUREMENT, Scorer, method_schema

QUANTIZATIONS = ("int8", "float32")
# the scoring settings of the kfac section, filled from params.yaml where a partial section leaves them out
SCORE_DEFAULTS = params_defaults("kfac", ("gradient_draws", "query_draws", "batch_size", "quantization"))
METHOD_KEYS = ("fisher_type", "kfac_approx", "ekfac")  # curvature settings a method may override


def query_target(method_cfg: dict) -> str:
    """The measured target a kfac method's query gradients (and so its scores) are of."""
    return method_cfg.get("query_measurement", "loss")


def settings(method_cfg: dict, config: dict) -> dict:
    """The resolved settings of a kfac method (kfac.* with the method's overrides): the ablation table's columns."""
    k = {
        **SCORE_DEFAULTS,
        **config.get("kfac", {}),
        **{key: method_cfg[key] for key in (*METHOD_KEYS, "quantization") if key in method_cfg},
    }
    return {
        "fisher_type": k["fisher_type"],
        "kfac_approx": k["kfac_approx"],
        "ekfac": bool(k["ekfac"]),
        "quantization": k["quantization"],
        "damping": method_cfg.get("damping", "relative"),
        "query_measurement": query_target(method_cfg),
    }


def notes(method_cfg: dict) -> dict[str, str]:
    out = {}
    if method_cfg.get("damping") == "absolute":
        grid = ", ".join(f"{lam:g}" for lam in method_cfg.get("lambda_grid", []))
        text = (
            f"absolute damping {grid} (paper default), not tuned"
            if len(method_cfg.get("lambda_grid", [])) == 1
            else f"absolute damping grid {grid}"
        )
        out = {name: text for name in ALL_QUERY_SETS}
    if query_target(method_cfg) == "trajectory":  # likelihood.target_measurement: only generated queries have one
        text = "loss query gradients: these images have no sampling trajectory"
        for name in ALL_QUERY_SETS[1:]:
            out[name] = f"{out[name]}; {text}" if name in out else text
    return out


class KFAC(Scorer):
    family = "kfac"
    schemas = (
        method_schema(
            "kfac",
            fisher_type={"enum": ["mc", "empirical", "type-2"]},
            kfac_approx={"enum": ["expand", "reduce"]},
            ekfac={"type": "boolean"},
            quantization={"enum": list(QUANTIZATIONS)},
            damping={"enum": ["relative", "absolute"]},
            lambda_grid=LAMBDA_GRID,
            query_measurement=QUERY_MEASUREMENT,
        ),
    )
    model_families = ("ddpm", "latent")  # latent: the LoRA parameters, conditioned on the caption
    refused_reason = (
        "the curvature rule fits K-FAC to the DDPM training loss (the DSM loss and the bits/dim query "
        "gradients of the VE-SDE likelihood are not wired into rules curvature / scores)"
    )
    takes_query_measurement = True
    config_keys = (
        "model",
        "diffusion",
        "kfac",
        "seeds.gradients",
        "seeds.measure",
        "measure",
        "data.dataset",
        "compute",
    )
    model_inputs = ("model", "curvature")
    engine = "workflow_scripts.engines.kfac"
    # the methods differ only on the query side: one job preconditions each one's queries and streams the training
    # gradients once for all (engines/kfac.py: compute_family)
    shared_pass = True

    def lambdas(self, method_cfg, config):
        """The method's lambda_grid, else kfac.lambda_grid (K-FAC's damping grid reaches far lower than TRAK's: the
        paper uses almost none), else scores.lambda_grid; absolute dampings when the method says damping: absolute."""
        grid = (
            method_cfg.get("lambda_grid")
            or config.get("kfac", {}).get("lambda_grid")
            or config["scores"]["lambda_grid"]
        )
        return [float(lam) for lam in grid]

    def notes(self, method_cfg):
        return notes(method_cfg)

    def settings(self, method_cfg, config):
        return settings(method_cfg, config)
