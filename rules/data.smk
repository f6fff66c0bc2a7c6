rule data:
    output:
        dataset=paths.dataset_file(config),
        subsets=paths.subsets_file(config),
    log:
        paths.log_file(config, "data"),
    conda:
        "../envs/benchmark.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        config=lambda w: paths.stage_config(config, "data"),
    shell:
        "python -m workflow_scripts data --config {params.config:q}"
        " --dataset-out {output.dataset} --subsets-out {output.subsets} 2> {log}"


# The user's own query images (queries.extra; stage queries): a third query set, in a file of its own so that
# adding queries reruns the measurements and scores but never a retraining.
rule extra_queries:
    input:
        dataset=rules.data.output.dataset,
    output:
        paths.extra_queries_file(config),
    log:
        paths.log_file(config, "extra_queries"),
    conda:
        "../envs/benchmark.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        config=lambda w: paths.stage_config(config, "queries"),
    shell:
        "python -m workflow_scripts queries --config {params.config:q} --dataset {input.dataset} --out {output} 2> {log}"
