"""Engines: the computation of scorers that need torch, a model or the training loop (K-FAC influence, the
classifier embedding, metagradients). A scorer declaration (workflow_scripts/scorers/) names its engine module; the
engine is imported only when the scorer computes, so the declarations stay light enough for the Snakefile."""
