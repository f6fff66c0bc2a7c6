"""Training-data attribution benchmark for diffusion models.

One module per workflow stage (data, train, sample, measure, gradients, scores, evaluate) and one
per scorer family under ``scorers/``. Snakemake rules call the stages through
``python -m workflow_scripts <stage> ...``; tests import the modules directly.
"""
