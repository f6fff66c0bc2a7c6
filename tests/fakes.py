"""Test doubles shared by several test modules."""
import contextlib
import copy

import torch


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


class Float64Model(torch.nn.Module):
    """A float64 copy of a model for order-independence tests: float32 inputs (stored trajectories, images) are cast
    to float64 on the way in, so code that casts its inputs to float32 still computes in float64 throughout."""

    def __init__(self, model):
        super().__init__()
        self.inner = copy.deepcopy(model).double()
        self.train(model.training)

    def forward(self, x, t):
        return self.inner(x.double(), t)


@contextlib.contextmanager
def float64_default():
    """torch's default dtype float64 (projection matrices, noise draws) inside, restored afterwards. Its draws differ
    from float32 ones (same seeds, other values): features made inside match only others made inside."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
