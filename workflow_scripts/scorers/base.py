"""The scorer declaration (`Scorer`) every scorer module subclasses, and helpers shared by the gradient-based scorer
families: what a method expects of its stores, similarity.

A scorer module declares one class per scorer family: its settings (a JSON schema per accepted form of a method
entry in scores.methods), the artefacts it reads (gradient stores, model files, chunk jobs), the configuration keys
its scores job reads, the model families it runs on, whether it takes a query_measurement, and its lambda grid.
The DAG (dag/paths.py, dag/config.py) derives rules, inputs and checks from these declarations, and the scores stage
calls `compute`. Modules of this package are imported by the Snakefile (through the registry in __init__.py), so
they import only light modules: a scorer whose computation needs torch or a model names an `engine` module
(workflow_scripts/engines/), loaded only when it computes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace

import numpy as np

from workflow_scripts.core.common import ArtefactError, log


class ScorerNotRun(Exception):
    """A scorer that cannot run in this environment (e.g. no CLIP weights): no numbers, a reason.

    `reason` is the short text for the results table ("not run: no CLIP weights"); `detail` says
    why (which setting, which file); str(exc) is both.
    """

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason} ({detail})" if detail else reason)


@dataclass(frozen=True)
class StoreNeed:
    """A gradient store a method reads (dag/paths.py turns it into a directory and files).

    role: 'final' (the final model), 'query' (query features of the method's query_measurement, kept inside the
    final store's directory), 'journey' (generated-query trajectory features), 'checkpoints' (one store per
    intermediate checkpoint of the full model, roles step<N>) or member<k> (ensemble member k, with_members).
    kind: avg | unitnorm | sketch | journey | measurement. timesteps: the timestep budget K (None:
    gradients.timesteps; a journey store: the sampling steps, None = sample.num_inference_steps). directions: output
    directions of a sketch store. target: the measured target of a measurement store. checkpoint: the model the
    store is computed at ('full', or member<k> for an ensemble member)."""

    role: str
    output_function: str
    kind: str = "avg"
    timesteps: int | None = None
    directions: int | None = None
    target: str | None = None
    checkpoint: str = "full"


# Schema fragments shared by several scorers' method entries (resolved against params.schema.yaml's definitions).
OUTPUT_FUNCTION = {"$ref": "#/definitions/output_function"}
TIMESTEPS = {"$ref": "#/definitions/timesteps"}
LAMBDA_GRID = {"$ref": "#/definitions/lambda_grid"}
POSINT = {"$ref": "#/definitions/posint"}
SIMILARITY = {"enum": ["dot", "cosine"]}
QUERY_MEASUREMENT = {"type": "string", "pattern": "^(loss|elbo|trajectory|timestep_loss_t[0-9]+)$"}
ENSEMBLE = POSINT  # the number of independently trained full models a method averages over (with_members)


def method_schema(family, required=(), **properties) -> dict:
    """The JSON schema of one form of a method entry: {family: <family>, ...properties}, nothing else."""
    family_schema = {"const": family} if isinstance(family, str) else {"enum": list(family)}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["family", *required],
        "properties": {"family": family_schema, **properties},
    }


class Scorer:
    """Declaration of one scorer family; subclass it in a module of this package and it is registered."""

    family: str = ""  # the value of scores.methods.<method>.family
    schemas: tuple[dict, ...] = ()  # accepted forms of a method entry (method_schema)
    model_families: tuple[str, ...] = ("ddpm",)  # model.family values it runs on
    refused_reason: str = "it is not implemented for that model family"  # shown when model.family is another
    takes_query_measurement: bool = False  # accepts query_measurement: query side = that measured target
    config_keys: tuple[str, ...] = ()  # configuration keys its scores job reads besides scores.* and lds.*
    model_inputs: tuple[str, ...] = ()  # model files it reads: classifier, model (final checkpoint), curvature
    chunk_jobs: bool = False  # its scores come from chunk jobs (rule metagradient), assembled by the scores job
    unscored_sets: tuple[str, ...] = ()  # query sets it never scores (all-NaN matrices, noted in its notes())
    engine: str | None = None  # module with compute(method_cfg, inputs, lambdas), imported when it computes
    # its methods differ only in what they do with shared work (K-FAC: the query side of one pass of training
    # gradients): ONE scores job computes them all (rule scores_<family>_family, the engine's compute_family)
    shared_pass: bool = False
    # accepts `ensemble: K`: its scores are averaged over K full models trained with different seeds (with_members)
    takes_ensemble: bool = False
    # a method setting that may be a LIST, swept beside lambda and chosen on the tuning subsets like it (AbU's
    # parameter subset); compute then returns (lambda, matrices, setting) triples, sweep.csv gains a setting column
    swept_setting: str | None = None

    def stores(self, method_cfg: dict) -> list[StoreNeed]:
        """The gradient stores a method reads at the full model (none by default)."""
        return []

    def all_stores(self, method_cfg: dict) -> list[StoreNeed]:
        """stores(), and again at every other member of the method's ensemble (dag/paths.py reads this)."""
        return with_members(self.stores(method_cfg), ensemble_size(method_cfg))

    def method_model_inputs(self, method_cfg: dict) -> tuple[str, ...]:
        """The model files one method reads, a subset of model_inputs (default: all of them)."""
        return self.model_inputs

    def lambdas(self, method_cfg: dict, config: dict) -> list[float]:
        """The lambda grid the scores stage sweeps: the method's own, else scores.lambda_grid (scorers without a
        lambda ignore it and return one result)."""
        return list(method_cfg.get("lambda_grid", config["scores"]["lambda_grid"]))

    def compute(self, method_cfg: dict, inputs, lambdas) -> list:
        """[(lambda or None, {query set: (n_query, n_train) scores})] (S[q, i] = predicted change of the query's
        measurement when training example i is removed)."""
        if self.engine is None:
            raise NotImplementedError(f"scorer {self.family!r} defines neither compute() nor an engine")
        return importlib.import_module(self.engine).compute(method_cfg, inputs, lambdas)

    def compute_methods(self, methods: dict[str, dict], inputs: dict, lambdas: dict[str, list]) -> dict[str, list]:
        """{method: compute's results} of the methods of one scores job (several only for a shared_pass scorer, whose
        engine's compute_family(methods, inputs, lambdas) shares the work); inputs and lambdas are keyed by method."""
        if self.shared_pass:
            return importlib.import_module(self.engine).compute_family(methods, inputs, lambdas)
        if len(methods) != 1:
            raise ValueError(f"scorer {self.family!r} computes one method per job, got {sorted(methods)}")
        return {m: self.compute_ensemble(cfg, inputs[m], lambdas[m]) for m, cfg in methods.items()}

    def compute_ensemble(self, method_cfg: dict, inputs, lambdas) -> list:
        """compute's results, averaged over the method's ensemble members (one model: compute itself). Each member
        is scored on its own stores with its own kernel; lambda stays relative to each member's own scale."""
        roles = member_roles(ensemble_size(method_cfg))
        if len(roles) == 1:
            return self.compute(method_cfg, inputs, lambdas)
        members = []
        for role in roles:
            log.info("ensemble member %s of %d", role, len(roles))
            members.append(self.compute(method_cfg, MemberInputs(inputs, role), lambdas))
        return average_members(members)

    def notes(self, method_cfg: dict) -> dict[str, str]:
        """{query set: caveat} shown beside the method's rows."""
        return query_notes(method_cfg) if self.takes_query_measurement else {}

    def settings(self, method_cfg: dict, config: dict) -> dict:
        """Resolved settings saved in chosen.json (the ablation tables' columns)."""
        return {}

    def check(self, name: str, method_cfg: dict, config: dict) -> None:
        """Cross-field checks of one method entry beyond its schema (ValueError naming the field)."""
        if ensemble_size(method_cfg) > 1 and query_target(method_cfg) != "loss":
            raise ValueError(
                f"scores.methods.{name}: ensemble and query_measurement {query_target(method_cfg)!r} cannot be "
                "combined (the members' measurement features are not computed); drop one of them"
            )

    def unavailable(self, name: str, method_cfg: dict) -> str | None:
        """Why the method will produce no scores in this configuration (e.g. no CLIP weights), or None."""
        return None

    def query_target(self, method_cfg: dict) -> str:
        """The measured target the method's scores predict (its lambda is tuned on it)."""
        return query_target(method_cfg) if self.takes_query_measurement else "loss"


# ---------------------------------------------------------------- ensembles
#
# A method with `ensemble: K` (a scorer with takes_ensemble) reads its stores at K independently trained full models:
# the full model (role 'final') and members member1 .. member<K-1> (results/<b>/models/ensemble/member<k>/model.pt:
# the full training set, training seed seeds.train + k). Its scores are the mean of the K members' scores (TRAK's
# ensemble, arXiv 2303.14186, section 3; D-TRAK averages scores the same way).


def ensemble_size(method_cfg: dict) -> int:
    return int(method_cfg.get("ensemble", 1))


def member_roles(size: int) -> list[str]:
    """'final', member1, ..., member<size-1>: the store roles (and checkpoints) of an ensemble's models."""
    return ["final", *(f"member{k}" for k in range(1, size))]


def with_members(needs: list[StoreNeed], size: int) -> list[StoreNeed]:
    """The stores of an ensemble: each of the full model's stores (role 'final') again at every other member."""
    members = [
        replace(need, role=role, checkpoint=role)
        for role in member_roles(size)[1:]
        for need in needs
        if need.role == "final"
    ]
    return [*needs, *members]


class MemberInputs:
    """The scores stage's inputs as one ensemble member sees them: role 'final' is that member's store."""

    def __init__(self, inputs, member: str):
        self._inputs, self._member = inputs, member

    def __getattr__(self, name):
        return getattr(self._inputs, name)

    def _role(self, role: str) -> str:
        return self._member if role == "final" else role

    def features(self, role, split, expect=None):
        return self._inputs.features(self._role(role), split, expect)

    def sidecar(self, role, split):
        return self._inputs.sidecar(self._role(role), split)

    def residuals(self, role):
        return self._inputs.residuals(self._role(role))

    def checkpoint(self, role):
        return self._inputs.checkpoint(self._role(role))


def average_members(members: list[list]) -> list:
    """The mean over members of compute's results [(lambda, {query set: scores})], lambda by lambda."""
    first = members[0]
    for other in members[1:]:
        if [lam for lam, _ in other] != [lam for lam, _ in first]:
            raise ValueError("ensemble members returned different lambda grids")
    return [
        (
            lam,
            {
                name: np.mean([m[i][1][name] for m in members], axis=0, dtype=np.float64).astype(np.float32)
                for name in matrices
            },
        )
        for i, (lam, matrices) in enumerate(first)
    ]


def loss_store(method_cfg: dict, role: str = "final") -> StoreNeed:
    """The store of TRAK-like loss (or output function) features averaged over the method's K timesteps."""
    return StoreNeed(role, method_cfg["output_function"], "avg", method_cfg.get("timesteps"))


def query_measurement_stores(method_cfg: dict) -> list[StoreNeed]:
    """The query-feature store of a query_measurement other than the loss (none for the loss)."""
    target = query_target(method_cfg)
    if target == "loss":
        return []
    return [
        StoreNeed("query", method_cfg["output_function"], "measurement", method_cfg.get("timesteps"), target=target)
    ]


class LossFeatureScorer(Scorer):
    """A scorer on the final model's TRAK-style features of an output function (the store of rule gradients), with
    the query features of its query_measurement when it names another measured target: TRAK / D-TRAK, gradient
    similarity, relative / renormalised influence."""

    model_families = ("ddpm", "latent")  # latent: the gradients of the LoRA parameters, conditioned on the caption
    refused_reason = "its gradient store (rule gradients) holds gradients of DDPM output functions at DDPM timesteps"
    takes_query_measurement = True

    def stores(self, method_cfg: dict) -> list[StoreNeed]:
        return [loss_store(method_cfg), *query_measurement_stores(method_cfg)]


CHUNK_BYTES = 64 * 2**20  # float64 bytes of one chunk of training rows


def row_chunks(features, chunk_bytes: int | None = None):
    """(slice, float64 rows) over the first axis of a (memory-mapped) array, about chunk_bytes (CHUNK_BYTES) at a time."""
    per_row = max(1, int(np.prod(features.shape[1:])) * 8)
    step = max(1, (chunk_bytes or CHUNK_BYTES) // per_row)
    for start in range(0, len(features), step):
        rows = slice(start, min(start + step, len(features)))
        yield rows, np.asarray(features[rows], dtype=np.float64)


# made_by entries that put features of different stores in the same space (same model family and projection)
SPACE = ("model", "diffusion", "projection", "projection_dim", "seed_projection", "sjlt_nonzeros")


def expected_store(method_cfg: dict, kind: str = "avg", output_function: str | None = None, **extra) -> dict:
    """Sidecar `made_by` entries a method's store must have (checked by ScorerInputs.features).

    The timestep budget is checked only when the method fixes it (`timesteps`); otherwise it is the
    gradients.timesteps default, which the scores stage does not see."""
    expect = {"kind": kind, "output_function": output_function or method_cfg["output_function"], **extra}
    if "timesteps" in method_cfg:
        expect["timesteps"] = method_cfg["timesteps"]
    return expect


def similarity(queries: np.ndarray, train: np.ndarray, kind: str, tiny: float = 1e-300) -> np.ndarray:
    """(n_query, n_train) dot product or cosine of flattened vectors, computed in float64 over chunks of the
    training rows (a memory-mapped store is never read whole; norms are clipped at `tiny`)."""
    if kind not in ("dot", "cosine"):
        raise ValueError(f"unknown similarity {kind!r}")
    q = np.asarray(queries, dtype=np.float64).reshape(len(queries), -1)
    if kind == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(tiny)
    out = np.empty((len(q), len(train)))
    for rows, chunk in row_chunks(train):
        x = chunk.reshape(len(chunk), -1)
        if kind == "cosine":
            x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(tiny)
        out[:, rows] = q @ x.T
    return out


def check_same_space(inputs, stores: list[tuple[str, str]], keys=SPACE) -> None:
    """Stores combined by one method must share their projection (and whatever else `keys` names)."""
    (role0, split0), *rest = stores
    ref = inputs.sidecar(role0, split0)["made_by"]
    for role, split in rest:
        made_by = inputs.sidecar(role, split)["made_by"]
        for key in keys:
            if made_by.get(key) != ref.get(key):
                raise ArtefactError(
                    f"gradient stores {role0!r} and {role!r} differ in {key} "
                    f"({ref.get(key)!r} vs {made_by.get(key)!r}); their features cannot be combined"
                )


# ---------------------------------------------------------------- query_measurement (TRAK family)
#
# A method's query_measurement m (default loss) replaces its query features by P^T grad m(x_q) from the store role
# 'query' (paths.method_stores, rule gradients_measurement); the training side stays the loss store. Trajectory has
# no held-out queries: those keep the loss features (noted).


def query_target(method_cfg: dict) -> str:
    """The measured target the method's query features are gradients of (scores.py tunes lambda on it)."""
    return method_cfg.get("query_measurement", "loss")


def uses_loss_queries(method_cfg: dict, query_set: str) -> bool:
    target = query_target(method_cfg)
    return target == "loss" or (target == "trajectory" and query_set != "generated")


def query_features(method_cfg: dict, inputs, query_set: str, expect: dict) -> np.ndarray:
    """The query features of one set: the loss store's, or the query_measurement store's (same projection)."""
    if uses_loss_queries(method_cfg, query_set):
        return inputs.features("final", query_set, expect)
    check_same_space(inputs, [("final", "train"), ("query", query_set)], (*SPACE, "checkpoint", "seed_gradients"))
    return inputs.features("query", query_set, {"query_measurement": query_target(method_cfg)})


def query_notes(method_cfg: dict) -> dict[str, str]:
    if query_target(method_cfg) == "trajectory":
        return {name: "loss query features: these images have no sampling trajectory" for name in ("heldout", "extra")}
    return {}
