"""MLflow tracking: one run per stage, traceable to its DVC state, never left RUNNING.

The store is `MLFLOW_TRACKING_URI` when set, else an embedded `sqlite:///mlflow.db` at the
project root (artifacts in `mlartifacts/` beside it), so `mlflow ui` works with no server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.keras import MlflowCallback

from pipeline.errors import Killed
from pipeline.files import sha256_tree


def project_root() -> Path:
    """The project folder whose mlflow.db the runs go to.

    `dvc exp run --queue` runs stages in a copy under `<root>/.dvc/tmp/exps/`; their runs
    belong in the main project's store, not in a store inside the throw-away copy.
    """
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def use_experiment(name: str) -> None:
    """Point MLflow at the store and the experiment, creating it on first use."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(name) is None and "MLFLOW_TRACKING_URI" not in os.environ:
        # The embedded store's artifacts live beside it, whatever the working directory.
        mlflow.create_experiment(name, artifact_location=(project_root() / "mlartifacts").as_uri())
    mlflow.set_experiment(name)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> {"section.key": "value"} as MLflow params."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def _git(*args: str) -> str:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def run_tags(stage: str, params: Mapping[str, Any], inputs: list[Path]) -> dict[str, str]:
    """Tags that tie a run to its code, params, data and DVC experiment."""
    params_json = json.dumps(params, sort_keys=True, default=str)
    tags = {
        "pipeline.stage": stage,
        "mlflow.source.git.commit": _git("rev-parse", "HEAD") or "none",
        "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "params.sha256": hashlib.sha256(params_json.encode()).hexdigest(),
        "data.sha256": sha256_tree([p for p in inputs if p.exists()]),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


@contextlib.contextmanager
def stage_run(
    stage: str, params: Mapping[str, Any], inputs: list[Path], experiment: str
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one stage: params logged, tags set, and an honest end status.

    FINISHED on success, KILLED on Ctrl-C or SIGTERM, FAILED on any other exception.
    """
    use_experiment(experiment)
    run = mlflow.start_run(run_name=stage, tags=run_tags(stage, params, inputs))
    try:
        mlflow.log_params(flatten(params))
        yield run
    except (KeyboardInterrupt, Killed):
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


class EpochLogger(MlflowCallback):
    """MLflow's Keras callback, plus each epoch's wall time, logged with step=epoch.

    MLflow's own on_test_end logs validation metrics without a step after every evaluation,
    which duplicates the `val_*` metrics of each epoch; we keep only the per-epoch ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.epoch_seconds: list[float] = []
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self._started
        self.epoch_seconds.append(seconds)
        if logs is not None:
            logs = {**logs, "epoch_seconds": seconds}
        super().on_epoch_end(epoch, logs)

    def on_test_end(self, logs: dict | None = None) -> None:
        pass
