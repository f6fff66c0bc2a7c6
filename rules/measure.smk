# The LDS ground truth: every retraining's measurements (stage measure). jobs.measure picks how they are packed into
# jobs: one per retraining, or one per subset measuring all its seeds in one process (the same files, bit for bit).
if not paths.measure_per_subset(config):

    rule measure:
        input:
            model=paths.subset_model(config),
            dataset=paths.model_inputs_file(config),
            samples=rules.sample.output[0],
            extra=paths.extra_inputs(config),  # the user's own queries (queries.extra), measured on every model
        output:
            paths.measurement_file(config),
        log:
            paths.log_file(config, "measure"),
        wildcard_constraints:
            subset=r"\d+",
            replicate=r"\d+",
        conda:
            "../envs/benchmark.yaml"
        threads: config["compute"]["threads"]
        resources:
            mem_mb=2000,
            runtime=30,
        params:
            config=lambda w: paths.stage_config(config, "measure"),
            extra=lambda w, input: paths.extra_arg(input.extra),
        shell:
            "python -m workflow_scripts measure --config {params.config:q}"
            " --model {input.model} --dataset {input.dataset} --samples {input.samples} {params.extra}"
            " --subset {wildcards.subset} --replicate {wildcards.replicate} --out {output} 2> {log}"

else:

    rule measure:
        input:
            models=[paths.subset_model(config, name) for name in paths.subset_seed_names(config)],
            dataset=paths.model_inputs_file(config),
            samples=rules.sample.output[0],
            extra=paths.extra_inputs(config),  # the user's own queries (queries.extra), measured on every model
        output:
            [paths.measurement_file(config, name) for name in paths.subset_seed_names(config)],
        log:
            paths.log_file(config, "measure_subset"),
        wildcard_constraints:
            subset=r"\d+",
        conda:
            "../envs/benchmark.yaml"
        threads: config["compute"]["threads"]
        resources:
            mem_mb=2000,
            runtime=30 * config["lds"]["n_seeds"],
        params:
            config=lambda w: paths.stage_config(config, "measure"),
            extra=lambda w, input: paths.extra_arg(input.extra),
            replicates=" ".join(str(s) for s in range(config["lds"]["n_seeds"])),
        shell:
            "python -m workflow_scripts measure --config {params.config:q}"
            " --model {input.models} --dataset {input.dataset} --samples {input.samples} {params.extra}"
            " --subset {wildcards.subset} --replicate {params.replicates} --out {output} 2> {log}"
