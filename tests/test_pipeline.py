"""End to end: `dvc repro` on a tiny copy of the project, data served from loopback.

This is the one slow module (each stage is a process that imports TensorFlow), so one
project is built per module and the checks share it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import REPO, write_mnist_mirror, write_photo_zip, write_vgg16_weights

BIN = Path(sys.executable).parent
TRAINING_METRICS = {"test_accuracy", "test_loss", "epochs", "seconds_per_epoch"}


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def tiny_params(url: str, files: dict, weights_sha256: str) -> dict:
    yaml = YAML(typ="safe", pure=True)
    params = yaml.load((REPO / "params.yaml").read_text())
    params["mnist"].update(mirrors=[url + "/mnist/"], files=files, validation_size=20, retries=0)
    params["baseline"].update(conv_filters=[4, 8], dense_units=16, epochs=2, batch_size=32)
    params["images"].update(url=url + "/photos.zip", size=32,
                            per_class={"train": 2, "validation": 2, "test": 2})
    params["vgg16"].update(weights=url + "/vgg16.h5", weights_sha256=weights_sha256)
    params["head"].update(units=8, epochs=2, batch_size=2)
    params["finetune"].update(epochs=2, batch_size=2)
    params["mlflow"]["experiment"] = "tiny"
    return params


def write_yaml(path: Path, data: dict) -> None:
    yaml = YAML()
    yaml.default_flow_style = False
    with path.open("w") as handle:
        yaml.dump(data, handle)


@pytest.fixture(scope="module")
def project(tmp_path_factory, request):
    """A git+DVC copy of the project with tiny params; `dvc repro` already run once."""
    import functools
    import http.server
    import threading

    from conftest import _QuietHandler

    base = tmp_path_factory.mktemp("e2e")
    files = write_mnist_mirror(base / "served" / "mnist")
    write_photo_zip(base / "served" / "photos.zip")
    weights_sha256 = write_vgg16_weights(base / "served" / "vgg16.h5")
    handler = functools.partial(_QuietHandler, directory=str(base / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    request.addfinalizer(server.shutdown)

    root = base / "project"
    root.mkdir()
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copy(REPO / ".gitignore", root)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    write_yaml(root / "params.yaml", tiny_params(url, files, weights_sha256))
    run(["git", "init", "-q"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "config", "core.analytics", "false"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "project"], root)
    first = run(["dvc", "repro"], root)
    return root, first


def test_repro_writes_every_output(project):
    root, _ = project
    assert sorted(p.name for p in (root / "data/raw/mnist").iterdir()) == [
        "test_images.idx", "test_labels.idx", "train_images.idx", "train_labels.idx",
    ]
    assert (root / "data/prepared/mnist.npz").is_file()
    assert (root / "models/baseline.keras").is_file()
    metrics = json.loads((root / "metrics/baseline.json").read_text())
    assert TRAINING_METRICS <= metrics.keys()
    assert metrics["epochs"] == 2 and 0.0 <= metrics["test_accuracy"] <= 1.0
    history = (root / "plots/baseline/history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,") and len(history) == 3
    for name in ("kernels.png", "curves.png", "summary.txt"):
        assert (root / "plots/baseline" / name).stat().st_size > 0
    assert list((root / "plots/baseline").glob("activations_*.png"))


def test_photos_weights_features_and_vgg_models(project):
    import keras
    import numpy as np

    root, _ = project
    report = json.loads((root / "data/raw/images_report.json").read_text())
    assert report["kept"] == {"Cat": 6, "Dog": 6}
    assert report["skipped"] == 2
    assert sorted(p.name for p in (root / "data/raw/images").iterdir()) == ["Cat", "Dog"]
    with np.load(root / "data/prepared/images.npz") as data:
        assert data["x_train"].shape == (4, 32, 32, 3) and data["x_train"].dtype == np.uint8
        assert list(data["class_names"]) == ["Cat", "Dog"]
    frozen = np.load(root / "data/features/train_frozen.npy")
    # block4_pool of a 32 px photo (finetune.unfreeze: 3), for the 4 training photos and,
    # with features.mirror_train, their 4 mirror images after them
    assert frozen.shape == (8, 2, 2, 512)
    labels = np.load(root / "data/features/train_labels.npy")
    assert np.array_equal(labels[:4], labels[4:])
    assert np.load(root / "data/features/test_pooled.npy").shape == (4, 1, 1, 512)
    for stage, name in (("head", "head"), ("finetune", "finetune")):
        metrics = json.loads((root / f"metrics/{name}.json").read_text())
        assert TRAINING_METRICS <= metrics.keys() and metrics["epochs"] == 2
        assert (root / f"plots/{stage}/kernels_block1_conv1.png").stat().st_size > 0
    finetuned = keras.models.load_model(root / "models/finetuned.keras")
    with np.load(root / "data/prepared/images.npz") as data:
        probabilities = finetuned.predict(data["x_test"], verbose=0)
        labels = data["y_test"]
    assert probabilities.shape == (4, 1), "the saved model takes raw photos"
    accuracy = float(np.mean((probabilities[:, 0] > 0.5) == labels))
    assert abs(accuracy - json.loads((root / "metrics/finetune.json").read_text())["test_accuracy"]) < 1e-6


def test_evaluate_and_report(project):
    root, _ = project
    evaluation = json.loads((root / "metrics/evaluate.json").read_text())
    assert set(evaluation) >= {"baseline", "feature_extraction", "fine_tuning"}
    for model in ("baseline", "feature_extraction", "fine_tuning"):
        assert {"test_accuracy", "test_loss", "test_samples"} <= evaluation[model].keys()
    assert evaluation["baseline"]["test_samples"] == 50
    assert evaluation["fine_tuning"]["test_samples"] == 4
    finetune = json.loads((root / "metrics/finetune.json").read_text())
    assert abs(evaluation["fine_tuning"]["test_accuracy"] - finetune["test_accuracy"]) < 1e-6
    html = (root / "reports/report.html").read_text()
    assert "<table" in html and "data:image/png;base64," in html
    assert 'src="http' not in html and "src='http" not in html, "the report must open offline"
    markdown = (root / "reports/report.md").read_text()
    timings = markdown.split("## How long each stage took", 1)[1].split("\n## ", 1)[0]
    stages = YAML(typ="safe", pure=True).load((root / "dvc.yaml").read_text())["stages"]
    timed = {line.split("|")[1].strip() for line in timings.splitlines() if line.startswith("| ")}
    assert set(stages) - {"report"} <= timed, "every stage but the report itself has its wall time"


def test_runs_are_tracked_in_the_embedded_store(project):
    import mlflow

    root, _ = project
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    by_stage = {run.data.tags["pipeline.stage"]: run for run in runs}
    run = by_stage["train_baseline"]
    assert run.info.status == "FINISHED"
    assert run.data.params["baseline.dropout"] == "0.5"
    assert run.data.params["baseline.conv_filters"] == "[4, 8]"
    assert run.data.tags["git.dirty"] in ("true", "false")
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert len(run.data.tags["data.sha256"]) == 64 and len(run.data.tags["params.sha256"]) == 64
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert steps == [0, 1]
    assert run.data.metrics["test_accuracy"] == json.loads((root / "metrics/baseline.json").read_text())["test_accuracy"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "model_summary.txt"} <= artifacts
    assert client.search_logged_models([experiment.experiment_id]), "the model is logged"
    assert (root / "mlartifacts").is_dir()


def test_second_repro_does_nothing_and_a_param_change_reruns_only_downstream(project):
    root, _ = project
    again = run(["dvc", "repro"], root)
    assert "Running stage" not in again.stdout, again.stdout
    params = YAML(typ="safe", pure=True).load((root / "params.yaml").read_text())
    params["baseline"]["dropout"] = 0.25
    write_yaml(root / "params.yaml", params)
    # Reproduce up to train_baseline (its downstream, evaluate and report, would cost a minute
    # of the suite); DVC then reports evaluate and report as changed: they follow on the next repro.
    changed = run(["dvc", "repro", "train_baseline"], root)
    ran = {line.split("'")[1] for line in changed.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"train_baseline"}, ran
    status = run(["dvc", "status", "--json"], root)
    assert set(json.loads(status.stdout)) == {"evaluate", "report"}, status.stdout


def test_user_errors_are_one_line_and_exit_2(project):
    root, _ = project
    params = YAML(typ="safe", pure=True).load((root / "params.yaml").read_text())
    params["baseline"]["padding"] = "full"
    write_yaml(root / "bad.yaml", params)
    result = run(["pipeline", "train-baseline", "--params", "bad.yaml"], root, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: bad.yaml: baseline.padding: input should be 'valid' or 'same' (got 'full')"
    ]
    shutil.rmtree(root / "data/prepared")
    missing = run(["pipeline", "train-baseline"], root, check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].endswith("missing; run `dvc repro prepare_mnist` first")
