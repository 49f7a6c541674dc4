"""VGG16 pieces on 32x32 inputs with random weights: the split is exact, saving round-trips."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_float32_close
from pipeline.errors import UserError
from pipeline.models.vgg import (
    VGG16_CONV_LAYERS,
    VGG16_LAYERS,
    VGGPreprocess,
    assemble_classifier,
    build_conv_base,
    build_finetune_model,
    build_head,
    last_frozen_layer,
    split_at_last_frozen_layer,
    standalone_copy,
)

SIZE = 32  # VGG16's smallest input: block5_pool is 1x1x512

# Keras' own saving code calls np.array on TF variables, which numpy 2 flags; not ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


@pytest.fixture(scope="module")
def conv_base() -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_conv_base(None, (SIZE, SIZE, 3))


@pytest.fixture
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (2, SIZE, SIZE, 3)).astype("float32")


def head_for(conv_base: keras.Model, num_classes: int = 2, pooling: str = "flatten"):
    return build_head(conv_base.output.shape[1:], num_classes, pooling, units=8, dropout=0.5)


def outputs_and_gradients(model: keras.Model, x) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Inference-mode outputs, and d(sum of outputs)/d(each trainable weight) by path."""
    with tf.GradientTape() as tape:
        y = model(x, training=False)
        total = tf.reduce_sum(y)
    grads = tape.gradient(total, model.trainable_weights)
    return y.numpy(), {w.path: g.numpy() for w, g in zip(model.trainable_weights, grads)}


@pytest.mark.parametrize(
    "unfreeze, layer",
    [(3, "block4_pool"), (2, "block5_conv1"), (1, "block5_conv2"), (0, "block5_pool")],
)
def test_last_frozen_layer(unfreeze, layer):
    assert last_frozen_layer(unfreeze) == layer


@pytest.mark.parametrize("unfreeze", [-1, 4])
def test_last_frozen_layer_out_of_range(unfreeze):
    with pytest.raises(ValueError):
        last_frozen_layer(unfreeze)


def test_layer_names_match_keras(conv_base):
    assert [layer.name for layer in conv_base.layers[1:]] == list(VGG16_LAYERS)
    assert len(VGG16_CONV_LAYERS) == 13


def test_preprocess_layer_equals_preprocess_input(images):
    expected = keras.applications.vgg16.preprocess_input(images.copy())
    # A 1x1 convolution against NumPy's subtraction: two computations (conftest)
    assert_float32_close(VGGPreprocess()(images), expected)
    # Inside a model (whose float Input converts), raw uint8 photos need no cast first.
    model = keras.Sequential([keras.Input(images.shape[1:]), VGGPreprocess()])
    as_uint8 = model.predict(images.astype("uint8"), verbose=0)
    assert_float32_close(as_uint8, expected)
    assert not model.trainable_weights


@pytest.mark.parametrize("unfreeze", [2, 3])
def test_split_is_exact(conv_base, images, unfreeze):
    """Training on cached activations computes what the full network computes."""
    head = head_for(conv_base)
    frozen, top = split_at_last_frozen_layer(conv_base, unfreeze)
    finetune = build_finetune_model(top, head)
    full = assemble_classifier(conv_base, head, unfreeze)

    cached = frozen(VGGPreprocess()(images))
    y_split, g_split = outputs_and_gradients(finetune, cached)
    y_full, g_full = outputs_and_gradients(full, images)

    trained = VGG16_CONV_LAYERS[-unfreeze:] + ("head_dense", "head_output")
    assert set(g_full) == set(g_split) == {f"{n}/{w}" for n in trained for w in ("kernel", "bias")}
    assert_float32_close(y_split, y_full)  # two computations of the same numbers (conftest)
    for path, grad in g_full.items():
        assert np.any(grad != 0), f"{path}: zero gradient proves nothing"
        scale = np.abs(grad).max()
        np.testing.assert_allclose(g_split[path], grad, rtol=1e-4, atol=1e-5 * scale, err_msg=path)


def test_split_trainability(conv_base):
    frozen, top = split_at_last_frozen_layer(conv_base, 2)
    assert frozen.output.shape[1:] == conv_base.get_layer("block5_conv1").output.shape[1:]
    assert frozen.trainable_weights == []
    assert {w.path for w in top.trainable_weights} == {
        "block5_conv2/kernel", "block5_conv2/bias", "block5_conv3/kernel", "block5_conv3/bias",
    }  # fmt: skip
    assert top.output.shape[1:] == conv_base.output.shape[1:]


def test_split_shares_weights_with_conv_base(conv_base, images):
    frozen, top = split_at_last_frozen_layer(conv_base, 3)
    kernel = top.get_layer("block5_conv3").kernel
    assert kernel is conv_base.get_layer("block5_conv3").kernel
    through_split = top(frozen(VGGPreprocess()(images)))
    # two graphs, two sets of kernel calls (conftest)
    assert_float32_close(through_split, conv_base(VGGPreprocess()(images)))


def test_unfreeze_zero_is_head_only(conv_base, images):
    head = head_for(conv_base, num_classes=3, pooling="gap")
    frozen, top = split_at_last_frozen_layer(conv_base, 0)
    finetune = build_finetune_model(top, head)
    trained = {w.path.split("/")[0] for w in finetune.trainable_weights}
    assert trained == {"head_dense", "head_output"}
    full = assemble_classifier(conv_base, head, 0)
    assert_float32_close(finetune(frozen(VGGPreprocess()(images))), full(images))


@pytest.mark.parametrize("num_classes, units, activation", [(2, 1, "sigmoid"), (5, 5, "softmax")])
def test_head_output(conv_base, num_classes, units, activation):
    head = head_for(conv_base, num_classes)
    assert [layer.name for layer in head.layers[1:]] == [
        "head_pool", "head_dense", "head_dropout", "head_output",
    ]  # fmt: skip
    output = head.get_layer("head_output")
    assert output.units == units and output.activation.__name__ == activation


def test_head_rejects_unknown_pooling(conv_base):
    with pytest.raises(ValueError, match="pooling"):
        head_for(conv_base, pooling="max")


def grad_cam_model(model: keras.Model) -> keras.Model:
    """What Grad-CAM builds: the last conv activation and the prediction, from raw images."""
    return keras.Model(model.input, [model.get_layer("block5_conv3").output, model.output])


def test_classifier_is_flat_and_round_trips(conv_base, images, tmp_path):
    model = assemble_classifier(conv_base, head_for(conv_base), 3)
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert [layer.name for layer in model.layers[2:-4]] == list(VGG16_LAYERS)

    model.save(tmp_path / "classifier.keras")
    reloaded = keras.saving.load_model(tmp_path / "classifier.keras")
    expected = model(images)
    np.testing.assert_array_equal(reloaded(images), expected)
    raw = images.astype("uint8")  # the saved model takes photos as they are
    np.testing.assert_array_equal(reloaded(raw), expected)
    assert [w.path for w in reloaded.trainable_weights] == [
        w.path for w in model.trainable_weights
    ]
    activation, prediction = grad_cam_model(reloaded)(images)
    assert activation.shape == (2, 2, 2, 512)
    assert_float32_close(prediction, expected)  # another graph than `model`'s (conftest)


def test_standalone_copy_allows_grad_cam(conv_base, images):
    model = assemble_classifier(conv_base, head_for(conv_base), 3)
    copy = standalone_copy(model)
    assert copy.get_layer("block5_conv3").kernel is not conv_base.get_layer("block5_conv3").kernel
    _, prediction = grad_cam_model(copy)(images)
    assert_float32_close(prediction, model(images))  # another graph (conftest)
    assert [w.path for w in copy.trainable_weights] == [w.path for w in model.trainable_weights]


def test_weights_file_round_trip(conv_base, tmp_path):
    path = tmp_path / "vgg16_notop.weights.h5"
    conv_base.save_weights(path)
    loaded = build_conv_base(str(path), (SIZE, SIZE, 3))
    for got, want in zip(loaded.weights, conv_base.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def small_model() -> keras.Model:
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])


@pytest.mark.parametrize(
    "name, write",
    [
        ("small.h5", lambda path: small_model().save(path)),  # legacy h5 layout
        ("small.weights.h5", lambda path: small_model().save_weights(path)),
        ("garbage.h5", lambda path: path.write_bytes(b"not an hdf5 file")),
    ],
)
def test_wrong_weights_file_is_a_user_error(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    with pytest.raises(UserError, match=rf"{name} does not hold VGG16 notop weights: \S"):
        build_conv_base(str(path), (SIZE, SIZE, 3))


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_conv_base(str(tmp_path / "nope.h5"), (SIZE, SIZE, 3))



@pytest.mark.parametrize("unfreeze", [0, 1, 2, 3])
def test_the_saved_classifier_scored_from_the_cache_is_the_whole_model(conv_base, images, tmp_path, unfreeze):
    """What evaluate does: a saved classifier's layers above the layer extract_features caches
    (feature_model's first output), run on that cache, give the whole model's logits."""
    from pipeline.models.inference import cut_layer, layers_after, logit_model
    from pipeline.models.vgg import feature_model

    assemble_classifier(conv_base, head_for(conv_base), unfreeze).save(tmp_path / "classifier.keras")
    scorer, from_logits = logit_model(keras.saving.load_model(tmp_path / "classifier.keras"))
    assert from_logits and cut_layer(scorer, unfreeze) == last_frozen_layer(unfreeze)
    cached = feature_model(conv_base, unfreeze)(images)[0]
    top = layers_after(scorer, last_frozen_layer(unfreeze))
    assert top.layers[1].name == (VGG16_CONV_LAYERS[-unfreeze] if unfreeze else "head_pool")
    assert_float32_close(top(cached), scorer(images))  # the cache and the whole: two computations (conftest)
