"""Test doubles shared by several test modules."""


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
