# Training-data attribution benchmark for diffusion models: the whole DAG.
# Paths come from workflow_scripts.paths; all logic lives in workflow_scripts (see DESIGN.md).
import sys

sys.path.insert(0, workflow.basedir)
from workflow_scripts import paths
from workflow_scripts.config import check_workflow_support, validate_config


configfile: "params.yaml"


report: "report/workflow.rst"  # `snakemake --report results/report.html`: every table and figure, with captions


validate_config(config)  # fails before any job starts, naming the bad field
check_workflow_support(config)  # ... or naming a setting the rules cannot honour yet

ROOT = paths.root(config)
QUERY_SETS = ["generated", "heldout"]


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
include: "rules/metagradient.smk"


rule all:
    default_target: True
    input:
        f"{ROOT}/tables/lds.md",
        f"{ROOT}/figures/lds.png",
        f"{ROOT}/tables/kfac_ablation.md",
        f"{ROOT}/figures/kfac_ablation.png",
        rules.counterfactual_evaluate.output,
        rules.figures.output,
        f"{ROOT}/tables/metagradient.md",
