"""train_head: a new dense classifier on VGG16's cached block5_pool features.

Writes models/head.keras (the complete classifier: raw photos in, class probabilities out),
metrics/head.json and plots/head/.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import catalog
from pipeline.params import Params, load_params
from pipeline.stages.common import Distribution, Trained, distribution_scope, fit, publish_training, start_training
from pipeline.stages.vgg_common import load_features, loss_for, vgg_figures

if TYPE_CHECKING:
    from pipeline.tracking import StageRun

STAGE = catalog.STAGES["train_head"]


def train_head(
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    image_shape: tuple[int, ...],
    params: Params,
    distribution: Distribution | None = None,
    run: StageRun | None = None,
) -> Trained:
    """Build, fit and test the head on cached block5_pool features ({split: (features, labels)}),
    then assemble the complete classifier for `image_shape` photos (VGG16 with the weights
    of catalog.WEIGHTS below the head). `distribution` and `run` as for `train_baseline`."""
    from pipeline.models.optimizer import make_optimizer
    from pipeline.models.vgg import assemble_classifier, build_conv_base, build_head

    p = params.head
    scope, replicas = distribution or distribution_scope(params.train)
    with scope:
        head = build_head(splits["train"][0].shape[1:], num_classes, p.pooling, p.units, p.dropout)
        head.compile(
            optimizer=make_optimizer(p.optimizer, p.learning_rate), loss=loss_for(num_classes), metrics=["accuracy"]
        )
    result = fit(
        head,
        splits["train"],
        splits["validation"],
        p.epochs,
        p.batch_size * replicas,
        p.early_stopping_patience,
        params.train.tf_data,
        params.seed,
        run=run,
    )
    test_loss, test_accuracy = head.evaluate(*splits["test"], batch_size=256, verbose=0)
    conv_base = build_conv_base(str(catalog.WEIGHTS), image_shape)
    classifier = assemble_classifier(conv_base, head, unfreeze=0)
    return Trained(
        model=head, fit=result, test_loss=float(test_loss), test_accuracy=float(test_accuracy), saved_model=classifier
    )


def run(params_file: Path) -> None:
    params = load_params(params_file)  # first: a bad param is reported before TensorFlow loads
    from pipeline.tracking import tracked

    distribution = start_training(params, *catalog.upstream(STAGE))
    splits, class_names = load_features("pooled")
    with np.load(catalog.IMAGES) as data:
        examples = data["x_test"][:2]
    photo = examples[0]
    with tracked(STAGE, params) as run:
        trained = train_head(splits, len(class_names), photo.shape, params, distribution, run)
        figures = vgg_figures(trained.to_save, photo, ("block1_conv1", "block3_conv3", "block5_conv3"))
        publish_training(run, trained, figures=figures, example=examples)
