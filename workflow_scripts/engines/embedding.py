"""Engine of the `embedding` scorer: classifier-embedding similarity: dot product or cosine of the penultimate features of the small
CNN that the `classifier` stage trains on the benchmark's own training set (no download needed).

Method config: {family: embedding, similarity: dot | cosine}. The classifier checkpoint comes from
the scorer inputs (`inputs.classifier_path`, given to the scores stage as --classifier); it is
refused if it was trained on other images than inputs.train_images() or, when the inputs carry
`classifier_identity`, made by another configuration.
Score convention as for raw pixels: S[q, i] = similarity(query q, training image i).
"""

from __future__ import annotations

from workflow_scripts.core.classifier import embed, load_classifier
from workflow_scripts.core.common import ArtefactError, log
from workflow_scripts.scorers.pixel import similarity


def classifier_path(inputs) -> str:
    path = getattr(inputs, "classifier_path", None)
    if not path:
        raise ArtefactError(
            "the embedding scorer needs the classifier checkpoint, but the scorer inputs have no "
            "classifier_path (pass --classifier results/<benchmark>/models/classifier.pt to the scores stage)"
        )
    return str(path)


def compute(method_cfg: dict, inputs, lambdas) -> list:
    train = inputs.train_pixels()
    path = classifier_path(inputs)
    model, payload = load_classifier(path, expected=getattr(inputs, "classifier_identity", None), train_images=train)
    log.info(
        "embedding: classifier %s (held-out accuracy %s)", path, payload.get("metrics", {}).get("heldout_accuracy")
    )
    features = embed(model, train)
    return [
        (
            None,
            {
                name: similarity(embed(model, images), features, method_cfg["similarity"])
                for name, images in inputs.query_pixels().items()
            },
        )
    ]
