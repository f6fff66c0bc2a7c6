# model.family vesde: exact bits/dim of training, held-out, rotated, averaged and noise images under the full
# model (workflow_scripts/stages/likelihood_sanity.py); a target of rule all through paths.family_targets.
rule likelihood_sanity:
    input:
        model=rules.train_full.output.model,
        dataset=rules.data.output.dataset,
    output:
        table=multiext(paths.table_stem(config, "bpd_sanity"), ".csv", ".md"),
        figure=report(
            paths.figure_file(config, "bpd_sanity"),
            caption="../report/bpd_sanity.rst",
            category="5. Likelihood sanity check",
            labels={"result": "bits/dim per image category"},
        ),
        figure_pdf=paths.figure_file(config, "bpd_sanity", ".pdf"),
    log:
        paths.log_file(config, "likelihood_sanity"),
    conda:
        "../envs/benchmark.yaml"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        config=lambda w: paths.stage_config(config, "likelihood_sanity"),
        table=lambda w, output: os.path.splitext(output.table[0])[0],
        figure=lambda w, output: os.path.splitext(output.figure)[0],
    shell:
        "python -m workflow_scripts likelihood_sanity --config {params.config:q} --model {input.model}"
        " --dataset {input.dataset} --table {params.table} --figure {params.figure} 2> {log}"
