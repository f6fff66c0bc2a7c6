# Counterfactual retraining (dag/paths.py "counterfactual retraining"): per method (and the random baseline),
# which training examples each query's retraining removes; the retrainings themselves are train_subset
# jobs (retraining = counterfactual/<method>/q<NNN>); each is then regenerated and measured, and the
# table and figures compare the methods.
rule counterfactual:
    input:
        dataset=rules.data.output.dataset,
        scores=lambda w: paths.counterfactual_scores(config, w.method),
    output:
        members=paths.counterfactual_file(config, "members.npy"),
        selection=paths.counterfactual_file(config, "selection.json"),
    log:
        paths.log_file(config, "counterfactual"),
    wildcard_constraints:
        method=r"[A-Za-z0-9_-]+",
        query=r"\d+",
    conda:
        "../envs/benchmark.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        config=lambda w: paths.stage_config(config, "counterfactual"),
        query=lambda w: int(w.query),
        scores=lambda w, input: f"--scores {os.path.dirname(input.scores[0])}" if input.scores else "",
        out_dir=lambda w, output: os.path.dirname(output.selection),
    shell:
        "python -m workflow_scripts counterfactual --config {params.config:q} --method {wildcards.method}"
        " --query {params.query} {params.scores} --dataset {input.dataset} --out-dir {params.out_dir} 2> {log}"


rule regenerate:
    input:
        full_model=rules.train_full.output.model,
        model=paths.counterfactual_file(config, "model.pt"),
        samples=rules.sample.output[0],
    output:
        paths.counterfactual_file(config, "regenerated.npz"),
    log:
        paths.log_file(config, "regenerate"),
    wildcard_constraints:
        method=r"[A-Za-z0-9_-]+",
        query=r"\d+",
    conda:
        "../envs/benchmark.yaml"
    threads: config["compute"]["threads"]
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        config=lambda w: paths.stage_config(config, "regenerate"),
        query=lambda w: int(w.query),
    shell:
        "python -m workflow_scripts regenerate --config {params.config:q} --full-model {input.full_model}"
        " --model {input.model} --samples {input.samples} --query {params.query} --out {output} 2> {log}"


rule counterfactual_evaluate:
    input:
        regenerated=paths.counterfactual_files(config, "regenerated.npz"),
        selections=paths.counterfactual_files(config, "selection.json"),
        dataset=rules.data.output.dataset,
        classifier=rules.classifier.output[0],
        clip_weights=paths.counterfactual_clip_weights(config),
    output:
        table=report(
            paths.table_file(config, "counterfactual", ".html"),
            caption="../report/counterfactual_table.rst",
            category="2. Counterfactual retraining",
            labels={"result": "table"},
        ),
        data=multiext(paths.table_stem(config, "counterfactual"), ".csv", ".md", ".json", "_per_query.csv"),
        boxplots=report(
            paths.figure_file(config, "counterfactual_boxplots"),
            caption="../report/counterfactual_boxplots.rst",
            category="2. Counterfactual retraining",
            labels={"result": "boxplots"},
        ),
        boxplots_pdf=paths.figure_file(config, "counterfactual_boxplots", ".pdf"),
        pairs=report(
            paths.figure_file(config, "counterfactual_pairs"),
            caption="../report/counterfactual_pairs.rst",
            category="2. Counterfactual retraining",
            labels={"result": "image pairs"},
        ),
        pairs_pdf=paths.figure_file(config, "counterfactual_pairs", ".pdf"),
    log:
        paths.log_file(config, "counterfactual_evaluate"),
    conda:
        "../envs/benchmark.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        config=lambda w: paths.stage_config(config, "counterfactual_evaluate"),
        stem=lambda w, output: os.path.splitext(output.table)[0],
        boxplots=lambda w, output: os.path.splitext(output.boxplots)[0],
        pairs=lambda w, output: os.path.splitext(output.pairs)[0],
    shell:
        "python -m workflow_scripts counterfactual_evaluate --config {params.config:q}"
        " --regenerated {input.regenerated} --selections {input.selections} --dataset {input.dataset}"
        " --classifier {input.classifier} --table {params.stem} --boxplots {params.boxplots} --pairs {params.pairs} 2> {log}"
