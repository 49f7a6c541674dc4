"""train.distribute: multi_worker - one training spread over several machines.

Every machine runs the same stage command (`pipeline train-baseline`, ...) in its own clone
of the project, with the data pulled (`dvc pull`) and `TF_CONFIG` naming the cluster and
its own place in it. The chief (task "chief", or worker 0 when there is none) is the one
that writes the stage's outputs and its MLflow run, normally under `dvc repro`; the other
workers train in step with it and keep nothing.

Keras 3's `model.fit` fails under `tf.distribute.MultiWorkerMirroredStrategy` as released
(keras-team/keras#20585, open since Keras 3.0): two reductions in its TensorFlow trainer
treat a multi-worker strategy wrongly. `keras_internals.fix_multi_worker_fit` corrects
exactly those two, only for that strategy; tests/test_scaling.py checks that plain Keras
still fails without them (so we learn when they can go) and that two workers with them
train the numbers one process does with the same global batch.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

HOW = "see README: More devices"


@dataclass(frozen=True)
class Role:
    chief: bool
    task: str  # e.g. "worker 1"
    workers: int  # machines in the cluster


def cluster_role(environ: Mapping[str, str] = os.environ) -> Role:
    """This process's place in the cluster that `TF_CONFIG` describes (UserError if it cannot)."""
    text = environ.get("TF_CONFIG", "")
    if not text.strip():
        raise UserError(f"TF_CONFIG: not set; train.distribute: multi_worker needs it on every machine ({HOW})")
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        kind, index = task["type"], int(task["index"])
        members = cluster.get(kind, []) if kind in ("chief", "worker") else []
        workers = sum(len(cluster.get(job, [])) for job in ("chief", "worker"))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UserError(
            f"TF_CONFIG: not a cluster and task of this machine ({type(exc).__name__}: {exc}); "
            f'expected {{"cluster": {{"worker": ["host:port", ...]}}, '
            f'"task": {{"type": "worker", "index": 0}}}} ({HOW})'
        ) from None
    if not 0 <= index < len(members):
        raise UserError(f"TF_CONFIG: task {kind} {index} is not in the cluster's chief or worker list ({HOW})")
    chief = kind == "chief" or (index == 0 and not cluster.get("chief"))
    return Role(chief=chief, task=f"{kind} {index}", workers=workers)


def strategy():
    """MultiWorkerMirroredStrategy from TF_CONFIG, with Keras' fit fixed for it.

    Create it before any other TensorFlow op. It returns once every task in TF_CONFIG has
    joined; until then TensorFlow waits in C++, where Ctrl-C cannot reach it (hence the line
    printed first, which says how to stop it).
    """
    import tensorflow as tf

    from pipeline.keras_internals import fix_multi_worker_fit

    role = cluster_role()  # a missing or malformed TF_CONFIG is one line, not a TensorFlow traceback
    fix_multi_worker_fit()
    print(
        f"{role.task} of {role.workers} (TF_CONFIG): waiting until every worker has joined "
        "(to give up: Ctrl-\\ or kill -9)",
        flush=True,
    )
    return tf.distribute.MultiWorkerMirroredStrategy()


def work_in_scratch(role: Role, inputs: list[Path]) -> Path:
    """Make this (non-chief) worker's outputs and MLflow run land in a folder deleted at exit.

    A worker must run every step the chief runs (each evaluation and prediction is a
    collective), so it runs the whole stage, in a scratch folder where `data/` and the
    stage's other inputs are links to the project's. Returns the scratch folder.
    """
    project = Path.cwd()
    scratch = Path(tempfile.mkdtemp(prefix=f"pipeline-{role.task.replace(' ', '')}-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    links = {Path("data")} | {path for path in inputs if path.parts[0] != "data"}
    for path in sorted(links):
        if (project / path).exists():
            (scratch / path).parent.mkdir(parents=True, exist_ok=True)
            (scratch / path).symlink_to((project / path).resolve())
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
    os.chdir(scratch)
    print(
        f"{role.task} of {role.workers} (TF_CONFIG) trains in step with the chief, "
        "which writes the outputs and the MLflow run; this machine keeps nothing",
        flush=True,
    )
    return scratch
