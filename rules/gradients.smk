# One gradient store per (checkpoint, tag); tag = <output function>_<kind>_K<K>_<projection><dim> (dag/paths.py).
rule gradients:
    input:
        model=lambda w: paths.checkpoint_model(config, w.checkpoint),
        dataset=paths.model_inputs_file(config),
        samples=rules.sample.output[0],
        extra=paths.extra_inputs(config),
    output:
        stores=[paths.gradients_file(config, split) for split in paths.store_splits(config)],
        sidecars=[paths.gradients_file(config, split, "json") for split in paths.store_splits(config)],
        residual=paths.gradients_file(config, paths.RESIDUAL),
        residual_sidecar=paths.gradients_file(config, paths.RESIDUAL, "json"),
    log:
        paths.log_file(config, "gradients"),
    wildcard_constraints:
        checkpoint=paths.CHECKPOINT_PATTERN,
        tag=paths.SPLIT_STORE_PATTERN,
    priority: 60
    conda:
        "../envs/benchmark.yaml"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
    params:
        config=lambda w: paths.stage_config(config, "gradients"),
        out_dir=lambda w, output: os.path.dirname(output.stores[0]),
        extra=lambda w, input: paths.extra_arg(input.extra),
    shell:
        "python -m workflow_scripts gradients --config {params.config:q}"
        " --model {input.model} --dataset {input.dataset} --samples {input.samples} {params.extra}"
        " --tag {wildcards.tag} --out-dir {params.out_dir} 2> {log}"


# Journey-TRAK query features: generated queries only (they need a sampling trajectory).
rule gradients_journey:
    input:
        model=lambda w: paths.checkpoint_model(config, w.checkpoint),
        dataset=paths.model_inputs_file(config),
        samples=rules.sample.output[0],
    output:
        store=paths.gradients_file(config, "generated"),
        sidecar=paths.gradients_file(config, "generated", "json"),
    log:
        paths.log_file(config, "gradients"),
    wildcard_constraints:
        checkpoint=paths.CHECKPOINT_PATTERN,
        tag=paths.JOURNEY_STORE_PATTERN,
    priority: 60
    conda:
        "../envs/benchmark.yaml"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        config=lambda w: paths.stage_config(config, "gradients_journey"),
        out_dir=lambda w, output: os.path.dirname(output.store),
    shell:
        "python -m workflow_scripts gradients --config {params.config:q}"
        " --model {input.model} --dataset {input.dataset} --samples {input.samples}"
        " --tag {wildcards.tag} --out-dir {params.out_dir} 2> {log}"


# Query features of a likelihood measurement (TRAK-family query_measurement) in the projection of store <tag>.
rule gradients_measurement:
    input:
        model=lambda w: paths.checkpoint_model(config, w.checkpoint),
        dataset=paths.model_inputs_file(config),
        samples=rules.sample.output[0],
        extra=paths.extra_inputs(config),
    output:
        stores=[paths.measurement_gradients_file(config, split) for split in paths.query_sets(config)],
        sidecars=[paths.measurement_gradients_file(config, split, "json") for split in paths.query_sets(config)],
    log:
        paths.log_file(config, "gradients_measurement"),
    wildcard_constraints:
        checkpoint=paths.CHECKPOINT_PATTERN,
        tag=paths.SPLIT_STORE_PATTERN,
        target=paths.MEASUREMENT_PATTERN,
    priority: 60
    conda:
        "../envs/benchmark.yaml"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        config=lambda w: paths.stage_config(config, "gradients_measurement"),
        out_dir=lambda w, output: os.path.dirname(output.stores[0]),
        extra=lambda w, input: paths.extra_arg(input.extra),
    shell:
        "python -m workflow_scripts gradients --config {params.config:q}"
        " --model {input.model} --dataset {input.dataset} --samples {input.samples} {params.extra}"
        " --tag {wildcards.tag} --measurement {wildcards.target} --out-dir {params.out_dir} 2> {log}"


# The trajectory measurement exists for generated queries only (held-out queries keep the loss features).
use rule gradients_measurement as gradients_measurement_trajectory with:
    output:
        store=paths.measurement_gradients_file(config, "generated"),
        sidecar=paths.measurement_gradients_file(config, "generated", "json"),
    wildcard_constraints:
        checkpoint=paths.CHECKPOINT_PATTERN,
        tag=paths.SPLIT_STORE_PATTERN,
        target="trajectory",
    params:
        config=lambda w: paths.stage_config(config, "gradients_measurement"),
        out_dir=lambda w, output: os.path.dirname(output.store),
