"""Classifier-embedding similarity: dot product or cosine of the penultimate features of the small CNN that the
`classifier` stage trains on the benchmark's own training set (engine: workflow_scripts/engines/embedding.py)."""

from __future__ import annotations

from workflow_scripts.scorers.base import SIMILARITY, Scorer, method_schema


class Embedding(Scorer):
    family = "embedding"
    schemas = (method_schema("embedding", ["similarity"], similarity=SIMILARITY),)
    # model-free: it reads images and the data's classifier (latent family: the decoded samples)
    model_families = ("ddpm", "vesde", "latent")
    model_inputs = ("classifier",)
    engine = "workflow_scripts.engines.embedding"
