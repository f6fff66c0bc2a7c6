# The figures of the report (PNG + PDF), drawn from the tables and score matrices: (name, category, label); the
# gallery of the user's own queries (queries.extra) when there are any.
FIGURE_SPECS = [
    ("lds_bars", "1. Linear datamodelling score", "LDS per method"),
    ("damping_sweeps", "1. Linear datamodelling score", "damping sweeps"),
    ("predicted_vs_actual", "1. Linear datamodelling score", "predicted vs actual"),
    ("influencers", "3. Attribution examples", "top influencers"),
] + [("extra_influencers", "3. Attribution examples", "your queries")] * paths.has_extra_queries(config)
FIGURES = tuple(name for name, _, _ in FIGURE_SPECS)


rule figures:
    input:
        lds=paths.table_file(config, "lds", ".csv"),
        scores=paths.chosen_files(config, config["scores"]["methods"]),
        matrices=paths.score_matrices(config, config["scores"]["methods"]),
        dataset=rules.data.output.dataset,
        samples=rules.sample.output[0],
        subsets=rules.data.output.subsets,
        extra_images=paths.extra_images(config),
        measurements=paths.measurement_files(config),
    output:
        **{
            name: report(
                paths.figure_file(config, name),
                caption=f"../report/{name}.rst",
                category=category,
                labels={"result": label},
            )
            for name, category, label in FIGURE_SPECS
        },
        pdfs=[paths.figure_file(config, name, ".pdf") for name in FIGURES],
    log:
        paths.log_file(config, "figures"),
    conda:
        "../envs/benchmark.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        config=lambda w: paths.stage_config(config, "figures"),
        score_dirs=lambda w, input: [os.path.dirname(p) for p in input.scores],
        out_dir=lambda w, output: os.path.dirname(output.pdfs[0]),
        extra=lambda w, input: paths.extra_arg(input.extra_images, "--extra-images"),
    shell:
        "python -m workflow_scripts figures --config {params.config:q} --lds-table {input.lds}"
        " --scores {params.score_dirs} --dataset {input.dataset} --samples {input.samples} --subsets {input.subsets}"
        " --measurements {input.measurements} {params.extra} --out-dir {params.out_dir} 2> {log}"
