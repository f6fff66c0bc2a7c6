"""The likelihood measurements in the workflow: the measure stage writes every target, the K-FAC
scorer's query_measurement takes gradients of exactly that target, the scores stage tunes on it, and evaluate
builds the LDS table per target and the measurement substitution table from the right arrays."""

import argparse
import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from fakes import Float64Model, float64_default, float64_gradient_atol

from workflow_scripts.core import contracts, data
from workflow_scripts.core import contracts as M
from workflow_scripts.core.common import ArtefactError, load_npz, save_npz
from workflow_scripts.core.curvature import ParamLayout
from workflow_scripts.dag.config import ConfigError, check_workflow_support, validate_config
from workflow_scripts.engines import kfac as K
from workflow_scripts.families import ddpm, likelihood
from workflow_scripts.families import likelihood as L
from workflow_scripts.families.ddpm import generate, load_model, train_model
from workflow_scripts.scorers import get_scorer
from workflow_scripts.stages import data as data_stage
from workflow_scripts.stages import evaluate as E
from workflow_scripts.stages import measure

torch.set_num_threads(1)
TARGETS = ["loss", "elbo", "timestep_loss_t3", "timestep_loss_t700", "trajectory"]


@pytest.fixture(scope="module")
def stage(tmp_path_factory, smoke_config):
    """A 2-step model, its dataset and generated samples (with trajectories), tiny measurement settings."""
    tmp = tmp_path_factory.mktemp("measurements")
    config = copy.deepcopy(smoke_config)
    config["data"].update({"n_train": 12, "n_heldout": 3})
    config["train"].update({"steps": 2, "resume_every": 2})
    config["compute"] = {"device": "cpu", "threads": 1}
    config["sample"].update({"n_generated": 2, "num_inference_steps": 3})
    config["measure"].update(
        {
            "n_timesteps": 4,
            "n_noise": 1,
            "batch_size": 16,
            "measurements": ["loss", "elbo", "timestep_loss", "trajectory"],
            "elbo": {"n_timesteps": 5, "n_noise": 1, "decoder_draws": 1},
            "timestep_loss": {"timesteps": [3, 700], "n_noise": 2},
        }
    )
    validate_config(config)
    dataset = tmp / "dataset.npz"
    data_stage.run(argparse.Namespace(dataset_out=dataset, subsets_out=tmp / "subsets.npz"), config)
    images = data.load_dataset(dataset)["train_images"]
    model_path = train_model(config, images, np.arange(len(images)), 0, tmp / "model.pt")
    model, payload = load_model(model_path, config["model"], "cpu")
    samples = tmp / "generated.npz"
    save_npz(
        samples,
        **generate(
            model,
            payload["image_shape"],
            config["diffusion"],
            config["sample"],
            config["seeds"]["sample"],
            2,
            torch.device("cpu"),
        ),
    )
    return config, dataset, samples, model_path, tmp


def _measure(stage, out_name="m.npz"):
    config, dataset, samples, model_path, tmp = stage
    out = tmp / out_name
    measure.run(
        argparse.Namespace(
            model=str(model_path),
            dataset=str(dataset),
            samples=str(samples),
            subset=3,
            replicate=1,
            out=str(out),
            extra_queries=None,
        ),
        config,
    )
    return load_npz(out)


def test_one_job_measuring_two_models_writes_the_files_of_two_jobs(stage):
    """jobs.measure: subset -- several models in one process. Each file must equal, bit for bit, the file of a job of
    its own: exact equality catches draws or conditions carried over from the previous model of the job."""
    config, dataset, samples, model_path, tmp = stage
    images = data.load_dataset(dataset)["train_images"]
    other = train_model(config, images, np.arange(len(images) // 2), 1, tmp / "other.pt")
    models, outs = [str(model_path), str(other)], [str(tmp / "both0.npz"), str(tmp / "both1.npz")]
    base = {"dataset": str(dataset), "samples": str(samples), "subset": 3, "extra_queries": None}
    measure.run(argparse.Namespace(**base, model=models, replicate=[0, 1], out=outs), config)
    for model, replicate, out in zip(models, [0, 1], outs, strict=True):
        alone = tmp / f"alone{replicate}.npz"
        measure.run(argparse.Namespace(**base, model=model, replicate=replicate, out=str(alone)), config)
        together, single = load_npz(out), load_npz(alone)
        assert set(together) == set(single) and int(together["replicate"]) == replicate
        for key in single:
            np.testing.assert_array_equal(together[key], single[key], err_msg=key)
    assert not np.array_equal(load_npz(outs[0])["heldout"], load_npz(outs[1])["heldout"])  # two different models
    with pytest.raises(ValueError, match="one value per model: got 2, 1, 2"):
        measure.run(argparse.Namespace(**base, model=models, replicate=[0], out=outs), config)


def test_measure_stage_writes_every_target_with_the_right_shapes(stage):
    config, dataset, samples, model_path, _ = stage
    arrays = _measure(stage)
    assert contracts.target_names(config) == TARGETS
    assert [str(t) for t in arrays["targets"]] == TARGETS
    assert (int(arrays["subset"]), int(arrays["replicate"])) == (3, 1)
    n = {"generated": 2, "heldout": 3}
    expected = {contracts.target_key(q, t) for q in n for t in TARGETS if not (t == "trajectory" and q == "heldout")}
    assert set(arrays) - {"subset", "replicate", "targets"} == expected
    for key in expected:
        query_set = key.split("__")[0]
        assert (
            arrays[key].shape == (n[query_set],) and arrays[key].dtype == np.float64 and np.isfinite(arrays[key]).all()
        )
    # the loss keeps its array names and values (everything downstream of the loss-only stage still reads it)
    model, _ = load_model(model_path, config["model"], "cpu")
    queries = data.load_queries(dataset, samples)
    for stream, name in enumerate(M.QUERY_SETS):
        np.testing.assert_array_equal(
            arrays[name],
            ddpm.measure_loss(
                model, queries[name], config["diffusion"], config["measure"], config["seeds"]["measure"], stream, "cpu"
            ),
        )
    # the ELBO is an upper bound on -log P of the 17-level image: above 0 nats, and distinct from the loss
    assert (arrays["heldout__elbo"] > 0).all()


def test_target_measurement_is_exactly_the_measured_target(stage):
    """The query-side Measurement of a target evaluates to the value the measure stage wrote for it."""
    config, dataset, samples, model_path, _ = stage
    arrays = _measure(stage)
    model, _ = load_model(model_path, config["model"], "cpu")
    queries = data.load_queries(dataset, samples)
    sample_arrays = load_npz(samples)
    for target in TARGETS[1:]:
        for name in M.QUERY_SETS:
            m = L.target_measurement(config, target, name, sample_arrays)
            if target == "trajectory" and name == "heldout":
                assert m is None  # no trajectory: no measurement (kfac falls back to the loss and says so)
                continue
            values = L.evaluate(model, queries[name], m, "cpu", batch_rows=7)["value"]
            np.testing.assert_allclose(values, arrays[contracts.target_key(name, target)], rtol=1e-6, err_msg=target)
    with pytest.raises(ValueError, match="not measured"):
        L.target_measurement(config, "timestep_loss_t5", "heldout")


@pytest.mark.parametrize("target", ["elbo", "timestep_loss_t700", "trajectory"])
def test_kfac_query_measurement_gradient_equals_autograd(stage, target):
    """K-FAC's query gradients (vmap(grad) of query_measurements) == torch.autograd of the measured value, whose
    plain per-image evaluation equals the measure stage's ground truth."""
    config, dataset, samples, model_path, _ = stage
    arrays = _measure(stage)
    model, _ = load_model(model_path, config["model"], "cpu")
    queries = data.load_queries(dataset, samples)
    measurements = K.query_measurements(
        {"family": "kfac", "query_measurement": target}, config, M.QUERY_SETS, str(samples)
    )
    assert set(measurements) == ({"generated"} if target == "trajectory" else set(M.QUERY_SETS))
    for name, m in measurements.items():
        x = torch.from_numpy(queries[name])
        d = m.draws(len(x), x.shape[1:], 0)
        with torch.no_grad():
            for q in range(len(x)):
                value = m.objective(lambda xt, t: model(xt, t).sample, x[q], {k: v[q] for k, v in d.items()})
                assert value.item() == pytest.approx(arrays[L.target_key(name, target)][q], rel=1e-5)
    # the gradients in float64 (a float64 copy of the model, float64 draws): batches of vmap(grad) and autograd per
    # image then differ only by float64 rounding
    model = Float64Model(model)
    params = dict(model.named_parameters())
    names = [n for n in params if n.endswith("weight")][:4] + [n for n in params if n.endswith("weight")][-3:]
    layout = ParamLayout(names, [tuple(params[n].shape) for n in names])
    with float64_default():
        measurements = K.query_measurements(
            {"family": "kfac", "query_measurement": target}, config, M.QUERY_SETS, str(samples)
        )
        for name, m in measurements.items():
            images = queries[name]
            batched = K.gradients(model, layout, images, m, batch_rows=9, device="cpu")  # several batches
            x = torch.from_numpy(images)
            d = m.draws(len(images), images.shape[1:], 0)
            for q in range(len(images)):
                value = m.objective(lambda xt, t: model(xt, t).sample, x[q], {k: v[q] for k, v in d.items()})
                flat = torch.cat([g.flatten() for g in torch.autograd.grad(value, [params[n] for n in names])])
                assert batched.dtype == flat.dtype == torch.float64
                torch.testing.assert_close(batched[q], flat, rtol=0, atol=float64_gradient_atol(model, flat))
    assert K.query_measurements({"family": "kfac"}, config, M.QUERY_SETS, None) == {}  # loss: kfac's own draws
    with pytest.raises(ArtefactError, match="samples"):
        K.query_measurements({"family": "kfac", "query_measurement": "trajectory"}, config, M.QUERY_SETS, None)


# ---------------------------------------------------------------- targets of the scores stage and of evaluate
def _files(tmp_path, targets_by_key: dict[str, np.ndarray], n_subsets: int, n_seeds: int, names=None):
    """Measurement files subset-major; targets_by_key: {array key: (n_subsets, n_seeds, n_query)}."""
    paths = []
    for j in range(n_subsets):
        for s in range(n_seeds):
            path = tmp_path / f"subset{j:03d}_seed{s}.npz"
            save_npz(
                path,
                subset=np.array(j),
                replicate=np.array(s),
                targets=np.array(names or ["loss"]),
                **{k: v[j, s] for k, v in targets_by_key.items()},
            )
            paths.append(str(path))
    return paths


def _method(tmp_path, name, scores, target=None, settings=None, family="kfac"):
    directory = tmp_path / name
    directory.mkdir()
    chosen = {
        "method": name,
        "config": {"family": family},
        "lambda": 0.1,
        "notes": {},
        "settings": settings or {},
        "target": target or {q: "loss" for q in scores},
    }
    (directory / "chosen.json").write_text(json.dumps(chosen))
    for query_set, s in scores.items():
        np.save(directory / f"{query_set}.npy", s.astype(np.float32))
    pd.DataFrame([{"lambda": 0.1, "query_set": q, "lds_tuning": 0.5, "lds_evaluation": 0.5} for q in scores]).to_csv(
        directory / "sweep.csv", index=False
    )
    return directory


@pytest.fixture
def synthetic(tmp_path):
    """Two linear datamodels: the loss follows effect_loss, the ELBO effect_elbo (its two seeds identical), the
    trajectory (generated only) effect_traj; kfac / kfac_elbo / kfac_trajectory hold exactly those effects."""
    rng = np.random.default_rng(0)
    n_subsets, n_seeds, n_train, n_query = 14, 2, 24, 3
    masks = rng.random((n_subsets, n_train)) < 0.5
    effects = {t: rng.normal(size=(n_query, n_train)) for t in ("loss", "elbo", "trajectory")}

    def target(effect, noise):
        base = (~masks).astype(float) @ effect.T
        return np.stack([base + noise * rng.normal(size=base.shape) for _ in range(n_seeds)], axis=1)

    arrays = {}
    for q in ("generated", "heldout"):
        arrays[q] = target(effects["loss"], 2.0)
        arrays[f"{q}__elbo"] = np.repeat(target(effects["elbo"], 0.0)[:, :1], n_seeds, axis=1)
    arrays["generated__trajectory"] = target(effects["trajectory"], 0.5)
    paths = _files(tmp_path, arrays, n_subsets, n_seeds, ["loss", "elbo", "trajectory"])
    subsets = {"masks": masks, "tuning": np.arange(4), "evaluation": np.arange(4, n_subsets)}
    base = {"fisher_type": "mc", "kfac_approx": "expand", "ekfac": False, "quantization": "int8", "damping": "relative"}
    both = ("generated", "heldout")
    dirs = {
        "kfac": _method(
            tmp_path, "kfac", {q: effects["loss"] for q in both}, None, {**base, "query_measurement": "loss"}
        ),
        "kfac_elbo": _method(
            tmp_path,
            "kfac_elbo",
            {q: effects["elbo"] for q in both},
            {q: "elbo" for q in both},
            {**base, "query_measurement": "elbo"},
        ),
        "kfac_trajectory": _method(
            tmp_path,
            "kfac_trajectory",
            {"generated": effects["trajectory"], "heldout": effects["loss"]},
            {"generated": "trajectory", "heldout": "loss"},
            {**base, "query_measurement": "trajectory"},
        ),
        "kfac_float32": _method(
            tmp_path,
            "kfac_float32",
            {q: effects["loss"] for q in both},
            None,
            {**base, "quantization": "float32", "query_measurement": "loss"},
        ),
        "trak": _method(
            tmp_path, "trak", {q: effects["loss"] + rng.normal(size=effects["loss"].shape) for q in both}, family="trak"
        ),
    }
    lds_cfg = {"n_subsets": n_subsets, "n_seeds": n_seeds, "bootstrap_samples": 40, "ci": 0.95}
    return paths, subsets, dirs, lds_cfg, arrays


def test_scores_stage_targets_are_the_methods_own(synthetic):
    paths, _, _, _, arrays = synthetic
    assert get_scorer("kfac").query_target({"family": "kfac", "query_measurement": "elbo"}) == "elbo"
    assert get_scorer("trak").query_target({"family": "trak", "output_function": "loss"}) == "loss"
    elbo, notes = L.method_targets(paths, 14, 2, "elbo")
    assert notes == {}
    np.testing.assert_array_equal(elbo["heldout"], arrays["heldout__elbo"])
    traj, notes = L.method_targets(paths, 14, 2, "trajectory")
    np.testing.assert_array_equal(traj["generated"], arrays["generated__trajectory"])
    np.testing.assert_array_equal(traj["heldout"], arrays["heldout"])  # no trajectory: tuned on the loss, said so
    assert set(notes) == {"heldout"} and "loss" in notes["heldout"]
    with pytest.raises(ArtefactError, match="timestep_loss_t10"):
        L.method_targets(paths, 14, 2, "timestep_loss_t10")


def test_lds_per_measurement_uses_each_targets_arrays(synthetic):
    paths, subsets, dirs, lds_cfg, _ = synthetic
    table = E.measurement_table(dirs, subsets, paths, lds_cfg, seed=0)
    assert list(dict.fromkeys(table["measurement"])) == ["loss", "elbo", "trajectory"]
    assert set(table.loc[table["measurement"] == "trajectory", "query_set"]) == {"generated"}  # no held-out target

    def lds(measurement, method, query_set="generated"):
        row = table[
            (table["measurement"] == measurement) & (table["method"] == method) & (table["query_set"] == query_set)
        ]
        assert len(row) == 1
        return row.iloc[0]

    # each exact datamodel ranks its own target perfectly: the LDS is computed from that target's arrays
    assert lds("elbo", "kfac_elbo")["lds"] == pytest.approx(1.0)
    assert lds("trajectory", "kfac_trajectory")["lds"] > 0.9
    assert lds("elbo", "kfac")["lds"] < 0.6 and lds("loss", "kfac_elbo")["lds"] < 0.6
    # noise ceilings per target: the ELBO's two seeds are identical, the loss's are noisy
    assert lds("elbo", E.NOISE_CEILING)["lds"] == pytest.approx(1.0)
    assert lds("loss", E.NOISE_CEILING)["lds"] < 0.95
    # "tuned on evaluation" only where the method's sweep is of this target
    assert lds("elbo", "kfac_elbo")["lds_tuned_on_evaluation"] == 0.5
    assert np.isnan(lds("loss", "kfac_elbo")["lds_tuned_on_evaluation"])
    assert lds("loss", "kfac_trajectory", "heldout")["scores_of"] == "loss"
    # the loss rows equal the loss-only LDS table
    loss_only = E.lds_table(dirs, subsets, likelihood.load_targets(paths, 14, 2), lds_cfg, seed=0)
    np.testing.assert_allclose(table.loc[table["measurement"] == "loss", "lds"].to_numpy(), loss_only["lds"].to_numpy())
    markdown = E.measurement_markdown(table)
    assert "| elbo | kfac_elbo | generated | 1.000 |" in markdown
    # the compact overview on top: a row per method, a column per (target, query set), no trajectory held-out
    overview = E.measurement_overview(table).splitlines()
    assert overview[0] == (
        "| method | loss generated | loss heldout | elbo generated | elbo heldout | trajectory generated |"
    )
    kfac_elbo = next(line for line in overview if line.startswith("| kfac_elbo |")).split(" | ")
    assert kfac_elbo[3] == "1.000" and markdown.startswith(overview[0])
    assert E.measurement_overview(table.assign(lds=np.nan)) == ""  # nothing ran: no overview, the long table says why


def test_measurement_substitution_table(synthetic, tmp_path):
    paths, subsets, dirs, lds_cfg, _ = synthetic
    assert E.substitution_methods(dirs) == {"kfac": "loss", "kfac_elbo": "elbo", "kfac_trajectory": "trajectory"}
    table = E.measurement_substitution(E.measurement_table(dirs, subsets, paths, lds_cfg, seed=0), dirs)
    assert set(table["method"]) == {"kfac", "kfac_elbo", "kfac_trajectory", E.NOISE_CEILING}  # no float32, no trak
    assert set(zip(table["measurement"], table["query_set"])) == {
        ("loss", "generated"),
        ("loss", "heldout"),
        ("elbo", "generated"),
        ("elbo", "heldout"),
        ("trajectory", "generated"),
    }
    row = table[(table["measurement"] == "elbo") & (table["method"] == "kfac")].iloc[0]
    assert row["query_measurement"] == "loss" and not row["matched"]  # the substitution: loss gradient, ELBO target
    matched = table[(table["measurement"] == "elbo") & (table["method"] == "kfac_elbo")]
    assert matched["matched"].all() and (matched["lds"] > 0.99).all()
    assert (table.groupby(["measurement", "query_set"])["method"].apply(lambda m: E.NOISE_CEILING in set(m))).all()
    markdown = E.substitution_markdown(table)
    assert "kfac_elbo (elbo gradient)" in markdown and "| elbo | generated |" in markdown
    assert "**1.000" in markdown and "(loss gradient: no trajectory)" in markdown
    E.plot_measurements(E.measurement_table(dirs, subsets, paths, lds_cfg, seed=0), tmp_path / "heat")
    assert (tmp_path / "heat.png").stat().st_size > 2000 and (tmp_path / "heat.pdf").read_bytes()[:4] == b"%PDF"
    assert "no substitution" in E.substitution_markdown(table[table["method"] == E.NOISE_CEILING])


def test_measurement_files_must_agree_on_their_targets(tmp_path):
    a = _files(tmp_path, {"generated": np.zeros((1, 1, 2)), "heldout": np.zeros((1, 1, 2))}, 1, 1, ["loss"])
    (tmp_path / "b").mkdir()
    b = _files(
        tmp_path / "b",
        {
            "generated": np.zeros((1, 1, 2)),
            "heldout": np.zeros((1, 1, 2)),
            "generated__elbo": np.zeros((1, 1, 2)),
            "heldout__elbo": np.zeros((1, 1, 2)),
        },
        1,
        1,
        ["loss", "elbo"],
    )
    assert L.file_targets(b) == ["loss", "elbo"]
    with pytest.raises(ArtefactError, match="remeasure"):
        L.file_targets(a + b)


# ---------------------------------------------------------------- configuration
def test_workflow_accepts_ddpm_measurements_and_checks_query_measurements(base_config):
    assert contracts.target_names(base_config) == [
        "loss",
        "elbo",
        "timestep_loss_t10",
        "timestep_loss_t100",
        "timestep_loss_t500",
        "trajectory",
    ]
    check_workflow_support(base_config)  # every DDPM measurement is a rule's now
    assert base_config["scores"]["methods"]["kfac_elbo"]["query_measurement"] == "elbo"
    config = copy.deepcopy(base_config)
    config["measure"]["measurements"] = ["loss", "trajectory"]
    with pytest.raises(ConfigError, match=r"(kfac|trak)_elbo\.query_measurement"):  # the first of them
        validate_config(config)
    config = copy.deepcopy(base_config)
    config["scores"]["methods"]["kfac_elbo"]["query_measurement"] = "timestep_loss_t20"
    with pytest.raises(ConfigError, match="timestep_loss_t20"):
        validate_config(config)
    config["scores"]["methods"]["kfac_elbo"]["query_measurement"] = "bits"
    with pytest.raises(ConfigError, match="query_measurement"):
        validate_config(config)
