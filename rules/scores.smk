# One job per method, except the methods of a shared_pass scorer family (K-FAC): rule scores_<family>_family below.
rule scores:
    input:
        dataset=paths.model_inputs_file(config),
        images=rules.data.output.dataset,
        subsets=rules.data.output.subsets,
        samples=rules.sample.output[0],
        extra=paths.extra_inputs(config),
        extra_images=paths.extra_images(config),
        measurements=paths.measurement_files(config),
        features=lambda w: paths.method_feature_stores(config, w.method),
        models=lambda w: list(paths.method_model_inputs(config, w.method).values()),
        # the checkpoints the stores were computed at: each store's sidecar must name its own
        store_checkpoints=lambda w: sorted(set(paths.method_store_checkpoints(config, w.method).values())),
        chunks=lambda w: paths.metagradient_chunk_files(config, w.method),  # metagradient: its chunk jobs
    output:
        # a method that cannot run here (e.g. CLIP without weights): all-NaN matrices, chosen.json says why
        matrices=paths.score_matrix_files(config),
        sweep=paths.scores_file(config, name="sweep.csv"),
        sweep_figure=paths.scores_file(config, name="sweep.png"),
        chosen=paths.scores_file(config),
    log:
        paths.log_file(config, "scores"),
    wildcard_constraints:
        method=paths.scores_method_pattern(config),
    conda:
        "../envs/benchmark.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        config=lambda w: paths.scores_config(config, w.method),
        features=lambda w: paths.method_feature_args(config, w.method),
        store_checkpoints=lambda w: paths.method_store_checkpoint_args(config, w.method),
        models=lambda w: paths.method_model_args(config, w.method),
        chunks=lambda w: paths.metagradient_chunk_option(config, w.method),
        out_dir=lambda w, output: os.path.dirname(output.sweep),
        extra=lambda w, input: paths.extra_scores_args(input.extra, input.extra_images),
    shell:
        "python -m workflow_scripts scores --config {params.config:q} --method {wildcards.method}"
        " --dataset {input.dataset} --images {input.images} --samples {input.samples} --subsets {input.subsets}"
        " --measurements {input.measurements} {params.extra} {params.features} {params.store_checkpoints} {params.models} {params.chunks} --out-dir {params.out_dir} 2> {log}"


# One job for every method of a shared_pass scorer family (K-FAC: the training gradients are computed once for all
# of its methods); it writes each method's files where rule scores would.
for family, family_methods in paths.shared_pass_families(config).items():

    rule:
        name:
            f"scores_{family}_family"
        input:
            dataset=paths.model_inputs_file(config),
            images=rules.data.output.dataset,
            subsets=rules.data.output.subsets,
            samples=rules.sample.output[0],
            extra=paths.extra_inputs(config),
            extra_images=paths.extra_images(config),
            measurements=paths.measurement_files(config),
            models=paths.family_model_inputs(config, family),
        output:
            **paths.family_score_files(config, family),
        log:
            paths.family_log_file(config, family),
        conda:
            "../envs/benchmark.yaml"
        threads: 1
        resources:
            # every method's preconditioned queries are held at once (engines/kfac.py: query_groups); digits: ~2 GB
            mem_mb=8000,
            runtime=60 * len(family_methods),
        params:
            config=paths.family_scores_config(config, family),
            args=paths.family_scores_args(config, family),
            extra=lambda w, input: paths.extra_scores_args(input.extra, input.extra_images),
        shell:
            "python -m workflow_scripts scores --config {params.config:q}"
            " --dataset {input.dataset} --images {input.images} --samples {input.samples} --subsets {input.subsets}"
            " --measurements {input.measurements} {params.extra} {params.args} 2> {log}"
