"""Stage `scores`: one attribution method's score matrices, its lambda chosen on TUNING subsets.

For each lambda of scores.lambda_grid (methods without one: a single entry) the LDS of every query
set is computed on the TUNING subsets and, for the record, on the EVALUATION subsets, against the
measured target the method's scores predict (Scorer.query_target: the loss, or the query_measurement of a K-FAC or
TRAK-family method such as the ELBO; a query set without that target, held-out for trajectory, uses
the loss). The lambda with the best mean TUNING LDS over the query sets is kept; its matrices are
written as <query_set>.npy (n_query x n_train, float32) beside sweep.csv, and the LDS-vs-lambda curve as sweep.png.
A method may set its own `lambda_grid` (else scores.lambda_grid). A scorer with a `swept_setting` (AbU's parameter
subset) sweeps (setting, lambda) pairs: sweep.csv gets a setting column and chosen.json the chosen setting.

One job scores one method, or every method of a scorer family that declares `shared_pass` (the K-FAC family: one
pass of training gradients for all of them, rule scores_<family>_family); each method's files are its own either way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from workflow_scripts.core import data as core_data
from workflow_scripts.core.common import (
    ArtefactError,
    NonFiniteError,
    load_torch,
    log,
    save_json,
    save_npy,
    save_text,
)
from workflow_scripts.core.contracts import EXTRA_QUERY_SET, QUERY_SETS, RESIDUAL
from workflow_scripts.core.data import load_queries
from workflow_scripts.core.lds import lds_per_query, mean_over_scored, scored_queries
from workflow_scripts.core.store import check_provenance, open_store, read_sidecar, store_provenance
from workflow_scripts.dag import paths
from workflow_scripts.families.likelihood import method_targets
from workflow_scripts.report.plotting import save_figure
from workflow_scripts.scorers import ScorerNotRun, get_scorer


class ScorerInputs:
    """Lazy access to what scorers read: images, query images and cached gradient stores.

    Stores are named by role (paths.method_stores): 'final', 'step<N>' (intermediate checkpoints) and
    'journey'. Every store is checked against its sidecar and its bytes against the sidecar's digest; with a
    configuration, its sidecar against the run's model, projector and the checkpoint of its role
    (store_checkpoints: core/store.py store_provenance); and against what the method expects of it."""

    def __init__(
        self,
        dataset: str,
        samples: str,
        stores: dict[str, str] | None = None,
        classifier_path: str | None = None,
        model_path: str | None = None,
        curvature_path: str | None = None,
        config: dict | None = None,
        chunks: list[str] | None = None,
        images: str | None = None,
        store_checkpoints: dict[str, str] | None = None,
        extra: str | None = None,
        extra_images: str | None = None,
    ):
        self.dataset, self.samples, self.stores = dataset, samples, dict(stores or {})
        # the user's own queries (queries.extra): as the model takes them, and as images (pixel-space scorers)
        self.extra, self.extra_images = extra, extra_images or extra
        self.query_sets = (*QUERY_SETS, EXTRA_QUERY_SET) if extra else QUERY_SETS
        # the data stage's images (pixel space); `dataset` is the model inputs (the latent family: VAE latents)
        self.images = images or dataset
        # Model-based scorers: the embedding classifier, the final diffusion checkpoint and its curvature (K-FAC).
        self.classifier_path, self.model_path, self.curvature_path = classifier_path, model_path, curvature_path
        self.config = config or {}
        self.chunks = list(chunks or [])  # metagradient: the chunk jobs' score files (rule metagradient)
        self.store_checkpoints = dict(store_checkpoints or {})
        self._queries = None
        self._provenance: dict[str, dict] = {}

    def train_images(self) -> np.ndarray:
        return core_data.load_dataset(self.dataset)["train_images"]

    def queries(self) -> dict[str, np.ndarray]:
        if self._queries is None:
            self._queries = load_queries(self.dataset, self.samples, self.extra)
        return self._queries

    def train_pixels(self) -> np.ndarray:
        """The training IMAGES (= train_images() for a pixel-space family)."""
        return core_data.load_dataset(self.images)["train_images"]

    def query_pixels(self) -> dict[str, np.ndarray]:
        """The query sets as images at the training images' size (core.data.load_query_images)."""
        return core_data.load_query_images(self.images, self.samples, self.extra_images)

    def conditions(self) -> dict[str, np.ndarray | None]:
        """Each split's conditions (core.data.load_conditions): a conditional model's caption indices."""
        return core_data.load_conditions(self.dataset, self.samples, self.extra)

    def roles(self) -> list[str]:
        return list(self.stores)

    def _path(self, role: str, split: str) -> Path:
        if role not in self.stores:
            raise ArtefactError(
                f"this scorer needs the gradient store {role!r}, but --features names only "
                f"{sorted(self.stores) or 'none'}"
            )
        return Path(self.stores[role]) / f"{split}.npy"

    def provenance(self, role: str) -> dict:
        """What this run expects of the sidecar of every store of `role` (check_provenance); {} without a
        configuration (a scorer's unit test)."""
        if not self.config:
            return {}
        if role not in self._provenance:
            if role not in self.store_checkpoints:
                raise ArtefactError(
                    f"gradient store {role!r} ({self.stores.get(role)}): no checkpoint to check it against; "
                    f"--store-checkpoints names {sorted(self.store_checkpoints) or 'none'}"
                )
            payload = load_torch(self.store_checkpoints[role])
            lr = payload.get("lr")
            self._provenance[role] = {
                **store_provenance(self.config, payload),
                "checkpoint_step": int(payload["step"]),
                "checkpoint_lr": None if lr is None else float(lr),
            }
        return self._provenance[role]

    def sidecar(self, role: str, split: str) -> dict:
        path = self._path(role, split)
        sidecar = read_sidecar(path)
        check_provenance(path, sidecar, self.provenance(role))
        return sidecar

    def features(self, role: str, split: str, expect: dict | None = None) -> np.ndarray:
        """The store's array, after checking that its sidecar's made_by has every entry of `expect`."""
        path = self._path(role, split)
        made_by = self.sidecar(role, split)["made_by"]
        array = open_store(path)
        for key, want in (expect or {}).items():
            if made_by.get(key) != want:
                raise ArtefactError(f"{path}: store has {key} {made_by.get(key)!r}, the method needs {want!r}")
        return np.asarray(array)

    def residuals(self, role: str) -> np.ndarray:
        """Training residuals of a store (DAS); made with exactly the train features' configuration."""
        residual, train = self.sidecar(role, RESIDUAL), self.sidecar(role, "train")
        if residual["config_hash"] != train["config_hash"]:
            raise ArtefactError(
                f"{self.stores[role]}: {RESIDUAL} (config {residual['config_hash']}) does not belong to "
                f"the train features (config {train['config_hash']})"
            )
        return np.asarray(open_store(self._path(role, RESIDUAL)))

    def checkpoint(self, role: str) -> dict:
        """{'step', 'lr'} of the checkpoint a store was computed at."""
        return self.sidecar(role, "train").get("checkpoint", {"step": None, "lr": None})


def candidates(results: list) -> list[tuple]:
    """The sweep's candidates as (lambda, matrices, setting): a scorer returns (lambda, matrices) pairs, or triples
    when it sweeps a setting (Scorer.swept_setting); setting None: no swept setting."""
    return [(entry[0], entry[1], entry[2] if len(entry) > 2 else None) for entry in results]


def check_scores(method: str, results: list, unscored_sets=()) -> None:
    """Refuse non-finite scores, naming the method, query set and lambda. A row of NaN is a query the method did
    not score (e.g. the metagradient beyond max_queries); a partly non-finite row, an infinite value, or a query
    set with no scored query at all means the method's inputs or its arithmetic went non-finite, except for the
    sets its scorer declares it never scores (Scorer.unscored_sets: the metagradient's extra queries)."""
    for lam, matrices, setting in candidates(results):
        at = ("" if lam is None else f", lambda {lam:g}") + ("" if setting is None else f", setting {setting}")
        for name, scores in matrices.items():
            if name in unscored_sets:
                if not np.isnan(scores).all():
                    raise NonFiniteError(f"scores of method {method}: the {name} queries are declared unscored")
                continue
            what = f"scores of method {method} for the {name} queries{at}"
            try:
                scored = scored_queries(scores)
            except ValueError as exc:
                raise NonFiniteError(f"{what}: {exc}") from None
            if not scored.any():
                raise NonFiniteError(
                    f"{what}: every value is NaN, no query is scored; its inputs (gradient stores, model, curvature) "
                    "or its arithmetic went non-finite (a diverged model: train.lr too high?)"
                )


def sweep(
    results: list, masks: np.ndarray, tuning: np.ndarray, evaluation: np.ndarray, targets: dict[str, np.ndarray]
) -> pd.DataFrame:
    """LDS of every (lambda, query set) on tuning and evaluation subsets; targets are seed-averaged.
    Means over the scored queries (NaN rows: not scored, see lds.py). A column `setting` after lambda when the
    results sweep a setting (candidates); without one the table is as it always was."""
    rows = []
    entries = candidates(results)
    swept = any(setting is not None for _, _, setting in entries)
    for lam, matrices, setting in entries:
        key = {"lambda": np.nan if lam is None else lam, **({"setting": setting} if swept else {})}
        for name, scores in matrices.items():
            target = targets[name].mean(1)  # (n_subsets, n_query)
            if not scored_queries(scores).any():  # a set the scorer never scores (Scorer.unscored_sets)
                rows.append({**key, "query_set": name})
                continue
            rows.append(
                {
                    **key,
                    "query_set": name,
                    "lds_tuning": mean_over_scored(lds_per_query(scores, masks[tuning], target[tuning])),
                    "lds_evaluation": mean_over_scored(lds_per_query(scores, masks[evaluation], target[evaluation])),
                }
            )
    columns = ["lambda", *(["setting"] if swept else []), "query_set", "lds_tuning", "lds_evaluation"]
    return pd.DataFrame(rows, columns=columns)


def candidate_keys(table: pd.DataFrame) -> list[str]:
    """The columns that name one candidate of a sweep table: lambda, and the setting where one is swept."""
    return ["setting", "lambda"] if "setting" in table.columns else ["lambda"]


def choose(results: list, table: pd.DataFrame) -> int:
    """Index into results of the candidate (lambda, or setting and lambda) with the best mean TUNING LDS over the
    generated and held-out queries (the user's extra queries are scored with it but never tune it: adding them
    changes no other number)."""
    table = table[table["query_set"].isin(QUERY_SETS)]
    mean_tuning = table.groupby(candidate_keys(table), dropna=False, sort=False)["lds_tuning"].mean().to_numpy()
    if len(mean_tuning) != len(results):
        raise ValueError(f"the sweep names {len(mean_tuning)} candidates for {len(results)} results (a repeated one?)")
    return int(np.nanargmax(mean_tuning)) if len(results) > 1 else 0


def plot_sweep(
    table: pd.DataFrame,
    chosen_lambda,
    method: str,
    path: str | Path,
    notes: dict | None = None,
    chosen_setting=None,
) -> None:
    """LDS against lambda, tuning and evaluation subsets, one colour per query set (a point per query set
    for methods without lambda), one panel per swept setting; the chosen lambda is marked."""
    import matplotlib.pyplot as plt  # headless: report.plotting set the backend on import
    import seaborn as sns

    settings = list(dict.fromkeys(table["setting"])) if "setting" in table.columns else [None]
    long = table.melt(
        id_vars=candidate_keys(table) + ["query_set"],
        value_vars=["lds_tuning", "lds_evaluation"],
        var_name="subsets",
        value_name="LDS",
    )
    long["subsets"] = long["subsets"].map({"lds_tuning": "tuning", "lds_evaluation": "evaluation"})
    fig, axes = plt.subplots(1, len(settings), figsize=(6.4 * len(settings) ** 0.5, 4.2), sharey=True, squeeze=False)
    ax = axes[0, 0]
    if long["lambda"].notna().any():
        for ax, setting in zip(axes.flat, settings):  # one panel per swept setting (AbU: per parameter subset)
            part = long if setting is None else long[long["setting"] == setting]
            sns.lineplot(data=part, x="lambda", y="LDS", hue="query_set", style="subsets", markers=True, ax=ax)
            ax.set_xscale("log")
            ax.set_xlabel("lambda (relative to the mean eigenvalue of Phi^T Phi)" if setting is None else "lambda")
            if setting is not None:
                ax.set_title(f"setting {setting}", fontsize=9)
            if ax is not axes.flat[0]:
                ax.get_legend().remove()  # one legend for the row
        chosen_ax = axes.flat[settings.index(chosen_setting)] if chosen_setting in settings else ax
        chosen_ax.axvline(chosen_lambda, color="grey", ls=":", lw=1)
        at = "" if chosen_setting is None else f", setting {chosen_setting}"
        title = f"{method}: LDS vs lambda (chosen on tuning subsets: {chosen_lambda:g}{at})"
    else:
        sns.pointplot(
            data=long, x="query_set", y="LDS", hue="subsets", dodge=0.3, linestyle="none", errorbar=None, ax=ax
        )
        ax.set_xlabel("query set")
        title = f"{method}: no lambda"
    for panel in axes.flat:
        panel.axhline(0, c="grey", lw=0.6)
    axes[0, 0].set_ylabel("LDS (Spearman, mean over queries)")
    if len(settings) > 1:
        fig.suptitle(title, fontsize=10)
    else:
        axes[0, 0].set_title(title, fontsize=10)
    if notes:
        fig.text(0.01, 0.01, "; ".join(f"{k}: {v}" for k, v in notes.items()), fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05 if notes else 0, 1, 1))
    # atomic, reproducible bytes, the figure closed whatever fails (a full disk: an error naming the file)
    save_figure(fig, Path(path).with_suffix(""), dpi=110, formats=("png",))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method",
        nargs="+",
        required=True,
        help="the method; several: methods of one scorer family that shares one pass (Scorer.shared_pass)",
    )
    parser.add_argument(
        "--dataset", required=True, help="the model inputs (dataset.npz, or the latent family's latents)"
    )
    parser.add_argument("--images", help="the data stage's dataset.npz (pixel-space scorers); default: --dataset")
    parser.add_argument("--samples", required=True)
    parser.add_argument("--extra-queries", help="the user's own queries as the model takes them (queries.extra)")
    parser.add_argument("--extra-images", help="the user's own queries as images; default: --extra-queries")
    parser.add_argument("--subsets", required=True)
    parser.add_argument("--measurements", nargs="+", required=True, help="per-model measurements, subset-major")
    parser.add_argument(
        "--features",
        nargs="*",
        metavar="ROLE=DIR",
        help="gradient store directories by role (final, step<N>, journey); gradient-based methods",
    )
    parser.add_argument(
        "--store-checkpoints",
        nargs="*",
        metavar="ROLE=FILE",
        help="the checkpoint each store role was computed at: its sidecar must name this checkpoint",
    )
    parser.add_argument("--classifier", help="classifier checkpoint (embedding scorers)")
    parser.add_argument("--model", help="final diffusion checkpoint (model-based scorers, e.g. K-FAC)")
    parser.add_argument(
        "--curvature", nargs="+", help="fitted curvature file (K-FAC influence): one, or one per --method"
    )
    parser.add_argument("--chunks", nargs="*", help="metagradient: score files of its chunk jobs (rule metagradient)")
    parser.add_argument(
        "--out-dir",
        nargs="+",
        required=True,
        help="writes <query_set>.npy, sweep.csv, sweep.png, chosen.json; one directory per --method",
    )


def per_method(values: list[str] | None, methods: list[str], option: str) -> dict[str, str | None]:
    """{method: value} of an option given once (every method's) or once per method, in --method order."""
    values = list(values or [None])
    if len(values) == 1:
        values = values * len(methods)
    if len(values) != len(methods):
        raise ValueError(f"{option}: {len(values)} values for {len(methods)} methods {methods}; give one or one each")
    return dict(zip(methods, values))


def run(args, config: dict) -> None:
    methods = config["scores"]["methods"]
    names = list(args.method)
    unknown = [m for m in names if m not in methods]
    if unknown:
        raise ValueError(f"methods {unknown} are not in scores.methods ({sorted(methods)})")
    families = sorted({methods[m]["family"] for m in names})
    scorer = get_scorer(families[0])
    if len(names) > 1 and (len(families) > 1 or not scorer.shared_pass):
        raise ValueError(
            f"--method {names}: several methods share a job only within one scorer family that declares "
            f"shared_pass (families here: {families})"
        )
    out_dirs = per_method(args.out_dir, names, "--out-dir")
    if len(set(out_dirs.values())) != len(names):
        raise ValueError(f"--out-dir: one directory per method, got {args.out_dir}")
    curvatures = per_method(args.curvature, names, "--curvature")
    store_checkpoints = paths.parse_stores(args.store_checkpoints, "--store-checkpoints", "FILE")
    inputs = {
        m: ScorerInputs(
            args.dataset,
            args.samples,
            paths.parse_stores(args.features),
            args.classifier,
            args.model,
            curvatures[m],
            config,
            args.chunks,
            args.images,
            store_checkpoints,
            args.extra_queries,
            args.extra_images,
        )
        for m in names
    }
    lambdas = {m: scorer.lambdas(methods[m], config) for m in names}  # resolved once, here
    try:
        results = scorer.compute_methods({m: methods[m] for m in names}, inputs, lambdas)
    except ScorerNotRun as exc:  # e.g. no CLIP weights: say so in the table, never a number
        for m in names:
            write_not_run(m, methods[m], exc, inputs[m], Path(out_dirs[m]))
        return
    subsets = core_data.load_subsets(args.subsets)
    targets: dict[str, tuple] = {}  # {measured target: (targets, fallback)}, read once for methods sharing one
    for m in names:
        target = scorer.query_target(methods[m])
        if target not in targets:
            targets[target] = method_targets(
                args.measurements, config["lds"]["n_subsets"], config["lds"]["n_seeds"], target, inputs[m].query_sets
            )
        write_method(m, methods[m], scorer, config, results[m], subsets, *targets[target], Path(out_dirs[m]))


def write_not_run(method: str, method_cfg: dict, exc: ScorerNotRun, inputs: ScorerInputs, out: Path) -> None:
    """The outputs of a method that cannot run here: the rule's declared matrices all NaN (= not scored, lds.py), an
    empty sweep, and chosen.json saying why (readers see not_run)."""
    log.warning("scores %s: %s (%s)", method, exc.reason, exc.detail)
    n_train = len(inputs.train_images())
    for name, queries in inputs.queries().items():
        save_npy(np.full((len(queries), n_train), np.nan, np.float32), out / f"{name}.npy")
    save_text("lambda,query_set,lds_tuning,lds_evaluation\n", out / "sweep.csv")
    plot_sweep(
        pd.DataFrame(columns=["lambda", "query_set", "lds_tuning", "lds_evaluation"]),
        None,
        method,
        out / "sweep.png",
        {name: exc.reason for name in inputs.query_sets},
    )
    save_json(
        {"method": method, "config": method_cfg, "lambda": None, "not_run": exc.reason, "detail": exc.detail},
        out / "chosen.json",
    )


def write_method(
    method: str,
    method_cfg: dict,
    scorer,
    config: dict,
    results: list,
    subsets: dict,
    targets: dict[str, np.ndarray],
    fallback: dict[str, str],
    out: Path,
) -> None:
    """One method's sweep over its lambdas, its chosen lambda and its files (matrices, sweep.csv, sweep.png,
    chosen.json)."""
    notes = {name: note for name, note in scorer.notes(method_cfg).items() if name in targets}  # this run's sets
    target = scorer.query_target(method_cfg)
    for note in fallback.values():
        log.info("scores %s: %s", method, note)
    used = {name: "loss" if name in fallback else target for name in targets}  # the target each set was tuned on
    check_scores(method, results, scorer.unscored_sets)
    table = sweep(results, subsets["masks"], subsets["tuning"], subsets["evaluation"], targets)
    best = choose(results, table)
    chosen_lambda, matrices, chosen_setting = candidates(results)[best]
    if sorted(matrices) != sorted(targets):  # the rule declares one matrix per query set
        raise ValueError(f"{method}: scores for query sets {sorted(matrices)}, expected {sorted(targets)}")
    for name, scores in matrices.items():
        scored = scored_queries(scores)
        if not scored.all():
            log.warning(
                "scores %s, %s: %d of %d queries scored; the other rows are NaN (not scored)",
                method,
                name,
                int(scored.sum()),
                len(scored),
            )
        save_npy(scores.astype(np.float32), out / f"{name}.npy")
    save_text(table.to_csv(index=False), out / "sweep.csv")
    plot_sweep(table, chosen_lambda, method, out / "sweep.png", notes, chosen_setting)
    settings = scorer.settings(method_cfg, config)
    chosen = {"method": method, "config": method_cfg, "lambda": chosen_lambda}
    if chosen_setting is not None:  # the swept setting's chosen value, beside lambda (evaluate's table notes it)
        chosen["setting"] = {scorer.swept_setting: chosen_setting}
        settings[scorer.swept_setting] = chosen_setting
    save_json({**chosen, "notes": notes, "target": used, "settings": settings}, out / "chosen.json")
    for name, note in notes.items():
        log.warning("scores %s, %s queries: %s", method, name, note)
    log.info(
        "scores %s: lambda %s%s; tuning LDS (target %s) %s",
        method,
        chosen_lambda,
        "" if chosen_setting is None else f", setting {chosen_setting}",
        target,
        table[
            (table["lambda"].eq(chosen_lambda) | table["lambda"].isna())
            & (table["setting"].eq(chosen_setting) if chosen_setting is not None else True)
        ]
        .set_index("query_set")["lds_tuning"]
        .round(3)
        .to_dict(),
    )
