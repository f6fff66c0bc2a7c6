# Metagradient / MAGIC (dag/paths.py "metagradient"): the scores of each chunk of attributed queries (one forward +
# reverse pass through the whole training per job; the scores rule assembles the chunks), and the method's own
# ground truth: retrainings with the full model's seed and data order, removed examples weighted 0
# (train_subset jobs, kind fixed_seed), each measured, then the metagradient table.
rule metagradient:
    input:
        dataset=paths.model_inputs_file(config),
        samples=rules.sample.output[0],
        model=rules.train_full.output.model,
    output:
        paths.metagradient_chunk_file(config),
    log:
        paths.log_file(config, "metagradient"),
    wildcard_constraints:
        method=r"[A-Za-z0-9_-]+",
        chunk=r"chunk\d+",
    priority: 70
    conda:
        "../envs/benchmark.yaml"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        config=lambda w: paths.metagradient_config(config, w.method),
        queries=lambda w: paths.metagradient_chunk_args(config, w.method, w.chunk),
    shell:
        "python -m workflow_scripts metagradient --config {params.config:q} --method {wildcards.method}"
        " --dataset {input.dataset} --samples {input.samples} --model {input.model} {params.queries}"
        " --out {output} 2> {log}"


rule fixed_seed_sets:
    input:
        subsets=rules.data.output.subsets,
    output:
        paths.fixed_seed_sets_file(config),
    log:
        paths.log_file(config, "fixed_seed_sets"),
    conda:
        "../envs/benchmark.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        config=lambda w: paths.stage_config(config, "fixed_seed"),
    shell:
        "python -m workflow_scripts fixed_seed --config {params.config:q} --subsets {input.subsets} --out {output} 2> {log}"


rule measure_fixed_seed:
    input:
        model=lambda w: paths.fixed_seed_model(config, w.name),
        dataset=paths.model_inputs_file(config),
        samples=rules.sample.output[0],
    output:
        paths.fixed_seed_measurement(config),
    log:
        paths.log_file(config, "measure_fixed_seed"),
    wildcard_constraints:
        name=paths.FIXED_SEED_NAME_PATTERN,
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
        " --model {input.model} --dataset {input.dataset} --samples {input.samples} --out {output} 2> {log}"


rule metagradient_evaluate:
    input:
        subsets=rules.data.output.subsets,
        measurements=paths.measurement_files(config),
        sets=paths.fixed_seed_sets_file(config) if paths.metagradient_methods(config) else [],
        fixed_seed=paths.fixed_seed_measurements(config),
        scores=paths.chosen_files(config, paths.metagradient_methods(config)),
        matrices=paths.score_matrices(config, paths.metagradient_methods(config)),
    output:
        table=multiext(paths.table_stem(config, "metagradient"), ".csv", ".md"),
        table_html=report(
            paths.table_file(config, "metagradient", ".html"),
            caption="../report/metagradient_table.rst",
            category="1. Linear datamodelling score",
            labels={"result": "metagradient table"},
        ),
    log:
        paths.log_file(config, "metagradient_evaluate"),
    conda:
        "../envs/benchmark.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        config=lambda w: paths.stage_config(config, "metagradient_evaluate"),
        sets=lambda w, input: f"--fixed-seed-sets {input.sets}" if input.sets else "",
        score_dirs=lambda w, input: [os.path.dirname(p) for p in input.scores],
        stem=lambda w, output: os.path.splitext(output.table[0])[0],
    shell:
        "python -m workflow_scripts metagradient_evaluate --config {params.config:q} --subsets {input.subsets}"
        " --measurements {input.measurements} {params.sets} --fixed-seed {input.fixed_seed}"
        " --scores {params.score_dirs} --table {params.stem} 2> {log}"
