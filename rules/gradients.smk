rule gradients:
    input:
        model=rules.train_full.output.model,
        dataset=rules.data.output.dataset,
        samples=rules.sample.output[0],
    output:
        stores=expand(f"{ROOT}/gradients/full/{{{{tag}}}}/{{split}}.npy", split=paths.STORE_SPLITS),
        sidecars=expand(f"{ROOT}/gradients/full/{{{{tag}}}}/{{split}}.json", split=paths.STORE_SPLITS),
    params:
        config=lambda w: paths.stage_config(config, "gradients"),
        output_function=lambda w: w.tag.split("_K")[0],
        out_dir=lambda w, output: os.path.dirname(output.stores[0]),
    log:
        f"{ROOT}/logs/gradients/{{tag}}.log",
    threads: config["compute"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/benchmark.yaml"
    shell:
        "python -m workflow_scripts gradients --config {params.config:q}"
        " --model {input.model} --dataset {input.dataset} --samples {input.samples}"
        " --output-function {params.output_function} --out-dir {params.out_dir} 2> {log}"
