"""Does tracking cost anything? The default baseline trained twice in one process.

Once with plain `model.fit` (same model, same data, same batch size), then once through the
stage code (MLflow run, per-epoch logging, deterministic kernels). Prints JSON: median
seconds per epoch of each and their ratio. Needs data/prepared/mnist.npz
(`dvc repro prepare_mnist`). Run: `.venv/bin/python benchmarks/bench_baseline.py`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch, and nothing else."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)


def main() -> None:
    from pipeline.models.baseline import build_baseline
    from pipeline.models.optimizer import make_optimizer
    from pipeline.params import load_params
    from pipeline.stages import train_baseline
    from pipeline.stages.common import seed_everything
    from pipeline.tracking import stage_run

    params = load_params(Path("params.yaml"))
    p = params.baseline
    with np.load(train_baseline.DATA) as data:
        arrays = {key: data[key] for key in data.files}

    # Plain Keras first: the stage turns on deterministic kernels for the whole process.
    keras.utils.set_random_seed(params.seed)
    model = build_baseline(arrays["x_train"].shape[1:], arrays["y_train"].shape[1], p)
    steps = math.ceil(len(arrays["x_train"]) / p.batch_size) * p.epochs
    model.compile(
        optimizer=make_optimizer(p.optimizer, p.learning_rate, p.lr_schedule, steps),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    timer = EpochTimer()
    started = time.perf_counter()
    model.fit(
        arrays["x_train"],
        arrays["y_train"],
        epochs=p.epochs,
        batch_size=p.batch_size,
        validation_data=(arrays["x_validation"], arrays["y_validation"]),
        callbacks=[timer],
        verbose=2,
    )
    plain_fit = time.perf_counter() - started
    plain_accuracy = model.evaluate(arrays["x_test"], arrays["y_test"], verbose=0)[1]

    data_hash_input = train_baseline.DATA.resolve()
    with tempfile.TemporaryDirectory() as store:
        # The stage's epoch backups (.resume/) and its store go to a scratch folder: a backup
        # left in the project would make the next benchmark "resume" and time nothing.
        os.chdir(store)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
        seed_everything(params.seed)
        stage_params = {"seed": params.seed, "baseline": p.model_dump()}
        with stage_run("train_baseline", stage_params, [data_hash_input], "benchmark") as run:
            trained = train_baseline.train_baseline(arrays, params, run=run)
        assert trained.fit.history.shape[0] == p.epochs, "the stage half trained every epoch"

    plain = statistics.median(timer.seconds)
    stage = trained.fit.seconds_per_epoch
    json.dump(
        {
            "epochs": p.epochs,
            "plain_keras_seconds_per_epoch_median": round(plain, 3),
            "stage_seconds_per_epoch_median": round(stage, 3),
            "ratio_stage_to_plain": round(stage / plain, 3),
            "plain_keras_fit_seconds": round(plain_fit, 2),
            "stage_fit_seconds": round(trained.fit.fit_seconds, 2),
            "ratio_fit_seconds": round(trained.fit.fit_seconds / plain_fit, 3),
            "plain_keras_test_accuracy": round(float(plain_accuracy), 4),
            "stage_test_accuracy": round(trained.test_accuracy, 4),
        },
        sys.stdout,
        indent=2,
    )
    print()


if __name__ == "__main__":
    main()
