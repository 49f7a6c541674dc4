"""A tiny project holding everything the evaluate and report stages read, made in seconds.

Real code paths, tiny sizes: the baseline is built by pipeline.models.baseline from tiny
params; the two "VGG-like" classifiers are flat chains with VGG16's layer names
(vgg_preprocess, blockN_convM, blockN_pool, head_*), sharing their first layers like the
real feature-extraction and fine-tuned models; training runs are real MLflow runs in the
store that MLFLOW_TRACKING_URI names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ruamel.yaml import YAML

from conftest import REPO, write_yaml

CLASS_NAMES = ["cat", "dog"]
IMAGE_SIZE = 32
MNIST_TEST = 40
PHOTOS_PER_CLASS = {"train": 4, "validation": 2, "test": 6}


def tiny_params() -> dict:
    """The repository's params.yaml with tiny evaluate and report settings."""
    params = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())
    params["mlflow"]["experiment"] = "tiny"
    params["images"]["size"] = IMAGE_SIZE
    params["baseline"].update(conv_filters=[4, 4], dense_units=8)
    params["dense"].update(units=[8])
    params["finetune"]["unfreeze"] = 1  # the "fine-tuned" model changed block2_conv2 (write_models)
    params["evaluate"] = {"batch_size": 4, "digits_batch_size": 4, "raw_sample": 4, "raw_rtol": 1e-5,
                          "misclassified": 4,
                          "gradcam": {"photos": 4, "layer": "block2_conv2"},
                          "translation": {"max_shift": 2, "samples": 0}, "registry": params["evaluate"]["registry"]}
    params["report"] = {
        "image_index": 1,
        "activation_channels": 2,
        "classic": {"gaussian_size": 3, "gaussian_sigma": 1.0},
        "patterns": {"filters_per_layer": 2, "steps": 2, "learning_rate": 0.05,
                     "baseline_size": 28, "vgg_size": IMAGE_SIZE},
    }
    return params


def write_data(root: Path, seed: int = 0) -> None:
    """data/prepared/{mnist,images}.npz and data/raw/images_report.json."""
    rng = np.random.default_rng(seed)
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    mnist = {}
    for split, count in (("train", 20), ("validation", 10), ("test", MNIST_TEST)):
        labels = np.arange(count) % 10
        mnist[f"x_{split}"] = rng.uniform(0, 1, (count, 28, 28, 1)).astype(np.float32)
        mnist[f"y_{split}"] = np.eye(10, dtype=np.float32)[labels]
    np.savez(prepared / "mnist.npz", **mnist)
    images: dict[str, np.ndarray] = {"class_names": np.array(CLASS_NAMES)}
    for split, per_class in PHOTOS_PER_CLASS.items():
        labels = np.arange(2 * per_class) % 2
        images[f"x_{split}"] = rng.integers(0, 256, (len(labels), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        images[f"y_{split}"] = labels.astype(np.int64)
    np.savez(prepared / "images.npz", **images)
    report = {
        "kept": {"cat": 12, "dog": 12},
        "skipped": 1,
        "skipped_by_reason": {"not an image": 1},
        "skipped_examples": [{"file": "cat/666.jpg", "reason": "not an image"}],
        "source": {"url": "file:///tiny/pets.zip", "sha256": None},
    }
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "images_report.json").write_text(json.dumps(report))


def vgg_like(seed: int):
    """A flat 'VGG-like' classifier: raw RGB in, one sigmoid unit out, VGG16's layer names."""
    import keras
    from keras import layers

    from pipeline.models.vgg import VGGPreprocess

    keras.utils.set_random_seed(seed)
    image = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="image")
    x = VGGPreprocess(name="vgg_preprocess")(image)
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="block1_conv1")(x)
    x = layers.MaxPooling2D(2, name="block1_pool")(x)
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="block2_conv1")(x)
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="block2_conv2")(x)
    x = layers.MaxPooling2D(2, name="block2_pool")(x)
    x = layers.Flatten(name="head_pool")(x)
    x = layers.Dense(4, activation="relu", name="head_dense")(x)
    x = layers.Dropout(0.5, name="head_dropout")(x)
    output = layers.Dense(1, activation="sigmoid", name="head_output")(x)
    return keras.Model(image, output, name="vgg16_classifier")


def scratch_like():
    """The convnet from scratch of pipeline.models.scratch, tiny: raw RGB in, resized inside."""
    import keras

    from pipeline.models.scratch import build_scratch_convnet
    from pipeline.params import parse_params

    params = tiny_params()
    params["scratch"].update(size=48, conv_filters=[2, 2, 2, 2], dense_units=4)
    keras.utils.set_random_seed(2)
    return build_scratch_convnet((IMAGE_SIZE, IMAGE_SIZE, 3), 2, parse_params(params).scratch)


def write_models(root: Path, params: dict) -> dict:
    """models/baseline.keras, dense.keras, head.keras, finetuned.keras and scratch.keras; returns them by stage."""
    import keras

    from pipeline.models.baseline import build_baseline
    from pipeline.models.dense import build_dense
    from pipeline.params import parse_params

    keras.utils.set_random_seed(0)
    baseline = build_baseline((28, 28, 1), 10, parse_params(params).baseline)
    dense = build_dense((28, 28, 1), 10, parse_params(params).dense)
    head = vgg_like(seed=1)
    finetuned = vgg_like(seed=1)
    # "Fine-tuning" changed the top conv layer and the head; the layers below are shared.
    for name in ("block2_conv2", "head_dense", "head_output"):
        layer = finetuned.get_layer(name)
        layer.set_weights([w * 1.5 + 0.01 for w in layer.get_weights()])
    (root / "models").mkdir()
    models = {"train_baseline": baseline, "train_dense": dense, "train_head": head, "finetune": finetuned,
              "train_scratch": scratch_like()}
    for stage, file_name in (("train_baseline", "baseline"), ("train_dense", "dense"), ("train_head", "head"),
                             ("finetune", "finetuned"), ("train_scratch", "scratch")):
        models[stage].save(root / "models" / f"{file_name}.keras")
    return models


def write_training_outputs(root: Path, params: dict, models: dict) -> dict[str, str]:
    """metrics/<stage>.json and plots/<stage>/ as the training stages write them, each with a
    real MLflow run; plus an earlier, better train_baseline run with another dropout.
    Returns {stage: run id}."""
    import mlflow
    import pandas as pd

    from pipeline.stages.common import model_summary
    from pipeline.tracking import stage_run
    from pipeline.viz.curves import training_curves_figure

    history = pd.DataFrame({"epoch": [1, 2], "loss": [1.0, 0.5], "val_loss": [1.1, 0.7],
                            "accuracy": [0.5, 0.8], "val_accuracy": [0.4, 0.7]})
    experiment = params["mlflow"]["experiment"]
    earlier = {"baseline": {**params["baseline"], "dropout": 0.25}}
    with stage_run("train_baseline", earlier, [], experiment):
        mlflow.log_metrics({"test_accuracy": 0.99, "test_loss": 0.05})
    run_ids = {}
    sections = {"train_baseline": ("baseline", "baseline"), "train_dense": ("dense", "dense"), "train_head": ("head", "head"),
                "finetune": ("finetune", "finetune"), "train_scratch": ("scratch", "scratch")}
    for stage, (section, file_name) in sections.items():
        with stage_run(stage, {section: params[section]}, [], experiment) as run:
            mlflow.log_metrics({"test_accuracy": 0.5, "test_loss": 0.7, "seconds_per_epoch": 0.1})
        run_ids[stage] = run.info.run_id
        metrics = {"test_accuracy": 0.5, "test_loss": 0.7, "epochs": 2, "seconds_per_epoch": 0.1,
                   "mlflow_run_id": run.info.run_id}
        (root / "metrics").mkdir(exist_ok=True)
        (root / "metrics" / f"{file_name}.json").write_text(json.dumps(metrics))
        plots = root / "plots" / file_name
        plots.mkdir(parents=True)
        history.to_csv(plots / "history.csv", index=False)
        (plots / "summary.txt").write_text(model_summary(models[stage]))
        training_curves_figure(history).savefig(plots / "curves.png", dpi=50)
    return run_ids


def write_block_heads_outputs(root: Path) -> None:
    """metrics/block_heads.json and plots/block_heads/ as train_block_heads writes them, from
    made-up heads of blocks 1 and 2 (the VGG-like models' blocks) on the test photos."""
    import pandas as pd

    from pipeline.evaluation import score
    from pipeline.stages.common import FitResult
    from pipeline.stages.train_block_heads import BlockHead, block_metrics, write_plots

    labels = np.arange(2 * PHOTOS_PER_CLASS["test"]) % 2
    history = pd.DataFrame({"epoch": [1], "loss": [0.7], "val_loss": [0.8], "epoch_seconds": [0.1]})
    heads = []
    for block, right in ((1, 7), (2, 10)):
        correct = np.arange(len(labels)) < right
        outputs = np.where(correct, labels, 1 - labels).astype(np.float32)[:, None] * 0.8 + 0.1
        heads.append(BlockHead(block, FitResult(history, 0.1), score(labels, outputs, CLASS_NAMES), correct))
    (root / "plots" / "block_heads").mkdir(parents=True)
    write_plots(root / "plots" / "block_heads", heads)
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "block_heads.json").write_text(json.dumps(block_metrics(heads)))


def write_feature_cache(root: Path, models: dict) -> None:
    """data/features/test_{pooled,frozen,labels}.npy as extract_features caches them: the test
    photos' activations at the head's input (block2_pool) and below the layer fine-tuning
    changed (block2_conv1, `finetune.unfreeze: 1`), by sub-models of the saved head model."""
    import keras

    from pipeline.models.graph import layer_output

    with np.load(root / "data" / "prepared" / "images.npz") as data:
        photos, labels = data["x_test"], data["y_test"]
    head = models["train_head"]
    features = root / "data" / "features"
    features.mkdir(parents=True)
    for kind, layer in (("pooled", "block2_pool"), ("frozen", "block2_conv1")):
        extractor = keras.Model(head.inputs, layer_output(head, layer))
        np.save(features / f"test_{kind}.npy", extractor.predict(photos, batch_size=2, verbose=0))
    np.save(features / "test_labels.npy", labels)
    (features / "class_names.json").write_text(json.dumps(CLASS_NAMES) + "\n")


def make_tiny_project(root: Path) -> dict[str, str]:
    """Everything evaluate and report read, in `root` (the current directory for the stages)."""
    params = tiny_params()
    write_yaml(root / "params.yaml", params)
    write_data(root)
    models = write_models(root, params)
    write_feature_cache(root, models)
    run_ids = write_training_outputs(root, params, models)
    write_block_heads_outputs(root)
    return run_ids


def run_stages_in_tiny_project(root: Path, *stages) -> Path:
    """make_tiny_project(root), then each stage module's run() inside it, logging to
    root/mlflow.db; the working directory and environment are restored afterwards."""
    import os

    import pytest

    old = Path.cwd()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        os.chdir(root)
        try:
            make_tiny_project(root)
            for stage in stages:
                stage.run(Path("params.yaml"))
        finally:
            os.chdir(old)
    return root
