"""MLflow tracking: one run per stage, traceable to its DVC state, never left RUNNING.

Free of TensorFlow, so that stages that train nothing start in a second, not ten; the
Keras callback is in pipeline/epoch_logger.py.

The store is `MLFLOW_TRACKING_URI` when set, else an embedded `sqlite:///mlflow.db` at the
project root (artifacts in `mlartifacts/` beside it), so `mlflow ui` works with no server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow

from pipeline import warm
from pipeline.errors import Killed, UserError, raise_if_signalled, signals_deferred
from pipeline.files import sha256_tree

if TYPE_CHECKING:
    from pipeline.catalog import Stage
    from pipeline.params import Params


# MLflow's mark of a model-training experiment (ours trains models). MLflow 3.17's UI takes
# the view from its per-browser "GenAI | Model training" switch instead; `pipeline ui` prints
# the address that opens the training runs (pipeline/ui.py says why).
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: MODEL_TRAINING}
# The longest dataset digest MLflow stores (its column is 36 characters): our sha256 is cut
# to it, and kept whole in the input's tag `sha256`.
DATASET_DIGEST_LENGTH = 36


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
    """Point MLflow at the store and the experiment, creating it on first use.

    A tracking server is checked first, so that a wrong or dead URI is one line in seconds
    rather than minutes of MLflow's retries. A SQLite store is opened under a file lock:
    processes that start together (`dvc queue start -j 2`) would otherwise race to create
    its tables, the default experiment or `name`, and fail ("database is locked", "no such
    constraint", "already exists").
    """
    embedded = not os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri sets it, so ask first
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    database = sqlite_file(uri)
    with store_lock(database):
        if database is not None:
            use_wal(database)
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            # The embedded store's artifacts live beside it, whatever the working directory.
            location = (project_root() / "mlartifacts").as_uri() if embedded else None
            mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        elif EXPERIMENT_KIND not in experiment.tags:  # made before the tag was set; a user's own choice stays
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    mlflow.set_experiment(name)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?")[0])


@contextlib.contextmanager
def store_lock(database: Path | None) -> Iterator[None]:
    """An exclusive lock on `<database>-lock` while the block runs (no-op without a file)."""
    if database is None:
        yield
        return
    import fcntl

    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def use_wal(database: Path) -> None:
    """Write-ahead logging: readers (`mlflow ui`, other stages) no longer block a writer.

    The mode is stored in the file, so this changes it once; MLflow's sessions already wait
    up to 20 s for a lock (busy_timeout). A store on a network file system, where WAL does
    not work, is left as it is.
    """
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=30)) as connection:
            if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                connection.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error:
        pass


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A UserError naming the URI when an http(s) tracking server does not answer."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UserError(
            f"MLFLOW_TRACKING_URI={uri}: tracking server unreachable ({reason}); start it, "
            "or unset MLFLOW_TRACKING_URI to use the local mlflow.db"
        ) from None


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
        "pipeline.host": socket.gethostname(),  # with the pid: whether the run's process still lives
        "pipeline.pid": str(os.getpid()),
        # forked from `pipeline warm`: its process_seconds leave out the imports paid once there
        "pipeline.warm": str(warm.SERVED).lower(),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


@dataclass(frozen=True)
class StageRun:
    """One run of a stage, as handed to the code that does the work: which stage, the hashes
    of what it depends on (which decide whether an epoch backup may be restored), and its
    MLflow run."""

    stage: str
    params_sha256: str
    data_sha256: str
    mlflow_run: mlflow.ActiveRun

    @property
    def info(self) -> Any:
        """The MLflow run's info (run_id, ...), as on `mlflow.ActiveRun`."""
        return self.mlflow_run.info

    @property
    def tags(self) -> dict[str, str]:
        return self.mlflow_run.data.tags


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    inputs: list[Path],
    experiment: str,
    provenance: Mapping[str, Any] | None = None,
    system_metrics_seconds: float | None = None,
) -> Iterator[StageRun]:
    """An MLflow run for one stage: params logged, tags set, and an honest end status.

    `params` (what the stage depends on) are logged and hashed, `provenance` (where its
    data came from, not a dependency) only logged; `inputs` are hashed. FINISHED on
    success, KILLED on Ctrl-C or SIGTERM, FAILED on any other exception. A second signal
    while the run starts or ends waits until it has (else the run would stay RUNNING). Runs
    on this host whose process died without ending them (SIGKILL, out of memory) are ended
    KILLED when the next stage starts. With `system_metrics_seconds`, MLflow's own monitor
    logs CPU, memory, disk and network use (`system/...` metrics) every so many seconds.
    """
    use_experiment(experiment)
    end_orphaned_runs(experiment)
    tags = run_tags(stage, params, inputs)
    try:
        with signals_deferred():  # a signal held here is raised inside the try, so the run ends
            if system_metrics_seconds:
                mlflow.set_system_metrics_sampling_interval(system_metrics_seconds)
            run = mlflow.start_run(run_name=stage, tags=tags, log_system_metrics=bool(system_metrics_seconds))
        mlflow.log_params({**flatten(params), **flatten(provenance or {})})
        yield StageRun(stage, tags["params.sha256"], tags["data.sha256"], run)
        raise_if_signalled()  # a signal whose exception was swallowed on the way ends it KILLED
    except (KeyboardInterrupt, Killed):
        with signals_deferred():
            mlflow.end_run("KILLED")
        raise
    except BaseException:
        with signals_deferred():
            mlflow.end_run("FAILED")
        raise
    else:
        with signals_deferred():
            mlflow.log_metrics({"process_seconds": round(process_seconds(), 2), "peak_rss_mib": peak_rss_mib()})
            mlflow.end_run("FINISHED")


def tracked(stage: Stage, params: Params) -> contextlib.AbstractContextManager[StageRun]:
    """`stage_run` for a stage of the catalog: it logs and hashes the params and the inputs
    that dvc.yaml lists for it (tests/test_catalog.py holds the two together). Training
    stages log system metrics (`mlflow.system_metrics_seconds`), so cost sits beside accuracy."""
    from pipeline.catalog import MODELS

    training = any(model.stage == stage.name for model in MODELS.values())
    return stage_run(
        stage.name,
        stage.params_of(params),
        list(stage.data_deps),
        params.mlflow.experiment,
        stage.provenance_of(params),
        params.mlflow.system_metrics_seconds if training else None,
    )


def log_datasets(path: Path, splits: Mapping[str, tuple[Any, Any]], contexts: Mapping[str, str]) -> dict[str, str]:
    """Log each split of the prepared data file `path` as an input of the active run.

    `splits` maps a split name to its (images, labels), `contexts` a split to MLflow's
    context ("training", "validation", "test", "evaluation"). Each dataset is named
    `<file stem>.<split>` (e.g. `images.test`), its source is the file, its digest our sha256
    of the arrays (cut to MLflow's 36 characters; whole in the input's tag `sha256`), so the
    UI's dataset column says what trained and tested what. Returns {split: sha256}.
    """
    from mlflow.data.numpy_dataset import from_numpy

    from pipeline.files import sha256_arrays

    hashes = {}
    for split, (images, labels) in splits.items():
        sha256 = sha256_arrays(images, labels)
        with warnings.catch_warnings():
            # A local path is a "LocalArtifactDatasetSource" under two registered names, and
            # MLflow warns that it picked one of the two (the same class): nothing to act on.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = from_numpy(
                images,
                targets=labels,
                source=str(path.resolve()),
                name=f"{path.stem}.{split}",
                digest=sha256[:DATASET_DIGEST_LENGTH],
            )
        mlflow.log_input(dataset, context=contexts[split], tags={"sha256": sha256})
        hashes[split] = sha256
    return hashes


def process_seconds() -> float:
    """Wall seconds since this process started: a stage's whole cost, imports included."""
    import psutil

    return time.time() - psutil.Process().create_time()


def peak_rss_mib() -> float:
    """The most memory this process has held resident so far, in MiB (the kernel's high-water mark)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux counts kB


def end_orphaned_runs(experiment_name: str) -> None:
    """End KILLED the RUNNING runs of the experiment started on this host by a dead process."""
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        return
    client = mlflow.MlflowClient()
    host = socket.gethostname().replace("'", "")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`pipeline.host` = '{host}'",
    )
    for run in runs:
        pid = run.data.tags.get("pipeline.pid", "")
        if pid.isdigit() and not _process_alive(int(pid)):
            client.set_tag(run.info.run_id, "pipeline.ended_by", "a later stage: its process had died")
            client.set_terminated(run.info.run_id, "KILLED")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_model(model: Any, example: Any, name: str = "model") -> str:
    """The model as an MLflow model (Keras flavour) with its signature, an input example and
    pinned requirements.

    `example` is a few input rows, from which MLflow records the input and output schema;
    the first is kept as the input example (what the MLflow UI shows, and what
    `mlflow models serve` documents the input with). Passing the requirements skips MLflow's
    inference, which re-imports the model in a subprocess and costs tens of seconds on a
    small CPU. MLflow's check of the input example (load the saved model back and predict:
    1.0-1.1 s for a VGG16-based model, 0.2 s for an MNIST one, and a failure is only a warning
    in the log) is skipped too: that a logged model serves is the suite's job (test_pipeline
    predicts with the run's logged baseline, test_evaluate serves the champion over HTTP, both
    against Keras). Returns the logged model's URI (models:/<id>).
    """
    import keras
    import tensorflow as tf
    from mlflow.models import infer_signature

    requirements = [f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}"]
    signature = infer_signature(example, model.predict(example, verbose=0))
    info = mlflow.models.Model.log(
        artifact_path=None,
        name=name,
        flavor=_KerasFlavor,
        model=model,
        pip_requirements=requirements,
        signature=signature,
        input_example=example[:1],
        validate_serving_input=False,
    )
    return info.model_uri


class _KerasFlavor:
    """mlflow.keras for `Model.log`, with the model's folder made first: MLflow 3.17's Keras
    flavour writes the input example into the folder before it creates it
    (FileNotFoundError: .../model/input_example.json), so `mlflow.keras.log_model` fails
    whenever an input example is given. The saved model is mlflow.keras' own."""

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path: str, validate_serving_input: bool = True, **kwargs: Any) -> None:
        # (`validate_serving_input` is Model.log's, which hands its keyword arguments on to here)
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)
