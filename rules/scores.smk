rule scores:
    input:
        dataset=rules.data.output.dataset,
        subsets=rules.data.output.subsets,
        samples=rules.sample.output[0],
        measurements=paths.measurement_files(config),
        features=lambda w: paths.method_feature_stores(config, w.method),
    output:
        matrices=expand(f"{ROOT}/scores/{{{{method}}}}/{{query_set}}.npy", query_set=QUERY_SETS),
        sweep=f"{ROOT}/scores/{{method}}/sweep.csv",
        sweep_figure=f"{ROOT}/scores/{{method}}/sweep.png",
        chosen=f"{ROOT}/scores/{{method}}/chosen.json",
    params:
        config=lambda w: paths.stage_config(config, "scores"),
        features=lambda w: paths.method_feature_args(config, w.method),
        out_dir=lambda w, output: os.path.dirname(output.sweep),
    log:
        f"{ROOT}/logs/scores/{{method}}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/benchmark.yaml"
    shell:
        "python -m workflow_scripts scores --config {params.config:q} --method {wildcards.method}"
        " --dataset {input.dataset} --samples {input.samples} --subsets {input.subsets}"
        " --measurements {input.measurements} {params.features} --out-dir {params.out_dir} 2> {log}"
