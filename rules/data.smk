rule data:
    output:
        dataset=f"{ROOT}/data/dataset.npz",
        subsets=f"{ROOT}/data/subsets.npz",
    params:
        config=lambda w: paths.stage_config(config, "data"),
    log:
        f"{ROOT}/logs/data.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/benchmark.yaml"
    shell:
        "python -m workflow_scripts data --config {params.config:q}"
        " --dataset-out {output.dataset} --subsets-out {output.subsets} 2> {log}"
