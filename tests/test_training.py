"""fit's early stopping: the starting weights are a candidate, so fine-tuning never ends worse."""

import numpy as np
import pytest

from conftest import FLOAT32_RTOL


def _model(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
    return model


def _data(flip: bool):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = (x[:, :1] > 0).astype(np.float32)
    return x, (1 - y) if flip else y


@pytest.mark.parametrize("train_flipped, kept_start", [(True, True), (False, False)])
def test_early_stopping_keeps_the_starting_weights_unless_an_epoch_beats_them(train_flipped, kept_start):
    from pipeline.stages.common import fit

    model = _model(1)
    validation = _data(flip=False)
    model.fit(*validation, epochs=30, verbose=0)  # a good start: trained on the validation task
    start = [w.copy() for w in model.get_weights()]
    start_loss = model.evaluate(*validation, verbose=0)
    # Flipped training labels: every epoch makes validation worse than the start.
    result = fit(model, _data(flip=train_flipped), validation, epochs=4, batch_size=16, early_stopping_patience=2)
    end_loss = model.evaluate(*validation, verbose=0)
    if kept_start:
        assert result.kept_epoch == 0 and len(result.history) == 2, "stopped after patience, kept the start"
        assert all(np.array_equal(a, b) for a, b in zip(start, model.get_weights()))
    else:
        assert result.kept_epoch >= 1 and end_loss < start_loss
    assert end_loss <= start_loss + 1e-7
    # evaluated in batches of 16 there, of 32 here: other kernels, same number to float32 (conftest)
    assert result.start_validation["loss"] == pytest.approx(start_loss, rel=FLOAT32_RTOL), "drawn as epoch 0"


def test_keep_by_val_accuracy_keeps_the_most_accurate_epoch_the_start_included():
    import keras

    from pipeline.stages.common import fit

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="binary_crossentropy", metrics=["accuracy"])
    validation = _data(flip=False)
    result = fit(model, _data(flip=False), validation, epochs=6, batch_size=16, early_stopping_patience=6,
                 keep_by="val_accuracy")
    scores = [result.start_validation["accuracy"], *result.history["val_accuracy"]]
    assert result.kept_epoch == int(np.argmax(scores)), "the first epoch with the best accuracy (0: the start)"
    assert model.evaluate(*validation, verbose=0, return_dict=True)["accuracy"] == pytest.approx(max(scores))


def test_an_unknown_keep_by_is_named_in_one_line():
    from conftest import shipped_params
    from pipeline.errors import UserError
    from pipeline.params import parse_params

    raw = shipped_params()
    raw["finetune"]["keep_by"] = "val_auc"
    with pytest.raises(UserError, match=r"finetune\.keep_by: input should be 'val_loss' or 'val_accuracy'"):
        parse_params(raw)


def test_fit_outside_a_run_keeps_its_rows_and_starts_no_mlflow_run(tmp_path, monkeypatch):
    """Per-epoch metrics go to the stage's run when there is one, and nowhere else: MLflow's
    logging calls outside a run would start one, left open for the next run to trip over."""
    import mlflow

    from pipeline.stages.common import fit

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.set_experiment("fit")
    result = fit(_model(1), _data(flip=False), _data(flip=False), epochs=2, batch_size=16)
    assert list(result.history["epoch"]) == [1, 2]
    assert mlflow.active_run() is None
    assert mlflow.search_runs([experiment.experiment_id]).empty
    with mlflow.start_run() as run:
        fit(_model(1), _data(flip=False), _data(flip=False), epochs=2, batch_size=16)
    logged = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    assert [metric.step for metric in logged] == [0, 1]
