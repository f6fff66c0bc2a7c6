rule measure:
    input:
        model=paths.subset_model(config),
        dataset=paths.model_inputs_file(config),
        samples=rules.sample.output[0],
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
    shell:
        "python -m workflow_scripts measure --config {params.config:q}"
        " --model {input.model} --dataset {input.dataset} --samples {input.samples}"
        " --subset {wildcards.subset} --replicate {wildcards.replicate} --out {output} 2> {log}"
