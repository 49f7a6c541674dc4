"""`pipeline ui`: MLflow's UI on the project's store, opened on the experiment's training runs.

MLflow 3.17's UI no longer reads the experiment's `mlflow.experimentKind` tag to choose its
view: the kind it uses comes from a workspace-wide switch, "GenAI | Model training", that
each browser keeps in its local storage and that starts at GenAI (in the bundled UI, the
function that reads the tag returns the switch's value whenever the switch is enabled, and
its feature flag is hard-wired on). An address with `?workflowType=machine_learning` is the
one thing that opens a new browser on the runs table, so this command prints that address
and then starts `mlflow ui`.
"""

from __future__ import annotations

import os
import socket
import sys

from pipeline.errors import UserError

WORKFLOW_QUERY = "workflowType=machine_learning"


def runs_address(base: str, experiment_id: str) -> str:
    """The address of the experiment's runs table in MLflow's model-training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{WORKFLOW_QUERY}"


def experiment_id(uri: str, name: str) -> str:
    """The id of experiment `name` in the store at `uri`; a UserError when there is none."""
    from pipeline import tracking

    database = tracking.sqlite_file(uri)
    if database is not None and not database.exists():
        # MlflowClient would create an empty store here: say what to run instead.
        raise UserError(f"{database}: no MLflow store yet; run `dvc repro` first (or set MLFLOW_TRACKING_URI)")
    tracking.check_reachable(uri)
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    if experiment is None:
        raise UserError(
            f"mlflow.experiment: no experiment {name!r} in {uri}; run `dvc repro` first, or pass --experiment"
        )
    return str(experiment.experiment_id)


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"--port {port}: {host}:{port} is taken ({exc.strerror}); pass another --port") from None


def serve(experiment: str, host: str, port: int) -> None:
    """Print the runs table's address, then become `mlflow ui` on the project's store.

    With MLFLOW_TRACKING_URI naming a tracking server, that server already has the UI: only
    the address is printed.
    """
    from pipeline import tracking

    uri = tracking.tracking_uri()
    exp_id = experiment_id(uri, experiment)
    if uri.startswith(("http://", "https://")):
        print(runs_address(uri, exp_id), flush=True)
        return
    check_port_free(host, port)
    print(f"MLflow UI on {uri}; the training runs of {experiment!r}:", flush=True)
    print(runs_address(f"http://{host}:{port}", exp_id), flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    # Ctrl-C goes straight to MLflow's server: nothing of ours is left to clean up.
    os.execv(sys.executable, command)
