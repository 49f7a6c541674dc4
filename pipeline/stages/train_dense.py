"""train_dense: the Dense-only MNIST model, trained, tested and logged to MLflow.

The convnet's counterpart in the translation test (evaluate scores both on shifted digits).
Writes models/dense.keras, metrics/dense.json and plots/dense/ (history.csv, the layer
summary, training curves and the first Dense layer's weights drawn as 28x28 images).
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
    log_training_data,
    publish_training,
    start_training,
    train_digit_classifier,
)

if TYPE_CHECKING:
    from pipeline.tracking import StageRun

STAGE = catalog.STAGES["train_dense"]
DATA = catalog.MNIST
UNITS_DRAWN = 16  # first-layer units whose weights are drawn


def train_dense(
    arrays: dict[str, np.ndarray],
    params: Params,
    distribution: Distribution | None = None,
    run: StageRun | None = None,
) -> Trained:
    """Build, fit (logging each epoch to MLflow) and test the Dense-only model, as
    train_baseline does the convnet."""
    from pipeline.models.dense import build_dense

    return train_digit_classifier(build_dense, arrays, params.dense, params, distribution, run)


def figures(model, image_shape: tuple[int, ...]) -> dict:
    """The first Dense layer's weights of its first units, each as an image of the digit's size."""
    from pipeline.viz.kernels import kernel_grid

    weights = model.get_layer("dense1").get_weights()[0][:, :UNITS_DRAWN]  # (pixels, units)
    kernels = weights.reshape(*image_shape[:2], 1, weights.shape[1])
    return {"weights_dense1.png": kernel_grid(kernels, "dense1: the weight of each pixel, per unit")}


def run(params_file: Path) -> None:
    params = load_params(params_file)  # first: a bad param is reported before TensorFlow loads
    from pipeline.tracking import tracked

    distribution = start_training(params, *catalog.upstream(STAGE))
    with np.load(DATA) as data:
        arrays = {key: data[key] for key in data.files}
    with tracked(STAGE, params) as run:
        log_training_data(run)
        trained = train_dense(arrays, params, distribution, run)
        publish_training(
            run, trained, figures=figures(trained.model, arrays["x_test"].shape[1:]), example=arrays["x_test"][:2]
        )
