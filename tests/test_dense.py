"""The Dense-only MNIST model trains and scores like the baseline, its metrics file carries a
95% interval beside every accuracy (test and validation), and baseline.input_scale leaves the
default convnet as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import shipped_params


def tiny_params(**dense):
    from pipeline.params import parse_params

    raw = shipped_params()
    raw["dense"].update(units=[8], epochs=2, batch_size=8, **dense)
    raw["baseline"].update(conv_filters=[4], dense_units=8, epochs=1, batch_size=8)
    return parse_params(raw)


def tiny_digits():
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 40), ("validation", 20), ("test", 30)):
        labels = np.arange(count) % 10
        arrays[f"x_{split}"] = rng.uniform(0, 1, (count, 28, 28, 1)).astype(np.float32)
        arrays[f"y_{split}"] = np.eye(10, dtype=np.float32)[labels]
    return arrays


def test_the_dense_model_trains_scores_and_its_metrics_carry_an_interval_beside_every_accuracy(workdir, monkeypatch):
    """train_dense on tiny digits, published as its stage does (an MLflow run in a temp store)."""
    import mlflow

    from pipeline import catalog
    from pipeline.evaluation import wilson_interval
    from pipeline.stages.common import publish_training, seed_everything
    from pipeline.stages.train_dense import figures, train_dense
    from pipeline.tracking import tracked

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    # Not the MLflow model (tens of seconds on a busy CPU; test_reliability's stage runs log it).
    monkeypatch.setattr("pipeline.tracking.log_model", lambda *args, **kwargs: None)
    params = tiny_params()
    seed_everything(params.seed)
    arrays = tiny_digits()
    with tracked(catalog.STAGES["train_dense"], params) as run:
        trained = train_dense(arrays, params, run=run)
        assert [layer.name for layer in trained.model.layers] == ["flatten", "dense1", "dropout", "output"]
        assert len(trained.fit.history) == 2 and 0.0 <= trained.test_accuracy <= 1.0
        publish_training(run, trained, figures=figures(trained.model, (28, 28, 1)), example=arrays["x_test"][:2])
    assert (workdir / "plots/dense/weights_dense1.png").exists()
    metrics = json.loads(catalog.MODELS["dense"].metrics.read_text())
    for split, samples in (("test", 30), ("validation", 20)):
        accuracy = metrics[f"{split}_accuracy"]
        assert metrics[f"{split}_samples"] == samples
        assert metrics[f"{split}_accuracy_ci95"] == list(wilson_interval(round(accuracy * samples), samples))
    assert metrics["validation_accuracy"] == pytest.approx(trained.fit.history["val_accuracy"].iloc[-1])
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    assert logged["test_accuracy_ci95_low"] == metrics["test_accuracy_ci95"][0]
    assert logged["validation_accuracy_ci95_high"] == metrics["validation_accuracy_ci95"][1]
    mlflow.set_tracking_uri(None)


def test_input_scale_one_is_the_default_model_and_255_feeds_raw_pixels():
    import keras

    from pipeline.models.baseline import build_baseline
    from pipeline.params import parse_params

    raw = shipped_params()
    assert raw["baseline"]["input_scale"] == 1.0
    default = build_baseline((28, 28, 1), 10, parse_params(raw).baseline)
    assert "input_scale" not in [layer.name for layer in default.layers]
    raw["baseline"]["input_scale"] = 255.0
    scaled = build_baseline((28, 28, 1), 10, parse_params(raw).baseline)
    first = scaled.get_layer("input_scale")
    digit = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(1, 28, 28, 1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(first(digit)), digit * 255, rtol=1e-6)
    assert scaled.count_params() == default.count_params()
