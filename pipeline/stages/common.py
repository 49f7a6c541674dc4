"""What every stage shares: params, upstream checks, seeding, fitting, saving, model logging."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.files import atomic_path


def require(*paths: Path, stage: str) -> None:
    """Stop with one line when an upstream output is missing."""
    for path in paths:
        if not path.exists():
            raise UserError(f"{path}: missing; run `dvc repro {stage}` first")


def seed_everything(seed: int) -> None:
    """Same params, data and machine -> same numbers: seeds plus deterministic TF kernels."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def progress_mode() -> int | str:
    """Keras `verbose`: a live bar on a terminal, one line per epoch in logs."""
    return 1 if sys.stdout.isatty() else 2


@dataclass
class FitResult:
    history: "pandas.DataFrame"  # noqa: F821 - one row per epoch, Keras' log keys + epoch_seconds
    fit_seconds: float  # wall time of model.fit, for the benchmarks

    @property
    def seconds_per_epoch(self) -> float:
        return float(self.history["epoch_seconds"].median())


def fit(
    model,
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray] | None,
    epochs: int,
    batch_size: int,
    early_stopping_patience: int = 0,
) -> FitResult:
    """model.fit with per-epoch MLflow logging and timing (and optional early stopping)."""
    import keras
    import pandas as pd

    from pipeline.tracking import EpochLogger

    logger = EpochLogger()
    callbacks: list[keras.callbacks.Callback] = [logger]
    if early_stopping_patience and validation is not None:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                patience=early_stopping_patience, restore_best_weights=True
            )
        )
    has_validation = validation is not None and len(validation[0]) > 0
    started = time.perf_counter()
    history = model.fit(
        *train,
        validation_data=validation if has_validation else None,
        epochs=epochs,
        batch_size=batch_size,
        callbacks=callbacks,
        verbose=progress_mode(),
    )
    fit_seconds = time.perf_counter() - started
    frame = pd.DataFrame(history.history)
    frame.insert(0, "epoch", np.asarray(history.epoch) + 1)
    frame["epoch_seconds"] = logger.epoch_seconds[-len(frame) :]
    return FitResult(frame, fit_seconds)


def save_model(model, path: Path) -> None:
    """model.save, atomically (Keras wants the `.keras` suffix, which the temp name keeps)."""
    with atomic_path(path) as temp:
        model.save(temp)


def log_model(model, name: str = "model") -> None:
    """The model as an MLflow model (Keras flavour), with pinned requirements.

    Passing the requirements skips MLflow's inference, which re-imports the model in a
    subprocess and costs tens of seconds on a small CPU.
    """
    import keras
    import mlflow
    import tensorflow as tf

    requirements = [f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}"]
    mlflow.keras.log_model(model, name=name, pip_requirements=requirements)


def model_summary(model) -> str:
    """Keras' layer table (output shapes and parameter counts) as plain text."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), line_length=90)
    return "\n".join(lines)

