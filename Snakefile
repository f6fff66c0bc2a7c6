# Training-data attribution benchmark for diffusion models: the whole DAG.
# Paths come from workflow_scripts/dag/paths.py; all logic lives in workflow_scripts (docs/design.md, docs/workflow.md).
# Priorities (the `priority` of a rule; higher starts first among ready jobs): the critical path -- the base
# pipeline and its latents, the full model, its samples, the long metagradient job, the full model's gradient stores
# and curvature -- before the hundreds of independent retrainings, so that results appear early and the run's tail
# is not serial. tests/workflow/test_workflow.py checks the order in the smoke run's log.
import sys

sys.path.insert(0, workflow.basedir)
from workflow_scripts.dag import paths
from workflow_scripts.dag.config import (
    check_overlay,
    check_workflow_support,
    drop_removed_methods,
    order_methods,
    validate_config,
)


configfile: "params.yaml"


report: "report/workflow.rst"  # `snakemake --report results/report.html`: every table and figure, with captions


check_overlay(
    workflow.config_settings.overwrite_config, "--configfile/--config"
)  # e.g. an empty scores.methods, which merges to nothing
drop_removed_methods(config)  # an overlay removes a method by setting it to null
order_methods(
    config, f"{workflow.basedir}/params.yaml"
)  # params.yaml's methods first, then the overlays' by name: the tables' row order
validate_config(config)  # fails before any job starts, naming the bad field
check_workflow_support(config)  # ... or naming a setting the rules cannot honour yet


include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/classifier.smk"
include: "rules/sample.smk"
include: "rules/measure.smk"
include: "rules/gradients.smk"
include: "rules/curvature.smk"
include: "rules/scores.smk"
include: "rules/evaluate.smk"
include: "rules/counterfactual.smk"
include: "rules/figures.smk"
include: "rules/likelihood_sanity.smk"
include: "rules/metagradient.smk"
include: "rules/latent.smk"


rule all:
    default_target: True
    input:
        paths.table_file(config, "lds"),
        paths.figure_file(config, "lds"),
        paths.table_file(config, "kfac_ablation"),
        paths.figure_file(config, "kfac_ablation"),
        paths.table_file(config, "lds_measurements"),
        paths.figure_file(config, "lds_measurements"),
        paths.table_file(config, "measurement_substitution"),
        rules.counterfactual_evaluate.output,
        rules.figures.output,
        paths.family_targets(config),  # model.family vesde: the bits/dim sanity check
        paths.table_file(config, "metagradient"),
