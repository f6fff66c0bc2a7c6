rule data:
    output:
        dataset=f"{ROOT}/data/dataset.npz",
        subsets=f"{ROOT}/data/subsets.npz",
    log:
        f"{ROOT}/logs/data.log",
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
