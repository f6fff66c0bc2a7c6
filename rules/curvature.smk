# K-FAC / EK-FAC of the training-loss GGN of the final model, one file per variant (dag/paths.py "curvature").
rule curvature:
    input:
        model=paths.full_model(config),
        dataset=paths.model_inputs_file(config),
    output:
        paths.curvature_file(config),
    log:
        paths.log_file(config, "curvature"),
    wildcard_constraints:
        variant=paths.VARIANT_PATTERN,
    priority: 60
    conda:
        "../envs/benchmark.yaml"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
    params:
        config=lambda w: paths.stage_config(config, "curvature"),
        variant=lambda w: paths.curvature_variant_args(w.variant),
    shell:
        "python -m workflow_scripts curvature --config {params.config:q} {params.variant}"
        " --model {input.model} --dataset {input.dataset} --out {output} 2> {log}"
