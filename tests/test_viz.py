"""Tests of pipeline.viz on tiny real Keras models and hand-made images (no downloads, no weights)."""

from __future__ import annotations

import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import assert_float32_close
from pipeline.models.graph import conv_and_pool_layer_names
from pipeline.viz import figure_to_png_bytes
from pipeline.viz.activations import (
    activation_maps,
    activation_maps_figures,
    activation_model,
    layer_outputs_model,
)
from pipeline.viz.classic import (
    apply_kernels,
    classic_kernels,
    classic_vs_learned_figure,
    gaussian_kernel,
    most_similar_kernels,
    sobel_kernels,
)
from pipeline.viz.confusion import confusion_matrix_figure, misclassified_figure
from pipeline.viz.curves import training_curves_figure
from pipeline.viz.gradcam import grad_cam, gradcam_figure
from pipeline.viz.kernels import kernel_grid
from pipeline.viz.patterns import (
    deprocess,
    filter_activations,
    filter_patterns,
    gradient_ascent,
    pattern_model,
    patterns_figure,
    start_images,
)

VGG_NAMES = [
    f"block{block}_{kind}"
    for block, convs in [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)]
    for kind in [f"conv{i}" for i in range(1, convs + 1)] + ["pool"]
]


def assert_renders(fig) -> None:
    assert figure_to_png_bytes(fig, dpi=40).startswith(b"\x89PNG")  # low dpi: just as strict, faster


def decoded_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


# ---------------------------------------------------------------- fixtures: tiny real models


@pytest.fixture(scope="module")
def flat_vgg() -> keras.Model:
    """A flat classifier like the pipeline's: raw RGB in, a preprocessing layer, VGG16's own
    layers (untrained, 32x32) re-applied to a new Input, then a sigmoid head. Re-applying
    gives every VGG layer two call nodes, the case `layer.output` gets wrong.
    """
    keras.utils.set_random_seed(0)
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(inputs)
    for layer in base.layers[1:]:
        x = layer(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = keras.layers.Dropout(0.5, name="head_dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head_output")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def baseline() -> keras.Model:
    """An MNIST-baseline-shaped Sequential convnet: (28, 28, 1) in, 10 softmax classes out."""
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def patch_images(count: int, size: int) -> np.ndarray:
    """(count, size, size, 1) black images with a bright square in the top-left quadrant."""
    images = np.zeros((count, size, size, 1), np.float32)
    images[:, 1 : size // 2 - 1, 1 : size // 2 - 1] = 1.0
    return images


def summing_model(output: str, dense_scale: float = 1.0) -> keras.Model:
    """A model whose Grad-CAM answer is known: 1x1 conv channels, global mean, Dense scores.

    "sigmoid": one channel = the image; p = sigmoid(scale * mean(image)).
    "softmax": channel 0 = the image, channel 1 = 1 - image; scores = their means.
    """
    channels = 1 if output == "sigmoid" else 2
    kernel = np.array([1.0, -1.0][:channels], np.float32).reshape(1, 1, 1, channels)
    bias = np.array([0.0, 1.0][:channels], np.float32)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(channels, 1, name="conv", kernel_initializer=keras.initializers.Constant(kernel),
                            bias_initializer=keras.initializers.Constant(bias))(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    identity = dense_scale * np.eye(channels, dtype=np.float32)
    outputs = keras.layers.Dense(channels, activation=output, kernel_initializer=keras.initializers.Constant(identity),
                                 bias_initializer="zeros")(x)
    return keras.Model(inputs, outputs)


# ---------------------------------------------------------------- classic filters


def test_gaussian_kernel_sums_to_one_is_symmetric_and_peaks_in_the_centre():
    kernel = gaussian_kernel(5, 1.0)
    assert kernel.shape == (5, 5)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(kernel, kernel.T)
    np.testing.assert_allclose(kernel, kernel[::-1, ::-1])
    assert np.unravel_index(kernel.argmax(), kernel.shape) == (2, 2)
    assert gaussian_kernel(5, 3.0)[0, 0] > kernel[0, 0]  # a wider sigma spreads the weight
    with pytest.raises(ValueError):
        gaussian_kernel(4, 1.0)


def test_sobel_x_finds_a_vertical_edge_and_nothing_in_flat_regions():
    image = np.zeros((12, 12), np.float32)
    image[:, 6:] = 1.0  # dark left half, bright right half
    out = apply_kernels(image, sobel_kernels())
    inner_x, inner_y = out["sobel_x"][1:-1], out["sobel_y"][1:-1]  # rows away from the zero padding
    np.testing.assert_allclose(inner_x[:, 5:7], 4.0)  # both columns beside the edge: 1 + 2 + 1
    np.testing.assert_allclose(inner_x[:, 1:4], 0.0, atol=1e-6)
    np.testing.assert_allclose(inner_x[:, 8:11], 0.0, atol=1e-6)
    np.testing.assert_allclose(inner_y[:, :-1], 0.0, atol=1e-6)  # no horizontal edge anywhere


def test_apply_kernels_is_the_cross_correlation_with_zero_padding():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(7, 9)).astype(np.float32)
    kernel = rng.normal(size=(3, 3)).astype(np.float32)
    padded = np.pad(image, 1)
    expected = np.array([[np.sum(padded[i : i + 3, j : j + 3] * kernel) for j in range(9)] for i in range(7)])
    got = apply_kernels(image, {"k": kernel})["k"]
    assert_float32_close(got, expected)  # oneDNN's conv against NumPy's float64 sums (conftest)
    flipped = apply_kernels(image, {"k": kernel[::-1, ::-1].copy()})["k"]
    assert not np.allclose(flipped, expected, atol=1e-3)  # a true convolution would differ


def test_apply_kernels_filters_the_grayscale_of_an_rgb_image():
    gray = np.random.default_rng(1).integers(0, 256, (6, 6)).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    kernels = classic_kernels(3, 1.0)
    for name, response in apply_kernels(rgb, kernels).items():
        np.testing.assert_allclose(response, apply_kernels(gray, kernels)[name], rtol=1e-4, atol=1e-3)


def test_most_similar_kernels_finds_a_planted_sobel_and_keeps_the_sign():
    learned = np.random.default_rng(2).normal(scale=0.1, size=(3, 3, 3, 6)).astype(np.float32)
    sobel = sobel_kernels()
    learned[..., 4] = 5 * np.repeat(sobel["sobel_x"][..., None], 3, axis=-1) / 3
    learned[..., 1] = -np.repeat(sobel["sobel_y"][..., None], 3, axis=-1)
    matches = most_similar_kernels(learned, sobel)
    assert matches["sobel_x"][0] == 4 and matches["sobel_x"][1] == pytest.approx(1.0, abs=1e-4)
    assert matches["sobel_y"][0] == 1 and matches["sobel_y"][1] == pytest.approx(-1.0, abs=1e-4)


def test_classic_vs_learned_figure_renders_with_and_without_learned_maps(flat_vgg):
    image = np.random.default_rng(3).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    kernels = classic_kernels(5, 1.0)
    learned = flat_vgg.get_layer("block1_conv1").get_weights()[0]
    maps = activation_maps(flat_vgg, image, ["block1_conv1"])["block1_conv1"]
    fig = classic_vs_learned_figure(image, kernels, apply_kernels(image, kernels), learned, maps, "block1_conv1")
    assert len([ax for ax in fig.axes if ax.images]) == 3 + 4 * len(kernels)
    assert_renders(fig)
    fig = classic_vs_learned_figure(image, kernels, apply_kernels(image, kernels), learned, None, "block1_conv1")
    assert_renders(fig)


# ---------------------------------------------------------------- kernels and activations


def test_kernel_grid_draws_one_rgb_picture_per_filter(flat_vgg):
    kernels = flat_vgg.get_layer("block1_conv1").get_weights()[0]
    fig = kernel_grid(kernels, "block1_conv1")
    images = [image for ax in fig.axes for image in ax.images]
    assert len(images) == 64
    assert images[0].get_array().shape == (3, 3, 3)
    assert 0.0 <= images[0].get_array().min() and images[0].get_array().max() <= 1.0
    assert_renders(fig)


def test_hidden_axes_draw_the_same_pixels_as_set_axis_off():
    # axes_off hides the Axis objects too (a titled image grid saves ~3x faster); nothing drawn may change.
    from pipeline.viz.common import axes_off, new_figure

    def titled_grid(turn_off) -> np.ndarray:
        fig = new_figure(4 * 1.3, 2 * 1.3 + 0.4)
        images = np.random.default_rng(3).uniform(size=(8, 28, 28))
        for index, (ax, image) in enumerate(zip(fig.subplots(2, 4).ravel(), images)):
            ax.imshow(image, cmap="gray")
            ax.set_title(f"{index} (flat)", fontsize=7)
            turn_off(ax)
        fig.suptitle("kernels")
        return decoded_png(figure_to_png_bytes(fig))

    plain, hidden = titled_grid(lambda ax: ax.set_axis_off()), titled_grid(axes_off)
    assert plain.shape == hidden.shape and plain.std() > 0
    np.testing.assert_array_equal(hidden, plain)


def test_kernel_grid_of_grayscale_kernels_is_centred_on_zero(baseline):
    kernels = baseline.get_layer("conv").get_weights()[0]
    fig = kernel_grid(kernels, "conv")
    limits = {image.get_clim() for ax in fig.axes for image in ax.images}
    assert len(limits) == 1  # one shared scale
    low, high = limits.pop()
    assert low == pytest.approx(-high) and high == pytest.approx(np.abs(kernels).max())
    assert_renders(fig)


def test_conv_and_pool_layer_names_in_order(flat_vgg, baseline):
    assert conv_and_pool_layer_names(flat_vgg) == VGG_NAMES
    assert conv_and_pool_layer_names(baseline) == ["conv", "pool"]


def test_activation_maps_match_the_model_and_work_with_reused_layers(flat_vgg, baseline):
    image = np.random.default_rng(4).uniform(0, 255, (32, 32, 3)).astype(np.float32)
    maps = activation_maps(flat_vgg, image, ["block1_conv1", "block2_pool"])
    assert maps["block1_conv1"].shape == (32, 32, 64) and maps["block2_pool"].shape == (8, 8, 128)
    direct = activation_model(flat_vgg, ["block2_pool"])(image[None])["block2_pool"]
    np.testing.assert_allclose(maps["block2_pool"], keras.ops.convert_to_numpy(direct)[0], rtol=1e-4, atol=1e-4)
    digit = np.random.default_rng(5).uniform(0, 1, (28, 28, 1)).astype(np.float32)
    assert activation_maps(baseline, digit, ["pool"])["pool"].shape == (13, 13, 8)


def test_layer_outputs_model_runs_a_fixed_size_model_at_another_size(flat_vgg):
    bigger = layer_outputs_model(flat_vgg, ["block1_conv1", "block3_pool"], (48, 48, 3))
    image = np.random.default_rng(6).uniform(0, 255, (1, 48, 48, 3)).astype(np.float32)
    outputs = bigger(image)
    assert tuple(outputs["block3_pool"].shape) == (1, 6, 6, 256)
    # same weights: the top-left 32x32 crop sees the same pixels, away from the crop's border
    small = activation_model(flat_vgg, ["block1_conv1"])(image[:, :32, :32])["block1_conv1"]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(outputs["block1_conv1"])[0, :31, :31],
        keras.ops.convert_to_numpy(small)[0, :31, :31], rtol=1e-4, atol=1e-4,
    )


def test_activation_figures_show_max_channels_with_name_and_shape():
    maps = {"block1_conv1": np.random.default_rng(7).uniform(size=(16, 16, 64)), "block1_pool": np.zeros((8, 8, 3))}
    figures = activation_maps_figures(maps, max_channels=12)
    assert list(figures) == ["block1_conv1", "block1_pool"]
    assert len(figures["block1_conv1"].axes) == 12 and len(figures["block1_pool"].axes) == 3
    assert "block1_conv1" in figures["block1_conv1"]._suptitle.get_text()
    assert "16x16x64" in figures["block1_conv1"]._suptitle.get_text()
    assert "(flat)" in figures["block1_pool"].axes[0].get_title()
    assert_renders(figures["block1_conv1"])


# ---------------------------------------------------------------- filter patterns


def test_gradient_ascent_increases_each_filters_activation(flat_vgg):
    feature_model = pattern_model(flat_vgg, "block2_conv1", 24)
    filters = [0, 5, 9]
    start = start_images(len(filters), 24, 3, (0.0, 255.0), seed=0)
    optimised = gradient_ascent(feature_model, start, filters, steps=5, learning_rate=0.05, value_span=255.0)
    before = filter_activations(feature_model, start, filters)
    after = filter_activations(feature_model, optimised, filters)
    assert np.all(after > before + 1e-3), (before, after)


def test_batched_ascent_equals_one_filter_at_a_time(flat_vgg):
    feature_model = pattern_model(flat_vgg, "block1_conv2", 16)
    start = start_images(2, 16, 3, (0.0, 255.0), seed=1)
    together = gradient_ascent(feature_model, start, [3, 7], steps=3, learning_rate=0.05, value_span=255.0)
    alone = [gradient_ascent(feature_model, start[i : i + 1], [f], 3, 0.05, 255.0)[0] for i, f in enumerate([3, 7])]
    np.testing.assert_allclose(together, np.stack(alone), rtol=1e-3, atol=1e-2)


def test_filter_patterns_are_bounded_cropped_uint8_images(flat_vgg, baseline):
    patterns = filter_patterns(flat_vgg, ["block1_conv1", "block5_conv1"], 2, 2, 0.05, 32, (0.0, 255.0), seed=0)
    assert list(patterns) == ["block1_conv1", "block5_conv1"]
    for images in patterns.values():
        assert images.shape == (2, 24, 24, 3) and images.dtype == np.uint8  # 32 minus a 4-pixel margin
        assert images.std() > 0
    digits = filter_patterns(baseline, ["conv"], 20, 2, 0.05, 28, (0.0, 1.0), seed=0)
    assert digits["conv"].shape[0] == 8  # only 8 filters exist
    assert_renders(patterns_figure({**patterns, **digits}))


def test_deprocess_centres_and_stretches():
    image = np.random.default_rng(8).normal(1000.0, 0.01, (40, 40, 3))
    shown = deprocess(image)
    assert shown.dtype == np.uint8 and shown.shape == (30, 30, 3)
    assert abs(shown.mean() - 128) < 3 and 50 < shown.std() < 75


# ---------------------------------------------------------------- Grad-CAM


def test_grad_cam_of_a_sigmoid_model_lights_up_the_bright_patch():
    model = summing_model("sigmoid")
    images = patch_images(2, 8)
    heatmaps = grad_cam(model, images, "conv", class_index=None)  # p > 0.5: class 1
    assert heatmaps.shape == (2, 8, 8) and heatmaps.max() == pytest.approx(1.0)
    np.testing.assert_allclose(heatmaps, images[..., 0])
    assert np.all(grad_cam(model, images, "conv", class_index=0) == 0)  # no evidence for class 0


def test_grad_cam_uses_logits_so_a_saturated_sigmoid_still_explains():
    model = summing_model("sigmoid", dense_scale=1000.0)
    images = patch_images(1, 8)
    assert float(model(images)[0, 0]) == 1.0  # the probability saturates in float32
    heatmap = grad_cam(model, images, "conv", class_index=1)[0]
    assert heatmap[2, 2] == pytest.approx(1.0) and heatmap[6, 6] == 0.0


def test_grad_cam_of_a_softmax_model_follows_the_class_index():
    model = summing_model("softmax")
    images = patch_images(1, 8)
    patch = grad_cam(model, images, "conv", class_index=0)[0]
    background = grad_cam(model, images, "conv", class_index=1)[0]
    assert patch[2, 2] == 1.0 and patch[6, 6] == 0.0
    assert background[6, 6] == 1.0 and background[2, 2] == 0.0
    np.testing.assert_allclose(grad_cam(model, images, "conv", None)[0], background)  # class 1 wins, 75% vs 25%


def test_grad_cam_on_the_flat_vgg_and_its_figure(flat_vgg):
    images = np.random.default_rng(9).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    heatmaps = grad_cam(flat_vgg, images, "block4_conv3", class_index=None)
    assert heatmaps.shape == (2, 4, 4) and heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    fig = gradcam_figure(images.astype(np.uint8), heatmaps, ["cat 0.7", "dog 0.6"])
    assert [ax.get_title() for ax in fig.axes] == ["cat 0.7", "dog 0.6"]
    assert_renders(fig)


# ---------------------------------------------------------------- curves and confusion


def test_training_curves_have_a_loss_and_an_accuracy_panel():
    history = pd.DataFrame({"epoch": [0, 1, 2], "loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.7, 0.8],
                            "accuracy": [0.5, 0.7, 0.8], "val_accuracy": [0.45, 0.65, 0.6]})
    fig = training_curves_figure(history)
    loss_ax, accuracy_ax = fig.axes
    assert (loss_ax.get_title(), accuracy_ax.get_title()) == ("loss", "accuracy")
    best = loss_ax.lines[-1]
    assert list(best.get_xdata()) == [1] and list(best.get_ydata()) == [0.7]  # lowest validation loss
    assert list(accuracy_ax.lines[-1].get_xdata()) == [1]  # highest validation accuracy
    assert_renders(fig)
    assert len(training_curves_figure(history[["epoch", "loss", "val_loss"]]).axes) == 1


def test_training_curves_draw_the_starting_weights_as_epoch_0_and_mark_them_when_best():
    history = pd.DataFrame({"epoch": [1, 2], "loss": [0.05, 0.04], "val_loss": [0.15, 0.13],
                            "accuracy": [0.98, 0.99], "val_accuracy": [0.96, 0.97]})
    fig = training_curves_figure(history, start={"loss": 0.12, "accuracy": 0.964})
    loss_ax, accuracy_ax = fig.axes
    validation = loss_ax.lines[1]
    assert list(validation.get_xdata()) == [0, 1, 2] and validation.get_ydata()[0] == 0.12
    assert list(loss_ax.lines[-1].get_xdata()) == [0], "the start had the lowest validation loss"
    assert list(accuracy_ax.lines[-1].get_xdata()) == [2]


@pytest.mark.parametrize("classes", [2, 10])
def test_confusion_matrix_writes_every_count(classes):
    cm = np.random.default_rng(classes).integers(0, 500, (classes, classes))
    names = [f"class{i}" for i in range(classes)]
    fig = confusion_matrix_figure(cm, names, "test")
    texts = [text.get_text() for text in fig.axes[0].texts]
    assert len(texts) == classes * classes
    assert texts == [str(count) for count in cm.ravel()]
    assert_renders(fig)
    with pytest.raises(ValueError):
        confusion_matrix_figure(cm, names[:-1], "test")


def test_misclassified_figure_shows_only_mistakes_for_gray_and_rgb():
    true = np.array([0, 1, 2, 1, 0])
    predicted = np.eye(3)[[0, 2, 2, 0, 1]]  # one-hot predictions: items 1, 3, 4 are wrong
    gray = np.random.default_rng(10).uniform(size=(5, 28, 28, 1)).astype(np.float32)
    fig = misclassified_figure(gray, true, predicted, ["zero", "one", "two"], max_items=2)
    assert [ax.get_title() for ax in fig.axes] == ["true one / pred two", "true one / pred zero"]
    assert_renders(fig)
    rgb = np.random.default_rng(11).integers(0, 256, (5, 20, 20, 3)).astype(np.uint8)
    fig = misclassified_figure(rgb, true, predicted, ["cat", "dog", "fox"], max_items=10)
    assert len(fig.axes) == 3
    assert_renders(fig)
    assert len(misclassified_figure(rgb, true, true, ["cat", "dog", "fox"], 10).texts) == 1
