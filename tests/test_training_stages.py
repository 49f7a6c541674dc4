"""train_head and finetune as functions, outside their stage's run(): tiny VGG16 (random
weights, 32 px photos), one epoch each; the classifier each saves is the model it trained."""

from __future__ import annotations

import numpy as np
import pytest
from ruamel.yaml import YAML

from conftest import REPO, write_vgg16_weights

SIZE = 32

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def tiny_params():
    from pipeline.params import parse_params

    raw = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())
    raw["head"].update(units=4, epochs=1, batch_size=2)
    raw["finetune"].update(epochs=1, batch_size=2, early_stopping_patience=0)
    raw["block_heads"].update(units=4, epochs=1, batch_size=2)
    return parse_params(raw)


def test_train_head_then_finetune_save_the_models_they_trained(tmp_path, monkeypatch):
    from pipeline import catalog
    from pipeline.stages.common import save_model, seed_everything
    from pipeline.stages.extract_features import feature_extractor
    from pipeline.stages.finetune import finetune
    from pipeline.stages.train_head import train_head

    monkeypatch.chdir(tmp_path)
    catalog.WEIGHTS.parent.mkdir(parents=True)
    write_vgg16_weights(catalog.WEIGHTS)
    params = tiny_params()
    seed_everything(params.seed)
    rng = np.random.default_rng(0)
    photos = {split: (rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8), np.array([0, 1, 0, 1]))
              for split in ("train", "validation", "test")}
    extractor = feature_extractor(str(catalog.WEIGHTS), (SIZE, SIZE, 3), params.finetune.unfreeze)
    cached = {split: extractor.predict(images, verbose=0) for split, (images, _) in photos.items()}
    frozen = {split: (cached[split][0], labels) for split, (_, labels) in photos.items()}
    pooled = {split: (cached[split][1], labels) for split, (_, labels) in photos.items()}

    head = train_head(pooled, 2, (SIZE, SIZE, 3), params)
    assert len(head.fit.history) == 1 and 0.0 <= head.test_accuracy <= 1.0
    np.testing.assert_allclose(head.to_save.predict(photos["test"][0], verbose=0),
                               head.model.predict(pooled["test"][0], verbose=0), rtol=1e-4, atol=1e-5)
    save_model(head.to_save, tmp_path / "head.keras")

    tuned = finetune(tmp_path / "head.keras", frozen, photos, 2, params)
    assert len(tuned.fit.history) == 1
    np.testing.assert_allclose(tuned.to_save.predict(photos["test"][0], verbose=0),
                               tuned.model.predict(frozen["test"][0], verbose=0), rtol=1e-4, atol=1e-5)


def test_cached_splits_read_each_split_when_used_and_fit_and_test_forgets_the_training_rows(tmp_path, monkeypatch):
    """finetune's features: each split read from the cache when first used (a tensor of the
    .npy file's numbers), once; after fitting, the training rows are let go before the test
    rows are read, so TensorFlow can put the test rows in their memory (the stage's peak)."""
    import json

    import keras

    from pipeline.stages import vgg_common
    from pipeline.stages.vgg_common import CachedSplits, fit_and_test

    monkeypatch.setattr(vgg_common, "FEATURES", tmp_path)
    rng = np.random.default_rng(0)
    arrays = {split: rng.random((rows, 3, 3, 4), dtype=np.float32) for split, rows in
              (("train", 8), ("validation", 4), ("test", 6))}
    for split, features in arrays.items():
        np.save(tmp_path / f"{split}_frozen.npy", features)
        np.save(tmp_path / f"{split}_labels.npy", np.arange(len(features)) % 2)
    (tmp_path / "class_names.json").write_text(json.dumps(["a", "b"]))

    splits = CachedSplits("frozen")
    assert list(splits) == ["train", "validation", "test"] and vgg_common.cached_class_names() == ["a", "b"]
    train = splits["train"]
    assert splits["train"] is train, "read once"
    np.testing.assert_array_equal(np.asarray(train[0]), arrays["train"])  # the same numbers, exactly
    np.testing.assert_array_equal(train[1], [0, 1, 0, 1, 0, 1, 0, 1])
    with pytest.raises(KeyError):
        splits["holdout"]
    splits.forget("train")
    assert splits["train"] is not train and np.array_equal(np.asarray(splits["train"][0]), arrays["train"])

    params = tiny_params()
    model = keras.Sequential([keras.Input((3, 3, 4)), keras.layers.Flatten(), keras.layers.Dense(1, activation="sigmoid")])
    vgg_common.compile_classifier(model, 2, params.finetune)
    trained = fit_and_test(model, splits, params.finetune, params, 1, None, test_batch_size=4)
    assert trained.test_samples == 6 and trained.validation_samples == 4
    assert "train" not in splits._read and {"validation", "test"} <= splits._read.keys()


def test_block_heads_train_on_each_pooled_block_and_are_paired(tmp_path, monkeypatch):
    """A head per cached block (tiny VGG16, random weights): scores with intervals, the paired
    test of each block against the one before, and the files the report reads."""
    import json

    from pipeline.evaluation import mcnemar_exact
    from pipeline.stages.common import seed_everything
    from pipeline.stages.extract_features import feature_extractor
    from pipeline.stages.train_block_heads import block_metrics, mlflow_metrics, train_block_heads, write_plots

    monkeypatch.chdir(tmp_path)  # fit logs to MLflow: an embedded store here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = tiny_params()
    seed_everything(params.seed)
    extractor = feature_extractor(None, (SIZE, SIZE, 3), params.finetune.unfreeze, (3, 4, 5))
    rng = np.random.default_rng(0)
    features = {block: {} for block in (3, 4, 5)}
    for split in ("train", "validation", "test"):
        photos, labels = rng.integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8), np.arange(6) % 2
        _, _, *pooled = extractor.predict(photos, verbose=0)
        for block, values in zip((3, 4, 5), pooled):
            features[block][split] = (values, labels)
    assert features[3]["train"][0].shape == (6, 256) and features[5]["train"][0].shape == (6, 512)

    from pipeline.stages.common import distribution_scope

    # one strategy scope for the whole stage, as its run() hands it in (a scope enters once)
    heads = train_block_heads(features, ["cat", "dog"], params, distribution_scope(params.train))
    assert [head.key for head in heads] == ["block3", "block4", "block5"]
    metrics = block_metrics(heads)
    assert set(metrics) == {"block3", "block4", "block5", "block4_vs_block3", "block5_vs_block4"}
    for head in heads:
        scores = metrics[head.key]
        assert scores["test_samples"] == 6 and scores["epochs"] == 1
        assert scores["test_accuracy"] == head.correct.mean()
        low, high = scores["test_accuracy_ci95"]
        assert 0.0 <= low <= scores["test_accuracy"] <= high <= 1.0
    paired = metrics["block4_vs_block3"]
    assert paired["p_value"] == mcnemar_exact(paired["only_block4_right"], paired["only_block3_right"])
    assert all(isinstance(value, (int, float)) for value in mlflow_metrics(metrics).values())
    json.dumps(metrics)  # plain numbers, as a DVC metrics file needs
    (tmp_path / "plots").mkdir()
    write_plots(tmp_path / "plots", heads)
    assert {"accuracy_by_block.csv", "accuracy_by_block.png", "correct.csv", "history_block3.csv"} <= {
        path.name for path in (tmp_path / "plots").iterdir()}


def test_scratch_convnet_trains_on_raw_photos_and_refuses_a_size_it_cannot_take(tmp_path, monkeypatch):
    from pipeline.errors import UserError
    from pipeline.models.scratch import build_scratch_convnet
    from pipeline.params import parse_params
    from pipeline.stages.common import seed_everything
    from pipeline.stages.train_scratch import train_scratch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())
    raw["scratch"].update(size=48, conv_filters=[4, 4, 4, 4], dense_units=4, epochs=1, batch_size=4, augment=True)
    params = parse_params(raw)
    seed_everything(params.seed)
    rng = np.random.default_rng(0)
    photos = {split: (rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8), np.array([0, 1, 0, 1]))
              for split in ("train", "validation", "test")}
    trained = train_scratch(photos, 2, params)
    assert len(trained.fit.history) == 1 and 0.0 <= trained.test_accuracy <= 1.0
    model = trained.to_save
    assert model.input_shape == (None, SIZE, SIZE, 3), "raw photos in; the model resizes them"
    assert model.get_layer("conv1").input.shape[1:3] == (48, 48)
    outputs = model.predict(photos["test"][0], verbose=0)
    assert outputs.shape == (4, 1)
    np.testing.assert_array_equal(outputs, model.predict(photos["test"][0], verbose=0))  # no augmentation at inference

    raw["scratch"].update(size=16)
    with pytest.raises(UserError, match="scratch.size"):
        build_scratch_convnet((SIZE, SIZE, 3), 2, parse_params(raw).scratch)


def test_read_tensor_gives_the_npy_files_array_bit_for_bit(tmp_path):
    from pipeline.stages.vgg_common import read_tensor

    array = np.random.default_rng(0).standard_normal((5, 3, 3, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", array)
    tensor = read_tensor(tmp_path / "a.npy")
    assert tensor.dtype.name == "float32" and tuple(tensor.shape) == array.shape
    assert tensor.numpy().tobytes() == array.tobytes()
    np.save(tmp_path / "f.npy", np.asfortranarray(array))
    with pytest.raises(ValueError, match="not a C-ordered array"):
        read_tensor(tmp_path / "f.npy")
