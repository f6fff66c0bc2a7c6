rule classifier:
    input:
        dataset=rules.data.output.dataset,
    output:
        paths.classifier_model(config),
    log:
        paths.log_file(config, "classifier"),
    conda:
        "../envs/benchmark.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        config=lambda w: paths.stage_config(config, "classifier"),
    shell:
        "python -m workflow_scripts classifier --config {params.config:q}"
        " --dataset {input.dataset} --out {output} 2> {log}"
