"""Reliability and reproducibility: failures and kills end MLflow runs honestly, a killed
training resumes exactly, outputs are atomic, reruns are bit-identical, queued experiments
share the SQLite store, a tracking server works and a dead one is one line.

The first tests run in this process on tiny models; the rest share one tiny git+DVC
project (the MNIST stages) and run the real `pipeline` and `dvc` commands in subprocesses.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from ruamel.yaml import YAML

from conftest import REPO, dead_url, write_mnist_mirror

BIN = Path(sys.executable).parent
EPOCHS = 8  # the kill lands after epoch 1: seven more leave room for a slow machine
TIMINGS = {"seconds_per_epoch", "mlflow_run_id"}


# --------------------------------------------------------------------------------------
# In this process: run status, orphaned runs, signals, atomic outputs, exact resume
# --------------------------------------------------------------------------------------


@pytest.fixture
def embedded_store(workdir, monkeypatch):
    """The embedded store (mlflow.db in the temp project). MLflow's set_tracking_uri exports
    MLFLOW_TRACKING_URI; setting it first makes monkeypatch restore the original after."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset-by-this-fixture")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    return workdir


@pytest.fixture(autouse=True)
def python_ctrl_c():
    """Python's own Ctrl-C handler, as a user's foreground process has it: a shell that starts
    the tests in the background (`nohup ... &`) makes them ignore SIGINT, and Python then
    never installs it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def client_for(root: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def runs_in(root: Path, experiment: str, stage: str | None = None) -> list:
    """The runs of `experiment` (of one `stage`, if given) in root/mlflow.db, oldest first."""
    client = client_for(root)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"]) if found else []
    return [run for run in runs if stage is None or run.data.tags.get("pipeline.stage") == stage]


@pytest.mark.parametrize(
    "error, status",
    [("ValueError", "FAILED"), ("UserError", "FAILED"), ("KeyboardInterrupt", "KILLED"), ("Killed", "KILLED")],
)
def test_a_stage_that_raises_ends_failed_and_a_kill_ends_killed(embedded_store, error, status):
    from pipeline.errors import Killed, UserError
    from pipeline.tracking import stage_run

    exception = {"ValueError": ValueError, "UserError": UserError,
                 "KeyboardInterrupt": KeyboardInterrupt, "Killed": Killed}[error]
    with pytest.raises(exception):
        with stage_run("train_baseline", {"seed": 1}, [], "reliability"):
            raise exception("boom")
    (run,) = runs_in(embedded_store, "reliability")
    assert run.info.status == status
    assert run.info.end_time is not None


def test_runs_left_running_by_a_dead_process_are_ended_killed(embedded_store):
    import mlflow

    from pipeline.tracking import stage_run, use_experiment

    use_experiment("reliability")
    client = mlflow.MlflowClient()
    experiment_id = client.get_experiment_by_name("reliability").experiment_id
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    orphan = client.create_run(experiment_id, tags={"pipeline.host": host, "pipeline.pid": str(dead.pid)})
    alive = client.create_run(experiment_id, tags={"pipeline.host": host, "pipeline.pid": str(os.getpid())})
    elsewhere = client.create_run(experiment_id, tags={"pipeline.host": host + "-other", "pipeline.pid": str(dead.pid)})
    with stage_run("evaluate", {}, [], "reliability"):
        pass
    status = {run.info.run_id: run.info.status for run in client.search_runs([experiment_id])}
    assert status[orphan.info.run_id] == "KILLED"
    assert client.get_run(orphan.info.run_id).data.tags["pipeline.ended_by"]
    assert status[alive.info.run_id] == "RUNNING", "a live process's run is left alone"
    assert status[elsewhere.info.run_id] == "RUNNING", "another host's run is left alone"
    for run in (alive, elsewhere):
        client.set_terminated(run.info.run_id)


def test_a_signal_while_the_run_ends_waits_until_it_has_ended(embedded_store, monkeypatch):
    import mlflow

    from pipeline.tracking import stage_run

    real_end_run = mlflow.end_run

    def end_run_interrupted(status="FINISHED"):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again, while the run is being ended
        time.sleep(0.05)
        real_end_run(status)

    monkeypatch.setattr(mlflow, "end_run", end_run_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with stage_run("train_baseline", {}, [], "reliability"):
            raise ValueError("boom")
    (run,) = runs_in(embedded_store, "reliability")
    assert run.info.status == "FAILED"


def _log_from_a_fresh_process(root: str, index: int) -> str:
    """Child process body: one stage run with a few metrics in a shared, new store."""
    import mlflow

    from pipeline.tracking import stage_run

    os.chdir(root)
    try:
        with stage_run(f"stage{index}", {"index": index}, [], "together"):
            for step in range(10):
                mlflow.log_metric("m", step, step=step)
    except Exception as exc:  # the parent reports it
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def test_processes_that_start_together_share_a_new_sqlite_store(tmp_path, monkeypatch):
    """Without the lock in use_experiment, MLflow's table creation races ('no such
    constraint', 'database is locked', failed migrations)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset-by-this-test")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.starmap(_log_from_a_fresh_process, [(str(tmp_path), i) for i in range(4)])
    assert results == ["ok"] * 4
    runs = runs_in(tmp_path, "together")
    assert sorted(run.info.status for run in runs) == ["FINISHED"] * 4
    import sqlite3

    with sqlite3.connect(tmp_path / "mlflow.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_an_unreachable_tracking_server_is_one_line_in_seconds(embedded_store, monkeypatch):
    from pipeline.errors import UserError
    from pipeline.tracking import stage_run

    url = dead_url()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    started = time.monotonic()
    with pytest.raises(UserError, match="tracking server unreachable") as caught:
        with stage_run("train_baseline", {}, [], "reliability"):
            pytest.fail("the stage must not start")
    assert time.monotonic() - started < 10
    assert url in str(caught.value) and "\n" not in str(caught.value)


def write_tiny_mnist_project(root: Path, epochs: int = 2) -> None:
    """params.yaml (tiny baseline) and a tiny data/prepared/mnist.npz, for in-process stages."""
    params = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())
    params["mlflow"]["experiment"] = "reliability"
    params["baseline"].update(conv_filters=[4], dense_units=8, epochs=epochs, batch_size=8)
    write_yaml(root / "params.yaml", params)
    (root / "data/prepared").mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = ("train", "validation", "test")
    arrays = {f"x_{s}": rng.uniform(0, 1, (20, 28, 28, 1)).astype("float32") for s in splits}
    arrays.update({f"y_{s}": np.eye(10, dtype="float32")[np.arange(20) % 10] for s in splits})
    np.savez(root / "data/prepared/mnist.npz", **arrays)


def run_cli(monkeypatch, *args: str) -> int:
    """`pipeline ARGS` in this process (TensorFlow is already imported): its exit status."""
    from pipeline import cli

    monkeypatch.setattr(sys, "argv", ["pipeline", *args])
    previous = signal.getsignal(signal.SIGTERM)  # main() installs its own
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return exit_info.value.code


def test_the_cli_stops_a_stage_on_an_unreachable_server_before_training(embedded_store, monkeypatch, capsys):
    """`pipeline train-baseline` with a dead MLFLOW_TRACKING_URI."""
    write_tiny_mnist_project(embedded_store)
    url = dead_url()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    started = time.monotonic()
    status = run_cli(monkeypatch, "train-baseline")
    out, err = capsys.readouterr()
    assert status == 2
    assert err.strip().splitlines() == [
        f"error: MLFLOW_TRACKING_URI={url}: tracking server unreachable (Connection refused); "
        "start it, or unset MLFLOW_TRACKING_URI to use the local mlflow.db"
    ]
    assert "Epoch" not in out
    assert time.monotonic() - started < 30, "MLflow's retries were cut short"
    assert not any((embedded_store / folder).exists() for folder in ("models", "metrics", "plots", "mlflow.db"))


def test_ctrl_c_in_training_ends_the_run_killed_exits_130_and_keeps_the_previous_outputs(
    embedded_store, monkeypatch, capsys
):
    """A real SIGINT (Ctrl-C, `dvc queue kill`) to `pipeline train-baseline`, in this process
    for speed, once the first epoch is logged; the SIGTERM test below kills a subprocess."""
    from pipeline.epoch_logger import EpochLogger

    write_tiny_mnist_project(embedded_store, epochs=5)
    previous = {"models/baseline.keras": b"earlier model", "metrics/baseline.json": b'{"earlier": 1}\n',
                "plots/baseline/history.csv": b"epoch\n1\n"}
    for name, content in previous.items():
        (embedded_store / name).parent.mkdir(parents=True, exist_ok=True)
        (embedded_store / name).write_bytes(content)

    def on_epoch_end(self, epoch, logs=None, _real=EpochLogger.on_epoch_end):
        _real(self, epoch, logs)
        if epoch == 0:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the KeyboardInterrupt is raised here

    monkeypatch.setattr(EpochLogger, "on_epoch_end", on_epoch_end)
    status = run_cli(monkeypatch, "train-baseline")
    assert status == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    (run,) = runs_in(embedded_store, "reliability")
    assert run.info.status == "KILLED"
    assert [m.step for m in client_for(embedded_store).get_metric_history(run.info.run_id, "val_loss")] == [0]
    for name, content in previous.items():
        assert (embedded_store / name).read_bytes() == content, "a killed run leaves the previous outputs"
    assert not temp_leftovers(embedded_store)


@pytest.mark.parametrize("directory", [False, True])
@pytest.mark.parametrize("interruption", ["KeyboardInterrupt", "Killed"])
def test_a_killed_write_leaves_the_previous_output(tmp_path, directory, interruption):
    from pipeline.errors import Killed
    from pipeline.files import atomic_path

    exception = Killed if interruption == "Killed" else KeyboardInterrupt
    target = tmp_path / ("plots" if directory else "metrics.json")

    def file_in(path: Path) -> Path:  # the file itself, or one file of the folder
        return path / "history.csv" if directory else path

    with atomic_path(target, directory=directory) as temp:
        file_in(temp).write_text("old")
    with pytest.raises(exception):
        with atomic_path(target, directory=directory) as temp:
            file_in(temp).write_text("half")
            raise exception("signal 15")
    assert file_in(target).read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == [target.name], "no temporary file is left"


def test_a_signal_during_the_swap_of_a_folder_is_held_until_both_renames_are_done(tmp_path, monkeypatch):
    from pipeline import files
    from pipeline.errors import Killed, signals_handled
    from pipeline.files import atomic_path

    target = tmp_path / "plots"
    with atomic_path(target, directory=True) as temp:
        (temp / "a.csv").write_text("old")
    real_replace = os.replace
    calls = []

    def replace_then_sigterm(source, destination):
        real_replace(source, destination)
        calls.append(destination)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)

    monkeypatch.setattr(files.os, "replace", replace_then_sigterm)
    with signals_handled(), pytest.raises(Killed):
        with atomic_path(target, directory=True) as temp:
            (temp / "a.csv").write_text("new")
    assert len(calls) == 2, "the signal waited for the second rename"
    assert (target / "a.csv").read_text() == "new"


# Bad input at the stage level: one clear error, and nothing at all in data/


def write_stage_params(root: Path, **sections: dict) -> Path:
    params = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())
    for name, values in sections.items():
        params[name].update(values)
    write_yaml(root / "params.yaml", params)
    return root / "params.yaml"


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def photo_archive(tmp_path: Path, case: str) -> tuple[str, str | None]:
    """(images.url, images.sha256) for one kind of bad archive."""
    import hashlib
    import zipfile

    from conftest import write_photo_zip

    archive = tmp_path / "photos.zip"
    write_photo_zip(archive, per_class=2, size=16)
    if case == "unsafe-member":
        with zipfile.ZipFile(archive, "a") as zf:
            zf.writestr("../evil.jpg", b"outside the destination")
    if case == "truncated":
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    if case == "no-decodable-dog":
        with zipfile.ZipFile(archive) as zf:
            members = {name: zf.read(name) for name in zf.namelist()}
        with zipfile.ZipFile(archive, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data[:40] if "/Dog/" in name else data)
    if case == "unreachable":
        return dead_url() + "photos.zip", None
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    return str(archive), ("0" * 64 if case == "wrong-sha256" else digest)


@pytest.mark.parametrize(
    "case, message",
    [
        ("unsafe-member", "member '../evil.jpg' has a '..' path component; refusing to extract"),
        ("wrong-sha256", "images.sha256 expects 000000000000..."),
        ("truncated", "not a zip or tar archive, or is truncated: check images.url"),
        ("no-decodable-dog", "images.url: class folder(s) Dog hold no decodable image"),
        ("unreachable", "connection refused; check the URL or use a local copy"),
    ],
)
def test_download_images_refuses_a_bad_archive_and_writes_nothing(workdir, tmp_path, case, message):
    from pipeline.errors import UserError
    from pipeline.stages import download_images

    url, sha256 = photo_archive(tmp_path, case)
    params = write_stage_params(workdir, images={"url": url, "sha256": sha256})
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        download_images.run(params)
    assert "\n" not in str(caught.value) and ".scratch" not in str(caught.value)
    assert files_under(workdir / "data") == [], "no photo, no report, no temporary file"
    assert not list(tmp_path.rglob("evil.jpg"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("not-vgg16", "does not hold VGG16 notop weights"),
        ("garbage", "does not hold VGG16 notop weights"),
        ("wrong-sha256", "vgg16.weights_sha256 expects 000000000000..."),
        ("imagenet-md5", ", Keras publishes 6d6bbae143d832006294945121d1f1fc"),
        ("unreachable", "connection refused; check it, or give a URL or local path"),
    ],
)
def test_download_weights_refuses_a_wrong_file_and_writes_nothing(workdir, tmp_path, monkeypatch, case, message):
    import hashlib

    import keras

    from pipeline.errors import UserError
    from pipeline.stages import download_weights

    weights = tmp_path / "weights.h5"
    if case == "garbage":
        weights.write_bytes(b"<html>not an HDF5 file</html>")
    else:
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(weights)
    location = dead_url() + "vgg16.h5" if case == "unreachable" else str(weights)
    if case == "imagenet-md5":  # `weights: imagenet` fetches Keras' release: here, a wrong file
        monkeypatch.setattr(download_weights, "IMAGENET_URL", location)
        location = "imagenet"
    sha256 = "0" * 64 if case == "wrong-sha256" else hashlib.sha256(weights.read_bytes()).hexdigest()
    params = write_stage_params(workdir, vgg16={"weights": location, "weights_sha256": sha256})
    with pytest.raises(UserError, match=re.escape(message)):
        download_weights.run(params)
    assert files_under(workdir / "data") == []


def test_a_baseline_that_shrinks_the_digit_to_nothing_is_a_user_error():
    from pipeline.errors import UserError
    from pipeline.models.baseline import build_baseline
    from pipeline.params import BaselineParams

    shipped = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())["baseline"]
    p = BaselineParams(**{**shipped, "conv_filters": [4, 4, 4, 4], "kernel_size": 5, "padding": "valid"})
    with pytest.raises(UserError, match="baseline: conv_filters/kernel_size/strides/padding/pool_size shrink"):
        build_baseline((28, 28, 1), 10, p)


def _tiny_training(epochs: int, dropout: float, interrupt_at: int | None, monkeypatch, tf_data: bool = False,
                   learning_rate: float = 0.01, patience: int = 2):
    """Seeded tiny baseline fitted inside a stage_run; returns (FitResult, weights, run id)."""
    from pipeline.models.baseline import build_baseline, make_optimizer
    from pipeline.params import BaselineParams
    from pipeline.stages.common import fit, seed_everything
    from pipeline.epoch_logger import EpochLogger
    from pipeline.tracking import stage_run

    shipped = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())["baseline"]
    p = BaselineParams(**{**shipped, "conv_filters": [4], "dense_units": 8, "dropout": dropout,
                          "learning_rate": learning_rate, "lr_schedule": "cosine", "batch_size": 16,
                          "epochs": epochs, "early_stopping_patience": patience})
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (96, 12, 12, 1)).astype("float32")
    y = np.eye(3, dtype="float32")[np.arange(96) % 3]
    x[np.arange(96), 2 + 3 * (np.arange(96) % 3), 2:10, 0] = 1.0  # a learnable bar per class
    seed_everything(7)
    model = build_baseline((12, 12, 1), 3, p)
    optimizer = make_optimizer(p.optimizer, p.learning_rate, p.lr_schedule, 4 * epochs)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"])
    with monkeypatch.context() as patch:
        if interrupt_at is not None:
            def on_epoch_begin(self, epoch, logs=None, _real=EpochLogger.on_epoch_begin):
                if epoch == interrupt_at:
                    raise KeyboardInterrupt
                _real(self, epoch, logs)

            patch.setattr(EpochLogger, "on_epoch_begin", on_epoch_begin)
        with stage_run("train_baseline", {"baseline": p.model_dump()}, [], "resume") as run:
            result = fit(model, (x[:64], y[:64]), (x[64:], y[64:]), p.epochs, p.batch_size,
                         p.early_stopping_patience, tf_data=tf_data)
    return result, [np.asarray(w) for w in model.get_weights()], run.info.run_id


@pytest.mark.parametrize("tf_data", [False, True], ids=["arrays", "tf_data"])
def test_a_resumed_training_equals_an_uninterrupted_one(embedded_store, monkeypatch, tf_data):
    """Dropout, a cosine learning-rate schedule, early stopping and (tf_data) reshuffling
    epochs: the resumed run still has every number of the uninterrupted one, bit for bit."""
    from pipeline.resume import RESUME_ROOT, discard

    def train(dropout: float, interrupt_at: int | None = None):
        return _tiny_training(6, dropout, interrupt_at, monkeypatch, tf_data)

    # A kill with other params leaves a backup that must never be restored...
    with pytest.raises(KeyboardInterrupt):
        train(dropout=0.25, interrupt_at=2)
    assert len(list((RESUME_ROOT / "train_baseline").iterdir())) == 1
    # ...so this run starts from scratch (and deletes it): the reference.
    full, full_weights, full_id = train(dropout=0.5)
    discard("train_baseline")  # as publish_training does once the outputs are written
    with pytest.raises(KeyboardInterrupt):
        train(dropout=0.5, interrupt_at=2)
    (backup,) = (RESUME_ROOT / "train_baseline").iterdir()
    assert [p.name for p in backup.iterdir()] == ["epoch-0002"]
    with pytest.raises(KeyboardInterrupt):  # killed again, after resuming
        train(dropout=0.5, interrupt_at=4)
    assert [p.name for p in backup.iterdir()] == ["epoch-0004"]
    resumed, resumed_weights, resumed_id = train(dropout=0.5)

    columns = [c for c in full.history.columns if c != "epoch_seconds"]
    assert len(resumed.history) == len(full.history)
    assert resumed.history[columns].equals(full.history[columns]), "every epoch, bit for bit"
    assert all(np.array_equal(a, b) for a, b in zip(full_weights, resumed_weights))
    assert resumed.resume_stage == "train_baseline"

    client = client_for(embedded_store)
    full_run, resumed_run = client.get_run(full_id), client.get_run(resumed_id)
    assert "resumed_after_epoch" not in full_run.data.tags
    assert resumed_run.data.tags["resumed_after_epoch"] == "4"
    for name in ("val_loss", "accuracy", "epoch_seconds"):
        steps = [m.step for m in client.get_metric_history(resumed_id, name)]
        assert sorted(steps) == list(range(len(full.history))), name
    values = {m.step: m.value for m in client.get_metric_history(resumed_id, "val_loss")}
    assert [values[s] for s in sorted(values)] == list(resumed.history["val_loss"])
    statuses = [run.info.status for run in runs_in(embedded_store, "resume")]
    assert statuses == ["KILLED", "FINISHED", "KILLED", "KILLED", "FINISHED"]


def test_a_resumed_training_stops_early_where_an_uninterrupted_one_does(embedded_store, monkeypatch):
    """Early stopping's best loss, patience count and best weights survive the kill: without
    them the resumed run would count patience afresh and keep the last weights."""
    from pipeline.resume import discard

    def train(interrupt_at: int | None = None):
        return _tiny_training(6, 0.5, interrupt_at, monkeypatch, learning_rate=0.05, patience=1)

    full, full_weights, _ = train()
    assert len(full.history) == 2, "val_loss rises at epoch 2: early stopping ends the run there"
    discard("train_baseline")
    with pytest.raises(KeyboardInterrupt):
        train(interrupt_at=1)
    resumed, resumed_weights, _ = train()
    columns = [c for c in full.history.columns if c != "epoch_seconds"]
    assert resumed.history[columns].equals(full.history[columns])
    assert all(np.array_equal(a, b) for a, b in zip(full_weights, resumed_weights)), "the best epoch's weights"


# --------------------------------------------------------------------------------------
# Subprocesses on one tiny git+DVC project
# --------------------------------------------------------------------------------------


def write_yaml(path: Path, data: dict) -> None:
    yaml = YAML()
    yaml.default_flow_style = False
    with path.open("w") as handle:
        yaml.dump(data, handle)


def command_env(tracking_uri: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def sh(args: list[str], cwd: Path, check: bool = True, tracking_uri: str | None = None,
       timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=command_env(tracking_uri), capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def wait_for(condition, what: str, timeout: float = 120, process: subprocess.Popen | None = None,
             interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the process ended ({process.returncode}) before {what}:\n{out}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_numbers(root: Path) -> dict:
    """metrics/baseline.json and plots/baseline/history.csv without timings and run ids."""
    import pandas as pd

    metrics = json.loads((root / "metrics/baseline.json").read_text())
    history = pd.read_csv(root / "plots/baseline/history.csv").drop(columns="epoch_seconds")
    return {"metrics": {k: v for k, v in metrics.items() if k not in TIMINGS},
            "history": history.to_dict("list")}


def temp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*") if ".dvc" not in p.parts and ".git" not in p.parts]


@pytest.fixture(scope="module")
def project(tmp_path_factory, request):
    """A git+DVC copy of the project, MNIST served from loopback, prepared (not trained);
    an `mlflow server` starting in the background for the server test."""
    import functools
    import http.server
    import threading

    from conftest import _QuietHandler

    base = tmp_path_factory.mktemp("reliability")
    files = write_mnist_mirror(base / "served" / "mnist", train=400, test=50)
    handler = functools.partial(_QuietHandler, directory=str(base / "served"))
    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    request.addfinalizer(http_server.shutdown)

    port = free_port()
    server_log = (base / "server.log").open("w")
    mlflow_server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{base / 'server.db'}",
         "--artifacts-destination", str(base / "server-artifacts")],
        cwd=base, env=command_env(), stdout=subprocess.DEVNULL, stderr=server_log,
        start_new_session=True,  # its own process group: the finalizer stops it and its workers
    )

    def stop_server() -> None:
        if mlflow_server.poll() is None:
            os.killpg(mlflow_server.pid, signal.SIGTERM)
            try:
                mlflow_server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(mlflow_server.pid, signal.SIGKILL)
                mlflow_server.wait()
        server_log.close()

    request.addfinalizer(stop_server)

    root = base / "project"
    root.mkdir()
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copy(REPO / ".gitignore", root)
    params = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())
    params["mnist"].update(mirrors=[f"http://127.0.0.1:{http_server.server_address[1]}/mnist/"],
                           files=files, validation_size=40, retries=0)
    params["baseline"].update(conv_filters=[4, 8], dense_units=16, epochs=EPOCHS, batch_size=16)
    params["mlflow"]["experiment"] = "tiny"
    write_yaml(root / "params.yaml", params)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    sh(["git", "init", "-q"], root)
    sh(["dvc", "init", "-q"], root)
    with (root / ".dvc/config").open("a") as config:  # `dvc config core.analytics false`, minus a start-up
        config.write("[core]\n    analytics = false\n")
    sh(["git", "add", "-A"], root)
    sh([*git, "commit", "-q", "-m", "project"], root)
    sh(["dvc", "repro", "prepare_mnist"], root)
    # Filled in by the tests, in order: the epoch the kill left, the resumed run's numbers
    # and dvc.lock, to compare with the second forced repro.
    return SimpleNamespace(root=root, base=base, server=f"http://127.0.0.1:{port}",
                           server_log=base / "server.log", killed_after=None, numbers={}, lock="")


def test_sigterm_in_training_ends_the_run_killed_exits_143_and_writes_nothing(project):
    """A real `kill` of `pipeline train-baseline` once an epoch is done: the next test resumes it."""
    root = project.root
    process = subprocess.Popen(["pipeline", "train-baseline"], cwd=root, env=command_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any((root / ".resume/train_baseline").glob("*/epoch-0001")), "the first epoch",
             timeout=300, process=process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "terminated" and "Traceback" not in err
    (run,) = runs_in(root, "tiny", stage="train_baseline")
    assert run.info.status == "KILLED"
    assert client_for(root).get_metric_history(run.info.run_id, "val_loss"), "epochs were logged"
    for folder in ("models", "metrics", "plots"):
        assert not (root / folder).exists(), "a run killed in training writes nothing"
    assert not temp_leftovers(root)
    (backup,) = (root / ".resume/train_baseline").iterdir()
    project.killed_after = int(sorted(backup.iterdir())[-1].name.removeprefix("epoch-"))
    assert 1 <= project.killed_after < EPOCHS


def test_the_killed_training_resumes_on_the_next_repro(project):
    """`dvc repro -f` (the first of two forced repros: the next test is the second)."""
    root = project.root
    result = sh(["dvc", "repro", "-f", "train_baseline"], root)
    done = project.killed_after
    assert f"train_baseline: resuming after epoch {done} of {EPOCHS}" in result.stdout
    numbers = model_numbers(root)
    assert numbers["history"]["epoch"] == list(range(1, EPOCHS + 1))
    assert numbers["metrics"]["epochs"] == EPOCHS
    assert not (root / ".resume").exists(), "the backup is deleted once the outputs are written"
    runs = [r for r in runs_in(root, "tiny") if r.data.tags["pipeline.stage"] == "train_baseline"]
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    resumed = runs[-1]
    assert resumed.data.tags["resumed_after_epoch"] == str(done)
    client = client_for(root)
    history = sorted(client.get_metric_history(resumed.info.run_id, "val_loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(EPOCHS))
    # history.csv holds 16 significant digits, MLflow the float itself
    assert [m.value for m in history] == pytest.approx(numbers["history"]["val_loss"], rel=1e-14)
    project.numbers["resumed"] = numbers
    project.lock = (root / "dvc.lock").read_text()


def test_a_second_forced_repro_logs_to_a_tracking_server_with_bit_identical_numbers(project):
    """Determinism: `dvc repro -f` again, logging to `mlflow server`, gives the same numbers
    as the first (itself resumed after a kill), and the same data, byte for byte."""
    import mlflow

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(project.server + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_for(healthy, f"mlflow server /health (log: {project.server_log})", timeout=180)
    root = project.root
    sh(["dvc", "repro", "-f", "train_baseline"], root, tracking_uri=project.server)
    numbers = model_numbers(root)
    assert numbers == project.numbers["resumed"], "accuracies, losses and every epoch, bit for bit"
    lock = (root / "dvc.lock").read_text()
    for stage in ("download_mnist", "prepare_mnist"):
        assert _lock_outs(lock, stage) == _lock_outs(project.lock, stage)

    client = mlflow.MlflowClient(tracking_uri=project.server)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    (run,) = [r for r in runs if r.data.tags["pipeline.stage"] == "train_baseline"]
    assert run.info.status == "FINISHED"
    assert {r.info.status for r in runs} == {"FINISHED"}, "the upstream stages' runs too"
    assert run.data.metrics["test_accuracy"] == numbers["metrics"]["test_accuracy"]
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == EPOCHS
    assert {"plots", "model_summary_saved.txt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert any((project.base / "server-artifacts").rglob("history.csv")), "artifacts went through the server"
    assert json.loads((root / "metrics/baseline.json").read_text())["mlflow_run_id"] == run.info.run_id


def _lock_outs(lock_text: str, stage: str) -> list:
    return YAML(typ="safe", pure=True).load(lock_text)["stages"][stage]["outs"]


def test_three_queued_experiments_two_at_a_time_share_the_sqlite_store(project):
    root = project.root
    names = ["rel-a", "rel-b", "rel-c"]
    for name, dropout in zip(names, (0.1, 0.2, 0.3)):
        sh(["dvc", "exp", "run", "train_baseline", "--queue", "-n", name, "-S", "baseline.epochs=1",
            "-S", f"baseline.dropout={dropout}"], root)
    def experiment_runs() -> list:
        return [r for r in runs_in(root, "tiny", stage="train_baseline") if r.data.tags.get("dvc.exp_name") in names]

    def ended() -> bool:  # a cheap look at the store first; `dvc queue status` costs a start-up
        if sum(r.info.status != "RUNNING" for r in experiment_runs()) < len(names):
            return False
        status = sh(["dvc", "queue", "status"], root).stdout
        return not any(word in status for word in ("Queued", "Running"))

    try:
        sh(["dvc", "queue", "start", "-j", "2"], root)
        wait_for(ended, "the three experiments", timeout=400, interval=1.0)
    finally:
        sh(["dvc", "queue", "stop"], root, check=False)
    status = sh(["dvc", "queue", "status"], root).stdout
    if status.count("Success") != 3:
        logs = "\n".join(sh(["dvc", "queue", "logs", name], root, check=False).stdout for name in names)
        pytest.fail(f"{status}\n{logs[-4000:]}")
    runs = experiment_runs()
    assert sorted(r.data.tags["dvc.exp_name"] for r in runs) == names, "one train_baseline run each"
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.params["baseline.dropout"] for r in runs) == ["0.1", "0.2", "0.3"]
    # Nothing was lost to a locked database (MLflow's Keras callback only warns on errors).
    client = client_for(root)
    for run in runs:
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 1
        assert {"test_accuracy", "test_loss", "seconds_per_epoch"} <= run.data.metrics.keys()
    assert not (root / ".dvc/tmp/exps/mlflow.db").exists(), "the runs went to the main project's store"
    # The sweep, as a user compares it: one row per experiment, its dropout and its accuracy.
    table = json.loads(sh(["pipeline", "compare", "--stage", "train_baseline", "-p", "baseline.dropout",
                           "--sort", "baseline.dropout", "--ascending", "-f", "json"], root).stdout)
    swept = [row for row in table if row["dvc_exp"] in names]
    assert [(row["dvc_exp"], row["baseline.dropout"]) for row in swept] == list(zip(names, [0.1, 0.2, 0.3]))
    accuracies = {r.data.tags["dvc.exp_name"]: r.data.metrics["test_accuracy"] for r in runs}
    assert [row["test_accuracy"] for row in swept] == [accuracies[name] for name in names]

