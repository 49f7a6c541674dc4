"""train_baseline: the MNIST convnet, trained, tested, visualised and logged to MLflow.

Writes models/baseline.keras, metrics/baseline.json and plots/baseline/ (history.csv, the
layer summary, training curves, the first layer's kernels, activation maps of one digit).
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

STAGE = catalog.STAGES["train_baseline"]
DATA = catalog.MNIST


def train_baseline(
    arrays: dict[str, np.ndarray],
    params: Params,
    distribution: Distribution | None = None,
    run: StageRun | None = None,
) -> Trained:
    """Build, fit (logging each epoch to the active MLflow run) and test the baseline.

    `distribution` is `distribution_scope(params.train)`, made by the caller before any TF op;
    `run` the stage run, whose epoch backup makes the training resumable.
    """
    from pipeline.models.baseline import build_baseline

    return train_digit_classifier(build_baseline, arrays, params.baseline, params, distribution, run)


def figures(model, digit: np.ndarray) -> dict:
    """The first conv layer's kernels and the activation maps of one test digit."""
    from pipeline.viz.activations import conv_figures

    return conv_figures(model, digit, "learned kernels")


def run(params_file: Path) -> None:
    params = load_params(params_file)  # first: a bad param is reported before TensorFlow loads
    from pipeline.tracking import tracked

    distribution = start_training(params, *catalog.upstream(STAGE))
    with np.load(DATA) as data:
        arrays = {key: data[key] for key in data.files}
    with tracked(STAGE, params) as run:
        log_training_data(run)
        trained = train_baseline(arrays, params, distribution, run)
        publish_training(
            run, trained, figures=figures(trained.model, arrays["x_test"][0]), example=arrays["x_test"][:2]
        )
