"""Test doubles, dense references and tiny configurations shared by several test modules."""

import torch

from workflow_scripts.core.curvature import Curvature, ParamLayout


class FakeInputs:
    """The part of scores.ScorerInputs the image scorers read (train images, queries, classifier path)."""

    def __init__(self, train, queries, classifier_path=None):
        self._train, self._queries = train, queries
        if classifier_path is not None:
            self.classifier_path = classifier_path

    def train_images(self):
        return self._train

    def queries(self):
        return self._queries


# The tiny DDPM UNet the unit tests build (two blocks, attention on the second; a few thousand parameters).
TINY_MODEL = {
    "block_out_channels": [8, 16],
    "attention": [False, True],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}


class DenseCurvature(Curvature):
    """Exact curvature from a dense symmetric matrix (e.g. the GGN of a tiny model), same interface as K-FAC."""

    def __init__(self, matrix: torch.Tensor, layout: ParamLayout, config: dict | None = None):
        matrix = matrix.double()
        values, self.vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
        self.values = values.clamp_min(0.0)
        self.layout, self.config = layout, dict(config or {})

    def eigenvalues(self) -> torch.Tensor:
        return self.values

    def to_eigenbasis(self, flat):
        return flat.double() @ self.vectors.to(flat.device)

    def from_eigenbasis(self, coords):
        return coords @ self.vectors.to(coords.device).T
