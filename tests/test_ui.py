"""`pipeline ui`: the address of the training runs, then MLflow's own UI server on the store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, command_env, free_port, run_command, wait_for

from pipeline import ui

EXPERIMENT = "image-classification"  # mlflow.experiment in the shipped params.yaml


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, str]:
    """A folder with the shipped params.yaml and an mlflow.db whose experiment was made the
    way the stages make it; and the experiment's id."""
    root = tmp_path_factory.mktemp("ui")
    shutil.copy(REPO / "params.yaml", root)
    code = f"from pipeline import tracking; tracking.use_experiment('{EXPERIMENT}'); import mlflow; "
    code += f"print(mlflow.get_experiment_by_name('{EXPERIMENT}').experiment_id)"
    return root, run_command(["python", "-c", code], cwd=root).stdout.strip().splitlines()[-1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def answers(url: str) -> bool:
    try:
        return get(url) == b"OK"
    except OSError:
        return False


def test_it_prints_the_runs_address_and_serves_the_store_with_mlflow_ui(project):
    root, exp_id = project
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(["pipeline", "ui", "--port", str(port)], cwd=root, env=command_env(),
                                  stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            wait_for(lambda: answers(f"http://127.0.0.1:{port}/health"), "mlflow ui to answer", timeout=90,
                     process=server, log=log)
            log.seek(0)
            printed = log.read().splitlines()
            assert f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs?workflowType=machine_learning" in printed
            # The server reads the project's store: the experiment, with its model-training tag.
            reply = json.loads(get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name"
                                   f"?experiment_name={EXPERIMENT}"))
            assert reply["experiment"]["experiment_id"] == exp_id
            tags = {tag["key"]: tag["value"] for tag in reply["experiment"]["tags"]}
            assert tags["mlflow.experimentKind"] == "custom_model_development"
            assert b"<html" in get(f"http://127.0.0.1:{port}/").lower()  # the UI itself
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def test_an_unknown_experiment_or_a_taken_port_is_one_line(project):
    root, _ = project
    result = run_command(["pipeline", "ui", "-e", "nope"], cwd=root, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no experiment 'nope'" in result.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_command(["pipeline", "ui", "--port", str(port)], cwd=root, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"--port {port}" in result.stderr and "pass another --port" in result.stderr


def test_without_a_store_it_says_what_to_run_and_creates_nothing(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path)
    result = run_command(["pipeline", "ui"], cwd=tmp_path, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "mlflow.db: no MLflow store yet; run `dvc repro` first" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()


def test_with_a_tracking_server_it_prints_that_servers_address_and_starts_nothing(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000/")
    monkeypatch.setattr(ui, "experiment_id", lambda uri, name: "7" if uri == "http://mlflow.example:5000/" else "?")
    monkeypatch.setattr(os, "execv", lambda *args: pytest.fail("started a server"))
    ui.serve(EXPERIMENT, "127.0.0.1", 5000)
    assert capsys.readouterr().out == "http://mlflow.example:5000/#/experiments/7/runs?workflowType=machine_learning\n"
