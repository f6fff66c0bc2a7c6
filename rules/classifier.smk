rule classifier:
    input:
        dataset=rules.data.output.dataset,
    output:
        f"{ROOT}/models/classifier.pt",
    params:
        config=lambda w: paths.stage_config(config, "classifier"),
    log:
        f"{ROOT}/logs/classifier.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/benchmark.yaml"
    shell:
        "python -m workflow_scripts classifier --config {params.config:q}"
        " --dataset {input.dataset} --out {output} 2> {log}"
