rule train_full:
    input:
        dataset=paths.model_inputs_file(config),
        subsets=rules.data.output.subsets,
    output:
        model=paths.full_model(config),
        checkpoints=paths.full_checkpoints(config),
    log:
        paths.log_file(config, "train_full"),
    priority: 90
    conda:
        "../envs/benchmark.yaml"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        config=lambda w: paths.stage_config(config, "train"),
    shell:
        "python -m workflow_scripts train --config {params.config:q}"
        " --dataset {input.dataset} --subsets {input.subsets} --subset -1 --replicate 0"
        " --out {output.model} --checkpoints {output.checkpoints} 2> {log}"


# Ensemble members (a scores method with `ensemble: K`): more full models, training seed seeds.train + k.
rule train_member:
    input:
        dataset=paths.model_inputs_file(config),
    output:
        model=paths.ensemble_member_model(config),
    log:
        paths.log_file(config, "train_member"),
    wildcard_constraints:
        member=r"member\d+",
    conda:
        "../envs/benchmark.yaml"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        config=lambda w: paths.stage_config(config, "train"),
        replicate=lambda w: paths.member_replicate(w.member),
    shell:
        "python -m workflow_scripts train --config {params.config:q}"
        " --dataset {input.dataset} --subset -1 --replicate {params.replicate} --out {output.model} 2> {log}"


# Every retraining: the LDS subset models (models/subset<j>_seed<s>) and the counterfactual models
# (counterfactual/<method>/q<NNN>, membership from the counterfactual rule's members.npy, the full
# model's seed). One rule, so both are ordinary, equally resourced jobs (dag/paths.py "retrainings").
rule train_subset:
    input:
        unpack(lambda w: paths.retraining_inputs(config, w.kind, w.name)),
    output:
        model=paths.retrained_model(config),
    log:
        paths.log_file(config, "train_subset"),
    wildcard_constraints:
        kind=paths.retraining_kind_pattern(config),
        name=paths.RETRAINING_NAME_PATTERN,
    conda:
        "../envs/benchmark.yaml"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        config=lambda w: paths.stage_config(config, "train"),
        membership=lambda w, input: paths.retraining_args(w.kind, w.name, input.membership),
    shell:
        "python -m workflow_scripts train --config {params.config:q}"
        " --dataset {input.dataset} {params.membership} --out {output.model} 2> {log}"


# jobs.train: subset -- the LDS retrainings of one subset, every seed, in one job (one start-up per subset; each model
# the same bytes as from a job of its own). For local runs: the Slurm profile groups each retraining of rule
# train_subset with its measurement instead.
if paths.train_per_subset(config):

    rule train_subset_seeds:
        input:
            dataset=paths.model_inputs_file(config),
            subsets=rules.data.output.subsets,
        output:
            models=[paths.subset_model(config, name) for name in paths.subset_seed_names(config)],
        log:
            paths.log_file(config, "train_subset_seeds"),
        wildcard_constraints:
            subset=r"\d+",
        conda:
            "../envs/benchmark.yaml"
        threads: config["compute"]["threads"]
        resources:
            mem_mb=4000,
            runtime=120 * config["lds"]["n_seeds"],
        params:
            config=lambda w: paths.stage_config(config, "train"),
            replicates=" ".join(str(s) for s in range(config["lds"]["n_seeds"])),
        shell:
            "python -m workflow_scripts train --config {params.config:q}"
            " --dataset {input.dataset} --subsets {input.subsets} --subset {wildcards.subset}"
            " --replicate {params.replicates} --out {output.models} 2> {log}"
