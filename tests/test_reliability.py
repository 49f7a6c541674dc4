"""Reliability, in this process on tiny models: failures and kills end MLflow runs honestly,
a killed training resumes exactly, outputs are atomic, bad archives and weights write
nothing, and a dead tracking server is one line. (Kills of real `dvc repro` process groups:
test_kills.py; queued experiments sharing the store: test_pipeline.py's README test.)
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ruamel.yaml import YAML

from conftest import REPO, client_for, dead_url, runs_in, temp_leftovers, write_yaml


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

    import mlflow
    from mlflow.store.tracking.abstract_store import AbstractStore

    in_store_as_epoch_ended = []

    def on_epoch_end(self, epoch, logs=None, _real=EpochLogger.on_epoch_end):
        _real(self, epoch, logs)
        run_id = mlflow.active_run().info.run_id
        in_store_as_epoch_ended.append([m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val_loss")])
        if epoch == 0:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the KeyboardInterrupt is raised here

    def queued(*args, **kwargs):
        raise AssertionError("epoch metrics go to MLflow's async queue: the run's end waits for its thread")

    monkeypatch.setattr(EpochLogger, "on_epoch_end", on_epoch_end)
    monkeypatch.setattr(AbstractStore, "log_batch_async", queued)
    status = run_cli(monkeypatch, "train-baseline")
    assert status == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    (run,) = runs_in(embedded_store, "reliability")
    assert run.info.status == "KILLED"
    assert [m.step for m in client_for(embedded_store).get_metric_history(run.info.run_id, "val_loss")] == [0]
    assert in_store_as_epoch_ended == [[0]], "an epoch's metrics are in the store as it ends"
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


def test_a_sigterm_swallowed_by_a_weakref_callback_is_raised_at_the_next_check_without_a_traceback(
    capsys, monkeypatch
):
    """What test_kills.py caught once in 21 kills: the signal landed in an import's module-lock
    callback (a weakref callback), where Python swallows any exception and prints it. The
    record makes the next check raise it, and nothing is printed."""
    import weakref

    from pipeline.errors import Killed, raise_if_signalled, signals_handled

    class Thing:
        pass

    def callback(_):  # the signal arrives while this runs
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)

    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # Python's, which prints (not pytest's)
    with signals_handled():
        thing = Thing()
        reference = weakref.ref(thing, callback)
        del thing  # the callback runs here; its Killed is swallowed
        assert reference() is None
        with pytest.raises(Killed):
            raise_if_signalled()
    assert "Traceback" not in capsys.readouterr().err
    raise_if_signalled()  # the record ends with the block


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
    from pipeline.models.baseline import build_baseline
    from pipeline.models.optimizer import make_optimizer
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
                         p.early_stopping_patience, tf_data=tf_data, run=run)
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
    assert resumed.resumed_after == 4

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
