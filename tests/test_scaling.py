"""Scaling out with configuration only: a shared MLflow server on PostgreSQL, a DVC remote,
and tf.distribute strategies on the CPU.

One tiny git+DVC project (the MNIST stages only) is built per module and reproduced once,
logging to an `mlflow server` backed by a real PostgreSQL when one can be started here (else
to the embedded SQLite store, and the server test is skipped with the reason). Its outputs
are pushed to a local-directory DVC remote, which a fresh clone pulls.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import BIN, REPO, free_port, git_dvc_project, run_command, shipped_params, write_mnist_mirror, write_yaml
from tiny_project import write_data

MNIST_STAGES = ("download_mnist", "prepare_mnist", "train_baseline")
EXPERIMENT = "scaling"


# -- a real PostgreSQL and an MLflow server on it -----------------------------------------

def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL programs (not on PATH), or of any initdb on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def as_postgres(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """postgresql+psycopg2://... of a throw-away cluster on a free loopback port, with a `mlflow` db."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))  # in /tmp: pytest's tmp is root-only
    data, port = folder / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    try:
        steps = [
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "60", "-o",
             f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
            [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"],
        ]
        for step in steps:
            result = subprocess.run(as_postgres(step), capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                log = (folder / "log").read_text() if (folder / "log").exists() else ""
                pytest.skip(f"PostgreSQL could not start ({Path(step[0]).name}): "
                            f"{(result.stderr or log).strip()[-300:]}")
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3: name the driver we install.
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
                           capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres: str, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(http://127.0.0.1:PORT, artifact folder) of `mlflow server` on PostgreSQL."""
    artifacts = tmp_path_factory.mktemp("artifact-store")
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", postgres,
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"mlflow server did not start:\n{server.communicate()[1][-2000:]}")
            time.sleep(0.5)
        yield url, artifacts
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def tracking(request) -> tuple[str | None, Path | None, str]:
    """(server URL, artifact folder, "") when PostgreSQL works here, else (None, None, why)."""
    try:
        url, artifacts = request.getfixturevalue("mlflow_server")
    except pytest.skip.Exception as skipped:
        return None, None, str(skipped)
    return url, artifacts, ""


# -- the tiny project: MNIST stages, a DVC remote --------------------------------------------

def mnist_dvc_yaml() -> dict:
    """The repository's dvc.yaml with only the MNIST stages and their plots."""
    pipeline = YAML(typ="safe", pure=True).load((REPO / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in MNIST_STAGES}
    pipeline["plots"] = [plot for plot in pipeline.get("plots", []) if "baseline" in json.dumps(plot)]
    return pipeline


def tiny_params(mirror: Path, files: dict) -> dict:
    params = shipped_params()
    params["mlflow"]["experiment"] = EXPERIMENT
    params["mnist"].update(mirrors=[str(mirror)], files=files, validation_size=20, retries=0)
    params["baseline"].update(conv_filters=[4, 8], dense_units=16, epochs=1, batch_size=32)
    # The stage itself goes through the scaling knobs: a MirroredStrategy (over this CPU),
    # a tf.data input pipeline and single-threaded ops.
    params["train"] = {"distribute": "mirrored", "tf_data": True, "intra_op_threads": 1, "inter_op_threads": 1}
    return params


@pytest.fixture(scope="module")
def project(tmp_path_factory, tracking) -> dict:
    """A git+DVC project with a local-directory remote; `dvc repro`, committed, `dvc push`."""
    base = tmp_path_factory.mktemp("scaling")
    files = write_mnist_mirror(base / "mirror" / "mnist", train=120, test=30)
    root, remote = base / "project", base / "remote"
    git_dvc_project(root, tiny_params(base / "mirror" / "mnist", files), dvc_yaml=mnist_dvc_yaml())
    run_command(["dvc", "remote", "add", "-d", "shared", str(remote)], root)
    run_command(["git", "commit", "-q", "-am", "remote"], root)
    url, artifacts, why = tracking
    repro = run_command(["dvc", "repro"], root, tracking_uri=url)
    run_command(["git", "add", "-A"], root)
    run_command(["git", "commit", "-q", "-m", "repro"], root)
    run_command(["dvc", "push"], root)
    return {"root": root, "base": base, "repro": repro, "url": url, "artifacts": artifacts, "why": why}


def test_runs_go_to_the_shared_server_on_postgresql(project):
    """MLFLOW_TRACKING_URI alone moves every run, metric and model to the server."""
    import mlflow

    if project["url"] is None:
        pytest.skip(project["why"])
    root = project["root"]
    client = mlflow.MlflowClient(tracking_uri=project["url"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'train_baseline'")
    assert len(runs) == 1
    run_ = runs[0]
    assert run_.info.status == "FINISHED"
    assert run_.data.params["train.distribute"] == "mirrored"
    written = json.loads((root / "metrics/baseline.json").read_text())
    assert run_.info.run_id == written["mlflow_run_id"]
    assert run_.data.metrics["test_accuracy"] == written["test_accuracy"]
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "val_loss")] == [0]
    assert "plots" in {a.path for a in client.list_artifacts(run_.info.run_id)}
    models = client.search_logged_models([experiment.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == run_.info.run_id
    # The model comes back through the server's artifact proxy, from its artifact store.
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=models[0].artifact_location, dst_path=str(project["base"] / "downloaded"),
        tracking_uri=project["url"])
    assert (Path(local) / "MLmodel").is_file()
    assert list(project["artifacts"].rglob("MLmodel")), "artifacts are in the server's store"
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()


def test_a_fresh_clone_pulls_every_output_and_has_nothing_to_run(project):
    root, clone = project["root"], project["base"] / "clone"
    run_command(["git", "clone", "-q", str(root), str(clone)], project["base"])
    assert not (clone / "models").exists()
    run_command(["dvc", "pull"], clone)
    for path in ("data/raw/mnist/train_images.idx", "data/prepared/mnist.npz", "models/baseline.keras"):
        assert (clone / path).read_bytes() == (root / path).read_bytes(), path
    assert "up to date" in run_command(["dvc", "status"], clone).stdout
    repro = run_command(["dvc", "repro"], clone)
    assert "Running stage" not in repro.stdout, repro.stdout
    for stage in MNIST_STAGES:
        assert f"'{stage}' didn't change" in repro.stdout, repro.stdout


# -- tf.distribute on the CPU ------------------------------------------------------------------

TRAIN_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from pipeline.params import load_params
    from pipeline.stages.common import distribution_scope, seed_everything, set_threads
    from pipeline.stages.train_baseline import train_baseline
    from pipeline.tracking import stage_run

    settings, logical_cpus = json.loads(sys.argv[1]), int(sys.argv[2])
    params = load_params()
    params = params.model_copy(update={
        "train": params.train.model_copy(update=settings),
        "baseline": params.baseline.model_copy(update={"conv_filters": [4], "dense_units": 8,
                                                       "epochs": 1, "batch_size": 4}),
    })
    set_threads(params.train)
    if logical_cpus > 1:  # must happen before TensorFlow starts, hence this fresh process
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
    distribution = distribution_scope(params.train)
    seed_everything(params.seed)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 20), ("validation", 8), ("test", 8)):
        arrays[f"x_{split}"] = rng.uniform(0, 1, (count, 28, 28, 1)).astype(np.float32)
        arrays[f"y_{split}"] = np.eye(10, dtype=np.float32)[np.arange(count) % 10]
    with stage_run("train_baseline", {}, [], "distribute"):
        trained = train_baseline(arrays, params, distribution)
    import tensorflow as tf
    print(json.dumps({
        "replicas": distribution.replicas,
        "steps": int(trained.model.optimizer.iterations.numpy()),
        "loss": trained.fit.history["loss"].tolist(),
        "test_accuracy": trained.test_accuracy,
        "threads": [tf.config.threading.get_intra_op_parallelism_threads(),
                    tf.config.threading.get_inter_op_parallelism_threads()],
    }))
""")


def train_tiny(tmp_path: Path, settings: dict, logical_cpus: int = 1) -> dict:
    """Train the baseline for one epoch on 20 digits in a fresh process; what it reports."""
    shutil.copy(REPO / "params.yaml", tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_command([sys.executable, "-c", TRAIN_SCRIPT, json.dumps(settings), str(logical_cpus)],
                 tmp_path, tracking_uri=uri, timeout=300)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_mirrored_strategy_over_two_logical_cpus_scales_the_global_batch(tmp_path):
    report = train_tiny(tmp_path, {"distribute": "mirrored", "tf_data": True,
                                   "intra_op_threads": 1, "inter_op_threads": 1}, logical_cpus=2)
    assert report["replicas"] == 2
    assert report["steps"] == 3, "20 digits in global batches of 4 x 2 replicas"
    assert report["threads"] == [1, 1]
    assert len(report["loss"]) == 1 and report["loss"][0] == report["loss"][0]  # one finite epoch
    assert 0.0 <= report["test_accuracy"] <= 1.0




MULTI_WORKER_SCRIPT = textwrap.dedent("""
    import numpy as np, tensorflow as tf, keras
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile("sgd", "mse")
    model.fit(np.ones((16, 4), np.float32), np.ones((16, 2), np.float32), batch_size=8, verbose=0)
    print("trained")
""")


def test_plain_keras_still_fails_under_multi_worker_so_our_fix_stays(tmp_path):
    """keras-team/keras#20585: two workers on loopback, plain Keras, no fix: fit fails. When
    this starts failing, Keras trains multi-worker by itself and keras_internals.fix_multi_worker_fit can go."""
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    workers = [subprocess.Popen(
        [sys.executable, "-c", MULTI_WORKER_SCRIPT], cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})},
    ) for i in range(2)]
    outcomes = [worker.communicate(timeout=300) for worker in workers]
    assert [worker.returncode for worker in workers] == [1, 1], "Keras 3 trains multi-worker now?"
    assert all("PerReplica" in err for _, err in outcomes)


def mnist_project(root: Path, distribute: str, batch_size: int) -> Path:
    """A folder with params.yaml and tiny_project's data (20 training digits), for
    `pipeline train-baseline`: three epochs, no dropout (whose masks differ per replica)."""
    params = shipped_params()
    params["mlflow"]["experiment"] = "workers"
    params["baseline"].update(conv_filters=[4, 8], dense_units=16, epochs=3, batch_size=batch_size, dropout=0.0,
                              early_stopping_patience=0)
    params["train"] = {"distribute": distribute, "tf_data": True, "intra_op_threads": 1, "inter_op_threads": 1}
    write_data(root)
    write_yaml(root / "params.yaml", params)
    return root


def test_two_workers_train_what_one_process_trains_with_the_same_global_batch(tmp_path):
    """`pipeline train-baseline` on two workers (TF_CONFIG, loopback), 4 digits each per step,
    gives the losses of one process with batches of 8; only the chief keeps anything."""
    import mlflow
    import pandas as pd

    one = mnist_project(tmp_path / "one", "none", batch_size=8)
    shared = mnist_project(tmp_path / "shared", "multi_worker", batch_size=4)
    scratch = tmp_path / "scratch"  # the workers' TMPDIR: where the helper's throw-away folder goes
    scratch.mkdir()
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(scratch)}
    env.pop("MLFLOW_TRACKING_URI", None)
    workers = [subprocess.Popen(
        ["pipeline", "train-baseline"], cwd=shared, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**env, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})},
    ) for i in range(2)]
    alone_process = subprocess.Popen(["pipeline", "train-baseline"], cwd=one, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    backed_up, deadline = False, time.monotonic() + 300
    while any(process.poll() is None for process in workers) and time.monotonic() < deadline:
        # Epoch backups are off under multi_worker: .resume/ would otherwise stand for seconds,
        # from the first epoch's end until the outputs are written.
        backed_up = backed_up or (shared / ".resume").exists()
        time.sleep(0.05)
    outcomes = [worker.communicate(timeout=10) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outcomes
    assert not backed_up
    assert alone_process.wait(timeout=300) == 0, alone_process.stdout.read()
    assert "worker 1 of 2 (TF_CONFIG) trains in step with the chief" in outcomes[1][0]

    columns = ["loss", "accuracy", "val_loss", "val_accuracy"]
    alone = pd.read_csv(one / "plots/baseline/history.csv")[columns]
    together = pd.read_csv(shared / "plots/baseline/history.csv")[columns]
    assert len(together) == 3
    pd.testing.assert_frame_equal(together, alone, rtol=1e-5)
    metrics = {name: json.loads((root / "metrics/baseline.json").read_text()) for name, root in
               (("one", one), ("shared", shared))}
    assert metrics["shared"]["test_loss"] == pytest.approx(metrics["one"]["test_loss"], rel=1e-5)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{shared / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("workers").experiment_id])
    assert len(runs) == 1, "the chief's run only"
    assert runs[0].info.run_id == metrics["shared"]["mlflow_run_id"]
    assert runs[0].data.params["train.replicas"] == "2"
    assert runs[0].data.params["train.global_batch_size"] == "8"
    assert list(scratch.iterdir()) == [], "the helper's folder is gone"


@pytest.mark.parametrize("tf_config, message", [
    (None, "TF_CONFIG: not set; train.distribute: multi_worker needs it on every machine"),
    ("{cluster", "TF_CONFIG: not a cluster and task of this machine (JSONDecodeError"),
    ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG: not a cluster and task of this machine (KeyError: 'task')"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}',
     "TF_CONFIG: task worker 1 is not in the cluster's chief or worker list"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}',
     "TF_CONFIG: task ps 0 is not in the cluster's chief or worker list"),
])
def test_a_bad_tf_config_is_one_line_before_tensorflow_starts(tmp_path, monkeypatch, tf_config, message):
    from pipeline.errors import UserError
    from pipeline.params import load_params
    from pipeline.stages.common import start_training

    root = mnist_project(tmp_path, "multi_worker", batch_size=4)
    monkeypatch.chdir(root)
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(UserError) as caught:
        start_training(load_params(root / "params.yaml"), (Path("data/prepared/mnist.npz"), "prepare_mnist"))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert str(caught.value).endswith("(see README: More devices)")


def test_the_chief_is_the_chief_task_else_worker_0():
    from pipeline.multi_worker import Role, cluster_role

    def role(cluster, kind, index):
        return cluster_role({"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})})

    workers = {"worker": ["a:1", "b:1", "c:1"]}
    assert role(workers, "worker", 0) == Role(chief=True, task="worker 0", workers=3)
    assert role(workers, "worker", 2) == Role(chief=False, task="worker 2", workers=3)
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert role(with_chief, "chief", 0) == Role(chief=True, task="chief 0", workers=3)
    assert role(with_chief, "worker", 0) == Role(chief=False, task="worker 0", workers=3)
