"""The Keras callbacks of the training stages: per-epoch metrics and wall time to MLflow,
and a stop at the next batch when a signal arrived.

Apart from pipeline/tracking.py because `mlflow.keras` imports TensorFlow.
"""

from __future__ import annotations

import time

import keras
import mlflow
from mlflow.keras import MlflowCallback

from pipeline.errors import raise_if_signalled


class EpochLogger(MlflowCallback):
    """MLflow's Keras callback, plus each epoch's wall time, logged with step=epoch.

    MLflow's own on_test_end logs validation metrics without a step after every evaluation,
    which duplicates the `val_*` metrics of each epoch; we keep only the per-epoch ones.
    Outside a stage's run (a study, a test, a notebook) it only keeps the rows: MLflow's
    logging calls would start a run of their own, left open in whatever store is current.
    """

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.rows: list[dict] = []  # one per epoch: {"epoch": 1-based, Keras' logs..., "epoch_seconds"}
        self._started = 0.0
        self.prefix = prefix  # before each MLflow metric name: several models trained in one run

    def on_train_begin(self, logs: dict | None = None) -> None:
        """MLflow's optimizer params and model summary; under the prefix when there is one
        (each model of the run has its own optimizer, whose Keras name differs)."""
        if mlflow.active_run() is None:
            return
        if not self.prefix:
            super().on_train_begin(logs)
            return
        config = self.model.optimizer.get_config()
        mlflow.log_params({f"{self.prefix}optimizer_{key}": value for key, value in config.items()})
        lines: list[str] = []
        self.model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
        mlflow.log_text("\n".join(lines), artifact_file=f"{self.prefix}model_summary.txt")

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self._started
        if logs is not None:
            logs = {**logs, "epoch_seconds": seconds}
            self.rows.append({"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}})
            logs = {f"{self.prefix}{key}": value for key, value in logs.items()}
        if mlflow.active_run() is not None and logs is not None:
            # Synchronously, where MLflow's callback queues them: an epoch's metrics are in the
            # store as it ends (a killed stage keeps them), for ~5 ms an epoch on SQLite, and the
            # run's end no longer waits for the queue's thread (its 1 s poll: 0.7-1.1 s a stage).
            mlflow.log_metrics(logs, step=epoch, synchronous=True, model_id=self.model_id)

    def log_restored(self, rows: list[dict]) -> None:
        """Log the epochs a resumed training restored, so this run has every epoch's metrics."""
        if mlflow.active_run() is None:
            return
        for row in rows:
            metrics = {key: value for key, value in row.items() if key != "epoch"}
            mlflow.log_metrics(metrics, step=row["epoch"] - 1)

    def on_test_end(self, logs: dict | None = None) -> None:
        """Nothing: the `val_*` metrics are logged per epoch by on_epoch_end (see the class)."""


class StopOnSignal(keras.callbacks.Callback):
    """Ends fit, evaluate or predict at the next batch once SIGTERM or SIGINT has arrived.

    The signal handler raises at once (pipeline/errors.py), but that exception can be
    swallowed by library code (a bare `except:` in Keras' graph tracing); the signal is
    recorded all the same, and this raises it again at a batch boundary.
    """

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        raise_if_signalled()

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        raise_if_signalled()

    def on_predict_batch_end(self, batch: int, logs: dict | None = None) -> None:
        raise_if_signalled()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        raise_if_signalled()
