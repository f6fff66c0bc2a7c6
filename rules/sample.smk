rule sample:
    input:
        model=rules.train_full.output.model,
    output:
        paths.samples_file(config),
    log:
        paths.log_file(config, "sample"),
    priority: 80
    conda:
        "../envs/benchmark.yaml"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        config=lambda w: paths.stage_config(config, "sample"),
    shell:
        "python -m workflow_scripts sample --config {params.config:q}" " --model {input.model} --out {output} 2> {log}"
