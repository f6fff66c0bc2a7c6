rule evaluate:
    input:
        subsets=rules.data.output.subsets,
        measurements=paths.measurement_files(config),
        scores=paths.chosen_files(config, config["scores"]["methods"]),
        matrices=paths.score_matrices(config, config["scores"]["methods"]),
    output:
        table=multiext(paths.table_stem(config, "lds"), ".csv", ".md", ".json"),
        table_html=report(
            paths.table_file(config, "lds", ".html"),
            caption="../report/lds_table.rst",
            category="1. Linear datamodelling score",
            labels={"result": "LDS table"},
        ),
        figure=paths.figure_file(config, "lds"),
        figure_pdf=paths.figure_file(config, "lds", ".pdf"),  # written beside the PNG
        ablation=multiext(paths.table_stem(config, "kfac_ablation"), ".csv", ".md"),
        ablation_html=report(
            paths.table_file(config, "kfac_ablation", ".html"),
            caption="../report/kfac_ablation.rst",
            category="4. K-FAC influence ablation",
            labels={"result": "table"},
        ),
        ablation_figure=report(
            paths.figure_file(config, "kfac_ablation"),
            caption="../report/kfac_ablation_figure.rst",
            category="4. K-FAC influence ablation",
            labels={"result": "figure"},
        ),
        ablation_figure_pdf=paths.figure_file(config, "kfac_ablation", ".pdf"),
        # likelihood measurements: LDS per measurement target, and the measurement substitution ablation
        measurements=multiext(paths.table_stem(config, "lds_measurements"), ".csv", ".md"),
        measurements_html=report(
            paths.table_file(config, "lds_measurements", ".html"),
            caption="../report/lds_measurements.rst",
            category="5. Likelihood measurements",
            labels={"result": "LDS per measurement"},
        ),
        measurements_figure=report(
            paths.figure_file(config, "lds_measurements"),
            caption="../report/lds_measurements_figure.rst",
            category="5. Likelihood measurements",
            labels={"result": "heat map"},
        ),
        measurements_figure_pdf=paths.figure_file(config, "lds_measurements", ".pdf"),
        substitution=multiext(paths.table_stem(config, "measurement_substitution"), ".csv", ".md"),
        substitution_html=report(
            paths.table_file(config, "measurement_substitution", ".html"),
            caption="../report/measurement_substitution.rst",
            category="5. Likelihood measurements",
            labels={"result": "measurement substitution"},
        ),
    log:
        paths.log_file(config, "evaluate"),
    conda:
        "../envs/benchmark.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        config=lambda w: paths.stage_config(config, "evaluate"),
        score_dirs=lambda w, input: [os.path.dirname(p) for p in input.scores],
        stem=lambda w, output: os.path.splitext(output.table[0])[0],
        ablation_stem=lambda w, output: os.path.splitext(output.ablation[0])[0],
        measurements_stem=lambda w, output: os.path.splitext(output.measurements[0])[0],
        substitution_stem=lambda w, output: os.path.splitext(output.substitution[0])[0],
    shell:
        "python -m workflow_scripts evaluate --config {params.config:q}"
        " --subsets {input.subsets} --measurements {input.measurements} --scores {params.score_dirs}"
        " --table {params.stem} --figure {output.figure}"
        " --ablation {params.ablation_stem} --ablation-figure {output.ablation_figure}"
        " --measurements-table {params.measurements_stem} --measurements-figure {output.measurements_figure}"
        " --substitution {params.substitution_stem} 2> {log}"
