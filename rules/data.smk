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
