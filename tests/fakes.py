"""Test doubles and tiny configurations shared by several test modules."""


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
