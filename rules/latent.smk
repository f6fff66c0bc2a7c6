# The latent family (model.family latent, workflow_scripts/families/latent.py): the miniature base pipeline when
# model.pipeline is null, and the data set's VAE latents, which every training, measurement and gradient job reads.


rule base_pipeline:
    input:
        dataset=rules.data.output.dataset,
    output:
        directory(paths.base_pipeline_dir(config)),
    log:
        paths.log_file(config, "base_pipeline"),
    priority: 100
    conda:
        "../envs/benchmark.yaml"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        config=lambda w: paths.stage_config(config, "base_pipeline"),
    shell:
        "python -m workflow_scripts base_pipeline --config {params.config:q}"
        " --dataset {input.dataset} --out {output} 2> {log}"


rule encode:
    input:
        dataset=rules.data.output.dataset,
        pipeline=paths.base_pipeline_inputs(config),
    output:
        paths.latents_file(config),
    log:
        paths.log_file(config, "encode"),
    priority: 100
    conda:
        "../envs/benchmark.yaml"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        config=lambda w: paths.stage_config(config, "encode"),
        pipeline=lambda w: paths.base_pipeline_dir(config),  # model.pipeline, or the rule base_pipeline output
    shell:
        "python -m workflow_scripts encode --config {params.config:q}"
        " --dataset {input.dataset} --pipeline {params.pipeline:q} --out {output} 2> {log}"


# The extra queries (queries.extra) as the latent model takes them: VAE latents and caption indices.
rule encode_extra:
    input:
        dataset=rules.data.output.dataset,
        queries=paths.extra_queries_file(config),
        pipeline=paths.base_pipeline_inputs(config),
    output:
        paths.extra_latents_file(config),
    log:
        paths.log_file(config, "encode_extra"),
    conda:
        "../envs/benchmark.yaml"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        config=lambda w: paths.stage_config(config, "encode"),
        pipeline=lambda w: paths.base_pipeline_dir(config),
    shell:
        "python -m workflow_scripts encode --config {params.config:q} --dataset {input.dataset}"
        " --pipeline {params.pipeline:q} --queries {input.queries} --out {output} 2> {log}"
