"""What the training stages share: their start (threads, strategy, seeds), fit with epoch
backups, and publishing their outputs (files and MLflow)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from pipeline.errors import require
from pipeline.files import atomic_path
from pipeline.params import Params, TrainParams

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.resume import EpochBackup
    from pipeline.tracking import StageRun


def seed_everything(seed: int) -> None:
    """Same params, data and machine -> same numbers: seeds plus deterministic TF kernels."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def set_threads(train: TrainParams) -> None:
    """Apply `train.intra_op_threads` / `inter_op_threads` (0 = TensorFlow's default).

    TensorFlow takes these only before it starts: call this first, before any TF op.
    """
    import tensorflow as tf

    if train.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(train.intra_op_threads)
    if train.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(train.inter_op_threads)


class Distribution(NamedTuple):
    scope: AbstractContextManager  # build and compile the model inside it
    replicas: int  # global batch = per-replica batch (the params) x replicas


def distribution_scope(train: TrainParams) -> Distribution:
    """The tf.distribute strategy that `train.distribute` names, as (scope, replicas).

    mirrored: one replica per visible GPU, or per logical CPU when there is no GPU (one on
    a plain machine); multi_worker: the replicas of every machine in TF_CONFIG's cluster
    (pipeline/multi_worker.py). Create it after `set_threads` and before any other TF op.
    """
    import tensorflow as tf

    if train.distribute == "none":
        strategy = tf.distribute.get_strategy()
    elif train.distribute == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    elif train.distribute == "multi_worker":
        from pipeline import multi_worker

        strategy = multi_worker.strategy()
    else:
        raise AssertionError(f"train.distribute {train.distribute!r} passed validation")
    return Distribution(strategy.scope(), strategy.num_replicas_in_sync)


def start_training(params: Params, *inputs: tuple[Path, str]) -> Distribution:
    """The common start of a training stage, in the order TensorFlow needs it.

    Each (path, upstream stage) in `inputs` must exist; then the thread settings, the
    distribution strategy, and the seeds. Returns the strategy's (scope, replicas).
    A multi-worker helper (not the chief) goes on in a scratch folder: it runs the whole
    stage in step with the chief and keeps nothing.
    """
    for path, stage in inputs:
        require(path, stage=stage)
    role = None
    if params.train.distribute == "multi_worker":
        from pipeline import multi_worker

        role = multi_worker.cluster_role()  # a bad TF_CONFIG is reported before TensorFlow loads
    set_threads(params.train)
    from pipeline import keras_internals

    keras_internals.save_weights_through_disk()  # saving a model adds no second copy of it to the peak
    distribution = distribution_scope(params.train)
    if role is not None and not role.chief:
        multi_worker.work_in_scratch(role, [path for path, _ in inputs])
    seed_everything(params.seed)
    return distribution


def progress_mode() -> int | str:
    """Keras `verbose`: a live bar on a terminal, one line per epoch in logs."""
    return 1 if sys.stdout.isatty() else 2


@dataclass
class FitResult:
    history: pd.DataFrame  # one row per epoch, Keras' log keys + epoch_seconds
    fit_seconds: float  # wall time of model.fit, for the benchmarks
    resumed_after: int = 0  # epochs restored from a backup (0: trained from the start)
    kept_epoch: int | None = None  # the epoch whose weights the model ends with (0: the start)
    start_validation: dict | None = None  # validation scores of the starting weights, when measured

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
    tf_data: bool = False,
    shuffle_seed: int = 0,
    run: StageRun | None = None,
    keep_by: str = "val_loss",
    metric_prefix: str = "",
) -> FitResult:
    """model.fit with per-epoch MLflow logging and timing (and optional early stopping, which
    keeps the epoch with the best `keep_by`: "val_loss" or "val_accuracy").

    `metric_prefix` goes before each per-epoch MLflow metric ("block3." -> block3.val_loss),
    for a stage that trains several models in its run.

    Given the stage's `run`, the training is resumable (pipeline/resume.py): each epoch's
    state is backed up under .resume/<stage>/, and a backup left by a killed run with the
    same params, data and architecture is restored first, so only the remaining epochs run;
    the history (and the MLflow run's metrics) still has every epoch.
    """
    import keras
    import mlflow
    import pandas as pd

    from pipeline.epoch_logger import EpochLogger, StopOnSignal

    logger = EpochLogger(metric_prefix)
    callbacks: list[keras.callbacks.Callback] = [StopOnSignal(), logger]
    early_stopping = None
    if early_stopping_patience and validation is not None:
        early_stopping = early_stopping_from_start(validation, batch_size, early_stopping_patience, keep_by)
        callbacks.append(early_stopping)
    backup = _epoch_backup(run, model, logger.rows, early_stopping)
    initial_epoch, restored_rows, resumed_after = 0, [], 0
    if backup is not None:
        restored = backup.restore(model)
        initial_epoch, restored_rows = (epochs if restored.stopped else restored.epochs), restored.rows
        resumed_after = restored.epochs
        if restored.epochs:
            _note_resumed(backup.stage, restored.epochs, epochs, backup.folder)
            logger.log_restored(restored_rows)
        callbacks.append(backup)  # after EarlyStopping: it saves the state that one has updated
    if run is not None:  # what the params' per-replica batch sizes came to
        mlflow.log_params(
            {"train.replicas": model.distribute_strategy.num_replicas_in_sync, "train.global_batch_size": batch_size}
        )
    has_validation = validation is not None and len(validation[0]) > 0
    started = time.perf_counter()
    model.fit(
        **fit_inputs(
            train, validation if has_validation else None, batch_size, tf_data, epochs, initial_epoch, shuffle_seed
        ),
        epochs=epochs,
        callbacks=callbacks,
        verbose=progress_mode(),
        initial_epoch=initial_epoch,
    )
    fit_seconds = time.perf_counter() - started
    frame = pd.DataFrame(restored_rows + logger.rows)
    kept = len(frame) if early_stopping is None else early_stopping.best_epoch + 1
    # After a resume, on_train_begin scored the restored weights, not the starting ones.
    start = early_stopping.start if early_stopping is not None and initial_epoch == 0 else None
    return FitResult(frame, fit_seconds, resumed_after, kept_epoch=kept, start_validation=start)


def early_stopping_from_start(
    validation: tuple[np.ndarray, np.ndarray], batch_size: int, patience: int, monitor: str = "val_loss"
):
    """Keras' EarlyStopping on `monitor` ("val_loss": lowest wins; "val_accuracy": highest
    wins, ties go to the earlier epoch), restoring the best weights, whose candidates include
    the weights that fit starts from (best_epoch -1): a training that never beats its
    starting point on validation (fine-tuning an already trained head, say) ends where it
    started instead of worse. Costs one evaluation of the validation set."""
    import keras

    if monitor not in ("val_loss", "val_accuracy"):
        raise ValueError(f"monitor must be val_loss or val_accuracy, got {monitor!r}")
    score = monitor.removeprefix("val_")

    class EarlyStoppingFromStart(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self.start = self.model.evaluate(*validation, batch_size=batch_size, verbose=0, return_dict=True)
            self.best = self.start[score]
            self.best_weights = self.model.get_weights()
            self.best_epoch = -1

    mode = "min" if score == "loss" else "max"
    return EarlyStoppingFromStart(monitor=monitor, mode=mode, patience=patience, restore_best_weights=True)


def fit_inputs(
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray] | None,
    batch_size: int,
    tf_data: bool,
    epochs: int = 1,
    initial_epoch: int = 0,
    seed: int = 0,
) -> dict:
    """model.fit's data arguments: the arrays, or (`tf_data`) tf.data pipelines built from them.

    The tf.data pipeline streams epochs `initial_epoch`..`epochs`-1 as one dataset: each
    epoch's order is a permutation drawn from (seed, epoch) alone, its batches are gathered
    from the arrays and prefetched while the model trains. Since the order does not depend
    on how many iterators came before (tf.data's own reshuffling does, and Keras makes two
    per epoch), a training resumed at epoch k sees exactly the orders of an uninterrupted one.
    """
    if not tf_data:
        return {"x": train[0], "y": train[1], "batch_size": batch_size, "validation_data": validation}
    import tensorflow as tf

    count = len(train[0])
    x, y = tf.convert_to_tensor(train[0]), tf.convert_to_tensor(train[1])

    def epoch_batches(epoch):
        keys = tf.random.stateless_uniform([count], seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return tf.data.Dataset.from_tensor_slices(tf.argsort(keys)).batch(batch_size)

    stream = (
        tf.data.Dataset.range(initial_epoch, epochs)
        .flat_map(epoch_batches)
        .map(lambda rows: (tf.gather(x, rows), tf.gather(y, rows)))
        .prefetch(tf.data.AUTOTUNE)
    )
    checked = None
    if validation:
        checked = tf.data.Dataset.from_tensor_slices(validation).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return {"x": stream, "steps_per_epoch": -(-count // batch_size), "validation_data": checked}


def _epoch_backup(run: StageRun | None, model, rows: list[dict], early_stopping) -> EpochBackup | None:
    """The epoch backup of `run`'s training of `model`, or None without a run (or compiled model)."""
    import tensorflow as tf

    from pipeline.resume import EpochBackup

    if run is None or model.optimizer is None:
        return None
    if isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None  # each machine would restore its own backup (or none): out of step
    return EpochBackup.of_run(run, model, rows, early_stopping)


def _note_resumed(stage: str, done: int, epochs: int, folder: Path) -> None:
    import mlflow

    print(f"{stage}: resuming after epoch {done} of {epochs} from {folder}", flush=True)
    mlflow.set_tag("resumed_after_epoch", str(done))


def save_model(model, path: Path) -> None:
    """model.save, atomically (Keras wants the `.keras` suffix, which the temp name keeps)."""
    with atomic_path(path) as temp:
        model.save(temp)


def log_training_data(run: StageRun) -> None:
    """The train, validation and test splits of the prepared data file that training stage
    `run.stage` reads, as the inputs of its run (tracking.log_datasets): which data trained
    the model, in MLflow. Called as the run starts, before the training's memory peaks (the
    prepared photos' splits added 64 MB to finetune's peak when this ran at the end)."""
    from pipeline.catalog import model_of
    from pipeline.tracking import log_datasets

    data = model_of(run.stage).test_data
    contexts = {"train": "training", "validation": "validation", "test": "test"}
    with np.load(data) as arrays:
        for split, context in contexts.items():  # one split in memory at a time: this runs at a stage's peak
            log_datasets(data, {split: (arrays[f"x_{split}"], arrays[f"y_{split}"])}, {split: context})


def model_summary(model) -> str:
    """Keras' layer table (output shapes and parameter counts) as plain text."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), line_length=90)
    return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class Trained:
    """What a training stage's testable function returns: the outputs `publish_training` writes."""

    model: Any  # the model that was fitted
    fit: FitResult
    test_loss: float
    test_accuracy: float
    test_samples: int  # the test accuracy's sample count, for its interval
    validation_samples: int  # the validation accuracies' sample count (0: no validation split)
    saved_model: Any = None  # what is saved and logged, when not `model` (the VGG stages' whole classifier)

    @property
    def to_save(self) -> Any:
        return self.model if self.saved_model is None else self.saved_model


def publish_training(run: StageRun, trained: Trained, *, figures: dict, example: np.ndarray) -> dict:
    """Write a training stage's outputs atomically, log them to its MLflow run, and discard
    its epoch backup (nothing is left to resume). Returns the metrics written.

    The paths are the catalog's for `run.stage`: the model, the metrics file and the plots
    folder, which gets history.csv (a DVC plot), summary.txt (Keras' layer table with output
    shapes), curves.png and `figures` (name -> matplotlib Figure). `example` is a few inputs
    of the saved model, for the MLflow model signature.
    """
    import mlflow

    from pipeline.catalog import model_of
    from pipeline.files import write_json
    from pipeline.resume import discard
    from pipeline.tracking import log_model
    from pipeline.viz.curves import training_curves_figure

    paths, result, saved = model_of(run.stage), trained.fit, trained.to_save
    metrics = {
        **accuracy_with_interval("test", trained.test_accuracy, trained.test_samples),
        "test_loss": float(trained.test_loss),
        **kept_validation_accuracy(result, trained.validation_samples),
        "epochs": int(len(result.history)),
        "kept_epoch": result.kept_epoch,  # early stopping's pick (0: the starting weights)
        "seconds_per_epoch": round(result.seconds_per_epoch, 3),
        "mlflow_run_id": run.info.run_id,
    }
    summary = model_summary(saved)
    with atomic_path(paths.plots, directory=True) as plots:
        result.history.to_csv(plots / paths.history.name, index=False)
        (plots / "summary.txt").write_text(summary + "\n", encoding="utf-8")
        all_figures = {"curves.png": training_curves_figure(result.history, start=result.start_validation), **figures}
        for name, figure in all_figures.items():
            figure.savefig(plots / name, dpi=100)
    save_model(saved, paths.model)
    write_json(paths.metrics, metrics)
    mlflow.log_metrics(mlflow_metrics(metrics))
    mlflow.log_text(summary, "model_summary_saved.txt")
    mlflow.log_artifacts(str(paths.plots), artifact_path="plots")
    log_model(saved, example)  # (its training data went in as the run began: `log_training_data`)
    discard(run.stage)  # the outputs are complete: nothing left to resume
    return metrics


def accuracy_with_interval(split: str, accuracy: float, samples: int) -> dict:
    """{<split>_accuracy, <split>_accuracy_ci95: [low, high] (95% Wilson), <split>_samples}."""
    from pipeline.evaluation import wilson_interval

    correct = round(accuracy * samples)
    return {
        f"{split}_accuracy": float(accuracy),
        f"{split}_accuracy_ci95": list(wilson_interval(correct, samples)),
        f"{split}_samples": int(samples),
    }


def kept_validation_accuracy(result: FitResult, samples: int) -> dict:
    """The validation accuracy of the weights the model ends with (early stopping's pick, else
    the last epoch's), with its interval; {} without a validation split."""
    history = result.history
    if not samples or "val_accuracy" not in history.columns or history.empty:
        return {}
    kept = result.kept_epoch if result.kept_epoch is not None else len(history)
    if kept == 0:  # the starting weights were kept
        accuracy = (result.start_validation or {}).get("accuracy")
        if accuracy is None:
            return {}
    else:
        accuracy = float(history["val_accuracy"].iloc[kept - 1])
    return accuracy_with_interval("validation", float(accuracy), samples)


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """A metrics file as MLflow metrics: numbers as they are, an interval [low, high] as
    `<name>_low` and `<name>_high` (what `pipeline compare` shows beside its metric)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, list) and len(value) == 2:
            flat[f"{key}_low"], flat[f"{key}_high"] = float(value[0]), float(value[1])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)
    return flat


def train_digit_classifier(
    build: Callable[[tuple[int, ...], int, Any], Any],
    arrays: dict[str, np.ndarray],
    p: Any,
    params: Params,
    distribution: Distribution | None,
    run: StageRun | None,
) -> Trained:
    """Build an MNIST classifier with `build(image shape, classes, p)` in the distribution's
    scope, compile it (the section `p`: optimizer, learning_rate, lr_schedule), fit it on
    `arrays` (x_/y_ train, validation, test; batch_size, epochs, early_stopping_patience of
    `p`) and test it. `distribution` as made by the caller before any TF op (else made here)."""
    from pipeline.models.optimizer import make_optimizer

    scope, replicas = distribution or distribution_scope(params.train)
    steps = math.ceil(len(arrays["x_train"]) / (p.batch_size * replicas)) * p.epochs  # batch_size is per replica
    with scope:
        model = build(arrays["x_train"].shape[1:], arrays["y_train"].shape[1], p)
        model.compile(
            optimizer=make_optimizer(p.optimizer, p.learning_rate, p.lr_schedule, steps),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
        )
    result = fit(
        model,
        (arrays["x_train"], arrays["y_train"]),
        (arrays["x_validation"], arrays["y_validation"]),
        epochs=p.epochs,
        batch_size=p.batch_size * replicas,
        early_stopping_patience=p.early_stopping_patience,
        tf_data=params.train.tf_data,
        shuffle_seed=params.seed,
        run=run,
    )
    test_loss, test_accuracy = model.evaluate(arrays["x_test"], arrays["y_test"], batch_size=256, verbose=0)
    return Trained(
        model=model,
        fit=result,
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        test_samples=len(arrays["x_test"]),
        validation_samples=len(arrays["x_validation"]),
    )
