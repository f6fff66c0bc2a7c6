rule train_full:
    input:
        dataset=rules.data.output.dataset,
        subsets=rules.data.output.subsets,
    output:
        model=f"{ROOT}/models/full/model.pt",
        checkpoints=paths.full_checkpoints(config),
    params:
        config=lambda w: paths.stage_config(config, "train"),
    log:
        f"{ROOT}/logs/train/full.log",
    threads: config["compute"]["threads"]
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../envs/benchmark.yaml"
    shell:
        "python -m workflow_scripts train --config {params.config:q}"
        " --dataset {input.dataset} --subsets {input.subsets} --subset -1 --replicate 0"
        " --out {output.model} --checkpoints {output.checkpoints} 2> {log}"


rule train_subset:
    input:
        dataset=rules.data.output.dataset,
        subsets=rules.data.output.subsets,
    output:
        model=f"{ROOT}/models/subset{{subset}}_seed{{replicate}}/model.pt",
    wildcard_constraints:
        subset=r"\d+",
        replicate=r"\d+",
    params:
        config=lambda w: paths.stage_config(config, "train"),
    log:
        f"{ROOT}/logs/train/subset{{subset}}_seed{{replicate}}.log",
    threads: config["compute"]["threads"]
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../envs/benchmark.yaml"
    shell:
        "python -m workflow_scripts train --config {params.config:q}"
        " --dataset {input.dataset} --subsets {input.subsets} --subset {wildcards.subset}"
        " --replicate {wildcards.replicate} --out {output.model} 2> {log}"
