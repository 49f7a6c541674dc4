"""train_scratch: what pretraining buys, measured: the classic four-conv-block convnet
trained from scratch on the same training photos as the VGG16 head, no ImageNet weights.

Raw photos in (the model resizes them to `scratch.size` and rescales them itself), so
evaluate scores it end to end beside feature extraction, paired on the same test photos.
Writes models/scratch.keras, metrics/scratch.json and plots/scratch/ (history.csv, the layer
summary, training curves, the first layer's kernels, activation maps of one test photo).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import catalog
from pipeline.params import Params, load_params
from pipeline.stages.common import (
    Distribution,
    Trained,
    distribution_scope,
    fit,
    log_training_data,
    publish_training,
    start_training,
)

if TYPE_CHECKING:
    from pipeline.tracking import StageRun

STAGE = catalog.STAGES["train_scratch"]
SPLITS = ("train", "validation", "test")


def train_scratch(
    photos: dict[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    params: Params,
    distribution: Distribution | None = None,
    run: StageRun | None = None,
) -> Trained:
    """Build, fit and test the convnet on `photos` ({split: (uint8 photos, integer labels)}).
    `distribution` and `run` as for `train_baseline` (the run makes it resumable)."""
    from pipeline.models.optimizer import make_optimizer
    from pipeline.models.scratch import build_scratch_convnet, loss_for

    p = params.scratch
    scope, replicas = distribution or distribution_scope(params.train)
    with scope:
        model = build_scratch_convnet(photos["train"][0].shape[1:], num_classes, p, params.seed)
        model.compile(
            optimizer=make_optimizer(p.optimizer, p.learning_rate), loss=loss_for(num_classes), metrics=["accuracy"]
        )
    result = fit(
        model,
        photos["train"],
        photos["validation"],
        p.epochs,
        p.batch_size * replicas,
        p.early_stopping_patience,
        params.train.tf_data,
        params.seed,
        run=run,
    )
    test_loss, test_accuracy = model.evaluate(*photos["test"], batch_size=64, verbose=0)
    return Trained(
        model=model,
        fit=result,
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        test_samples=len(photos["test"][0]),
        validation_samples=len(photos["validation"][0]),
    )


def figures(model, photo: np.ndarray) -> dict:
    """The first conv layer's RGB kernels and the activation maps of one test photo."""
    from pipeline.viz.activations import conv_figures

    return conv_figures(model, photo.astype(np.float32), "kernels learned from scratch")


def run(params_file: Path) -> None:
    params = load_params(params_file)  # first: a bad param is reported before TensorFlow loads
    from pipeline.tracking import tracked

    distribution = start_training(params, *catalog.upstream(STAGE))
    with np.load(catalog.IMAGES) as data:
        photos = {split: (data[f"x_{split}"], data[f"y_{split}"]) for split in SPLITS}
        class_names = [str(name) for name in data["class_names"]]
    with tracked(STAGE, params) as run:
        log_training_data(run)
        trained = train_scratch(photos, len(class_names), params, distribution, run)
        test_photos = photos["test"][0]
        publish_training(run, trained, figures=figures(trained.model, test_photos[0]), example=test_photos[:2])
