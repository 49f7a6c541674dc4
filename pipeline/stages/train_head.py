"""train_head: a new dense classifier on VGG16's cached block5_pool features.

Writes models/head.keras (the complete classifier: raw photos in, class probabilities out),
metrics/head.json and plots/head/.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import catalog
from pipeline.params import Params, load_params
from pipeline.stages.common import (
    Distribution,
    Trained,
    distribution_scope,
    log_training_data,
    publish_training,
    start_training,
)
from pipeline.stages.vgg_common import Splits, compile_classifier, fit_and_test, load_features, vgg_figures

if TYPE_CHECKING:
    from pipeline.tracking import StageRun

STAGE = catalog.STAGES["train_head"]


def fit_head(
    splits: Splits,
    num_classes: int,
    params: Params,
    distribution: Distribution | None = None,
    run: StageRun | None = None,
) -> Trained:
    """Build, fit and test the head alone on cached block5_pool features ({split: (features,
    labels)}), with the `head` params (benchmarks/bench_head.py calls this too)."""
    from pipeline.models.vgg import build_head

    p = params.head
    scope, replicas = distribution or distribution_scope(params.train)
    with scope:
        head = build_head(splits["train"][0].shape[1:], num_classes, p.pooling, p.units, p.dropout)
        compile_classifier(head, num_classes, p)
    return fit_and_test(head, splits, p, params, replicas, run, test_batch_size=256)


def train_head(
    splits: Splits,
    num_classes: int,
    image_shape: tuple[int, ...],
    params: Params,
    distribution: Distribution | None = None,
    run: StageRun | None = None,
) -> Trained:
    """`fit_head`, then assemble the complete classifier for `image_shape` photos (VGG16 with
    the weights of catalog.WEIGHTS below the head). `distribution` and `run` as for
    `train_baseline`."""
    from pipeline.models.vgg import assemble_classifier, build_conv_base

    trained = fit_head(splits, num_classes, params, distribution, run)
    # After the training, as before: building VGG16 draws its initial weights from the seeded random state.
    conv_base = build_conv_base(str(catalog.WEIGHTS), image_shape)
    return replace(trained, saved_model=assemble_classifier(conv_base, trained.model, unfreeze=0))


def run(params_file: Path) -> None:
    params = load_params(params_file)  # first: a bad param is reported before TensorFlow loads
    from pipeline.tracking import tracked

    distribution = start_training(params, *catalog.upstream(STAGE))
    splits, class_names = load_features("pooled")
    with np.load(catalog.IMAGES) as data:
        examples = data["x_test"][:2]
    photo = examples[0]
    with tracked(STAGE, params) as run:
        log_training_data(run)
        trained = train_head(splits, len(class_names), photo.shape, params, distribution, run)
        figures = vgg_figures(trained.to_save, photo, ("block1_conv1", "block3_conv3", "block5_conv3"))
        publish_training(run, trained, figures=figures, example=examples)
