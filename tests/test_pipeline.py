"""End to end, as a new user meets it: the README's commands, as written, on a tiny copy of
the project whose data is served from loopback.

Each stage is a process that imports TensorFlow, so one project is built per module (by the
README's `make run`) and the checks share it, in file order: the read-only checks first,
then the README's other commands, then the tests that change params or delete data.
"""

from __future__ import annotations

import json
import shutil

import pytest
from ruamel.yaml import YAML

from conftest import (REPO, git_dvc_project, run_command, serve_folder, shipped_params, write_mnist_mirror,
                      write_photo_zip, write_vgg16_weights, write_yaml)
from readme import outputs, run_blocks, script, shell_blocks

TRAINING_METRICS = {"test_accuracy", "test_loss", "epochs", "seconds_per_epoch"}


README = REPO / "README.md"
# What the README's commands name and the tests cannot have: the real data on a local mirror.
# The test's loopback mirror has the same layout; its tiny files have other hashes and sizes.
REAL_PORT = "http://127.0.0.1:8765"
REAL_PHOTOS_SHA256 = "cd2590f2861e345536f0649a86edd4dc90c69d019c6d7f19f4330b0d1713a7d0"
REAL_WEIGHTS_SHA256 = "176a7114d666779d23b8ff9e00d83d575f0341a64284cb1fa82996d602970e66"
REAL_PER_CLASS = "{train: 500, validation: 250, test: 251}"
TINY_PER_CLASS = {"train": 2, "validation": 2, "test": 2}
PHOTOS = "cats_vs_dogs/cats_vs_dogs_2002.zip"
WEIGHTS = "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


def tiny_params(url: str, files: dict, photos_sha256: str, weights_sha256: str) -> dict:
    params = shipped_params()
    params["mnist"].update(mirrors=[url + "/mnist/"], files=files, validation_size=20, retries=0)
    params["baseline"].update(conv_filters=[4, 8], dense_units=16, epochs=2, batch_size=32)
    params["images"].update(url=f"{url}/{PHOTOS}", sha256=photos_sha256, size=32, per_class=TINY_PER_CLASS)
    params["vgg16"].update(weights=f"{url}/{WEIGHTS}", weights_sha256=weights_sha256)
    params["head"].update(units=8, epochs=2, batch_size=2)
    params["finetune"].update(epochs=2, batch_size=2)
    params["block_heads"].update(units=8, epochs=1, batch_size=2)
    params["scratch"].update(size=48, conv_filters=[2, 2, 2, 2], dense_units=4, epochs=1, batch_size=4)
    params["evaluate"].update(misclassified=4, gradcam={"photos": 2, "layer": "block5_conv3"})
    params["report"].update(activation_channels=2)
    params["report"]["patterns"].update(filters_per_layer=2, steps=2, vgg_size=32)
    params["mlflow"].update(experiment="tiny", system_metrics_seconds=1)
    return params


def readme_blocks(url: str, photos_sha256: str, weights_sha256: str) -> list:
    """The README's shell blocks, with the tiny mirror's address, hashes and sizes in place
    of the real data's (each of which the README must still name)."""
    text = README.read_text()
    tiny_per_class = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_PER_CLASS.items()) + "}"
    for real, tiny in ((REAL_PORT, url), (REAL_PHOTOS_SHA256, photos_sha256),
                       (REAL_WEIGHTS_SHA256, weights_sha256), (REAL_PER_CLASS, tiny_per_class)):
        assert real in text, f"README.md no longer names {real}: update tests/test_pipeline.py"
        text = text.replace(real, tiny)
    return shell_blocks(text)


@pytest.fixture(scope="module")
def project(tmp_path_factory, request):
    """A git+DVC copy of the project with tiny params and the venv, built by the README's
    first command block (`make run`), run as a new user runs it; with the README's other
    blocks, for test_the_readme_commands_work_as_written."""
    import hashlib

    base = tmp_path_factory.mktemp("e2e")
    served = base / "served"
    files = write_mnist_mirror(served / "mnist")
    (served / PHOTOS).parent.mkdir(parents=True)
    write_photo_zip(served / PHOTOS)
    (served / WEIGHTS).parent.mkdir(parents=True)
    weights_sha256 = write_vgg16_weights(served / WEIGHTS)
    photos_sha256 = hashlib.sha256((served / PHOTOS).read_bytes()).hexdigest()
    url = serve_folder(served, request)
    root = git_dvc_project(base / "project", tiny_params(url, files, photos_sha256, weights_sha256), with_venv=True)
    blocks = readme_blocks(url, photos_sha256, weights_sha256)
    assert [c.split("#")[0].strip() for c in blocks[0].commands] == ["make run", "make test"]
    first = run_blocks(blocks[:1], root, home=base)
    assert first.returncode == 0, f"{first.stdout[-3000:]}\n{first.stderr[-3000:]}"
    return root, first, blocks


def test_repro_writes_every_output(project):
    root = project[0]
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

    root = project[0]
    report = json.loads((root / "data/raw/images_report.json").read_text())
    assert report["kept"] == {"Cat": 6, "Dog": 6}
    assert report["skipped"] == 2
    assert sorted(p.name for p in (root / "data/raw/images").iterdir()) == ["Cat", "Dog"]
    with np.load(root / "data/prepared/images.npz") as data:
        assert data["x_train"].shape == (4, 32, 32, 3) and data["x_train"].dtype == np.uint8
        assert list(data["class_names"]) == ["Cat", "Dog"]
    frozen = np.load(root / "data/features/train_frozen.npy")
    # the last frozen layer's output of a 32 px photo (block5_conv2 with the shipped
    # finetune.unfreeze: 1, block4_pool with 3: both 2x2x512), for the 4 training photos and,
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
    root = project[0]
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

    root = project[0]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    by_stage = {run.data.tags["pipeline.stage"]: run for run in runs}
    # `make run` ran every stage forked from `pipeline warm` (pipeline/warm.py)
    stages = YAML(typ="safe", pure=True).load((root / "dvc.yaml").read_text())["stages"]
    assert {stage: by_stage[stage].data.tags["pipeline.warm"] for stage in stages} == dict.fromkeys(stages, "true")
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
    # what trained it, and what it cost: MLflow's datasets and system metrics
    inputs = {d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}) for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"mnist.train", "mnist.validation", "mnist.test"}
    for digest, tags in inputs.values():
        assert len(tags["sha256"]) == 64 and tags["sha256"][:36] == digest
    assert any(name.startswith("system/cpu") for name in run.data.metrics), sorted(run.data.metrics)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # evaluate registered the models it scored, from the models their training runs logged
    champion = client.get_model_version_by_alias("mnist-convnet", "champion")
    assert champion.source.startswith("models:/")
    logged = client.get_logged_model(champion.source.removeprefix("models:/"))
    assert logged.source_run_id == json.loads((root / "metrics/baseline.json").read_text())["mlflow_run_id"]
    # ... with its signature and input example, on which it predicts what Keras does: the check
    # MLflow would make while logging, which tracking.log_model skips for speed
    import keras
    import mlflow.pyfunc

    from conftest import assert_float32_close

    served = mlflow.pyfunc.load_model(logged.artifact_location)
    example = served.input_example
    assert tuple(served.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 28, 28, 1)
    assert example.shape == (1, 28, 28, 1)
    assert_float32_close(served.predict(example), keras.models.load_model(root / "models/baseline.keras").predict(example))
    assert client.get_model_version_by_alias("cats-vs-dogs", "champion").tags["pipeline.model"] in (
        "feature_extraction", "fine_tuning")


# Commands of the README that cannot run in a test, each marked there with its reason.
README_SKIPS = {"make test", "pipeline ui", "block: needs a PostgreSQL server", "block: a team's shared storage",
                "block: several machines", "pipeline predict my_digit.jpg", "block: a model server",
                "block: the full grid", "block: each study trains"}


def test_the_readme_commands_work_as_written(project):
    """Every shell block of README.md after the first (`make run`, which built the project),
    in order, in one shell with nothing but PATH=/usr/bin:/bin and HOME: no venv activated,
    no PATH of ours. What cannot run here is marked in the README and skipped by name."""
    import mlflow

    root, _, blocks = project
    _, skipped = script(blocks)
    assert sorted(next((name for name in README_SKIPS if entry.startswith(name)), entry) for entry in skipped) \
        == sorted(README_SKIPS), skipped
    for block in blocks:
        for prefix in block.skipped_lines:
            assert any(c.strip().startswith(prefix) for c in block.commands), f"README.md:{block.line}: {prefix}?"

    result = run_blocks(blocks[1:], root, home=root.parent)
    assert result.returncode == 0, result.stdout[-6000:]
    said = outputs(result.stdout)

    def output_of(command: str) -> str:
        """What the first README command that starts with `command` printed."""
        found = [out for line, out in said if line.startswith(command)]
        assert found, f"no README command starts with {command!r}"
        return found[0]

    def ran(command: str) -> set[str]:
        return {line.split("'")[1] for line in output_of(command).splitlines() if line.startswith("Running stage")}

    assert "train-baseline" in output_of("pipeline --help")
    # A second repro does nothing; where MNIST comes from is not a dependency; a param change
    # re-runs only the stages that read it, and their downstream.
    assert ran("dvc repro train_baseline") == set()
    assert ran("dvc exp run -S 'mnist.mirrors") == set()
    assert ran("dvc exp run \\") == set(), "the same photos and weights, from another place"
    assert ran("dvc exp run -n my-exp -S baseline.epochs=10") == {"train_baseline", "evaluate", "report"}

    # What the commands did: the experiment and the two queued ones logged to the project's
    # store (not to the queue's temporary copies), one train_baseline run each.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("pipeline.stage") == "train_baseline" and r.data.tags.get("dvc.exp_name")]
    assert {r.info.status for r in runs} == {"FINISHED"}
    by_exp = {r.data.tags["dvc.exp_name"]: r for r in runs}
    assert len(by_exp) == len(runs) == 3, sorted(by_exp)
    assert by_exp.pop("my-exp").data.params["baseline.epochs"] == "10"
    assert sorted(r.data.params["baseline.dropout"] for r in by_exp.values()) == ["0.3", "0.4"]
    assert not list((root / ".dvc/tmp/exps").rglob("mlflow.db")), "queued runs go to the project's store"
    table = json.loads(run_command(["pipeline", "compare", "--stage", "train_baseline", "-p", "baseline.dropout",
                            "--sort", "baseline.dropout", "--ascending", "-f", "json"], root).stdout)
    swept = [(row["dvc_exp"], row["baseline.dropout"], row["test_accuracy"]) for row in table if row["dvc_exp"] in by_exp]
    expected = sorted(((name, float(r.data.params["baseline.dropout"]), r.data.metrics["test_accuracy"])
                       for name, r in by_exp.items()), key=lambda row: row[1])
    assert swept == expected
    # `dvc exp apply my-exp` left that experiment in the workspace
    assert json.loads((root / "metrics/baseline.json").read_text())["epochs"] == 10


def test_user_errors_are_one_line_and_exit_2(project):
    root = project[0]
    params = YAML(typ="safe", pure=True).load((root / "params.yaml").read_text())
    params["baseline"]["padding"] = "full"
    write_yaml(root / "bad.yaml", params)
    result = run_command(["pipeline", "train-baseline", "--params", "bad.yaml"], root, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: bad.yaml: baseline.padding: input should be 'valid' or 'same' (got 'full')"
    ]
    shutil.rmtree(root / "data/prepared")
    missing = run_command(["pipeline", "train-baseline"], root, check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].endswith("missing; run `dvc repro prepare_mnist` first")
