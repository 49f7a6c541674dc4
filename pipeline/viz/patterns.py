"""Filter patterns: the input image each conv filter responds to most, found by gradient ascent.

After Chollet, "Deep Learning with Python" (2nd ed.), chapter 9, "Visualizing convnet filters":
start from faint noise, repeatedly step the image along the (normalised) gradient of the
filter's mean activation, ignoring a border, then stretch the result into a displayable image.

Three changes, for speed, for settings that carry across models, and against blank results:
- all filters of one layer are optimised together, as one batch of images, each image pushing
  its own filter; the loss is the sum of the per-image objectives. The images do not interact
  (no batch statistics at inference), so each one gets exactly its own filter's gradient; a
  layer costs one traced graph and `steps` batched passes instead of that per filter. (On a
  2-core CPU that measured 20-30% less CPU time for 8 filters at 128 px, not 8x: conv work
  still grows with the number of images; what is saved is per-filter tracing and dispatch.)
- `learning_rate` is a fraction of the input range per step (e.g. 0.05 of 0..255), because the
  gradient is normalised to unit RMS per image. The same value then suits the MNIST baseline
  (inputs in [0, 1]) and VGG16 (raw RGB in [0, 255]), whatever the image size.
- the objective sees a conv layer's ReLU as a leaky ReLU, so filters that are silent on the
  start noise still get a gradient (see `pattern_model`).

For VGG16 the ascent runs in the raw RGB space in front of the model's preprocessing layer.
That preprocessing (RGB->BGR and mean subtraction) is an affine map, so ascending in either
space follows the same path; the raw space is chosen because its result is already an RGB
image, with no BGR flip or mean to undo before display.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

from pipeline.models.graph import PreActivation, layer_input, layer_output, model_input
from pipeline.viz.activations import at_input_shape
from pipeline.viz.common import axes_off, new_figure

# Activation pixels ignored at each edge: the zero padding makes border pixels see a
# different input than the others, and maximising them gives edge artefacts (as in the book).
BORDER = 2
# Slope of the leaky ReLU that replaces a conv layer's ReLU in the objective (see pattern_model).
LEAKY_SLOPE = 0.01
# Start images: mid-gray plus uniform noise of +-10% of the input range (the book's 0.4..0.6).
START_NOISE = 0.1
# Deprocessing as in the book: standardise, then 64 gray levels per standard deviation
# around 128; crop the margin the loss ignored (25 of 200 pixels in the book).
DISPLAY_STD = 64.0
DISPLAY_MEAN = 128.0
CROP_FRACTION = 0.125


def pattern_model(model: keras.Model, layer_name: str, size: int) -> keras.Model:
    """A model from (size, size, channels) images in `model`'s input format to what the ascent
    maximises at `layer_name`, sharing `model`'s weights.

    For a conv layer with a ReLU that is its response through a *leaky* ReLU instead: a filter
    that is negative everywhere on the start noise (common in deep layers) has a zero gradient
    after a ReLU and would stay noise, while the small negative slope still shows which way
    to go; once the filter fires, the positive part dominates as in the book. (The plain
    pre-activation would not do: for block1 it is linear in the image and its maximum is a
    flat colour.) Other layers: their output.
    """
    layer = model.get_layer(layer_name)
    if isinstance(layer, keras.layers.Conv2D) and layer.activation is keras.activations.relu:
        response = PreActivation(layer, name=f"{layer_name}_pre_activation")(layer_input(model, layer_name))
        target = keras.layers.LeakyReLU(negative_slope=LEAKY_SLOPE)(response)
    else:
        target = layer_output(model, layer_name)
    channels = model.inputs[0].shape[-1]
    return at_input_shape(keras.Model(model_input(model), target), (size, size, channels))


def start_images(count: int, size: int, channels: int, value_range: tuple[float, float], seed: int) -> np.ndarray:
    """(count, size, size, channels) float32 faint noise around the middle of `value_range`."""
    low, high = value_range
    noise = np.random.default_rng(seed).uniform(-START_NOISE, START_NOISE, (count, size, size, channels))
    return ((low + high) / 2 + (high - low) * noise).astype(np.float32)


def filter_means(activations: tf.Tensor, filter_indices: tf.Tensor) -> tf.Tensor:
    """(N,) mean activation of image i's own filter `filter_indices[i]`, without the border.

    The border shrinks on small maps so at least the centre pixel always counts.
    """
    height, width = activations.shape[1], activations.shape[2]
    border = min(BORDER, (height - 1) // 2, (width - 1) // 2)
    inner = activations[:, border : height - border, border : width - border, :]
    channel_means = tf.reduce_mean(inner, axis=[1, 2])  # (N, channels)
    return tf.gather(channel_means, filter_indices, axis=1, batch_dims=1)


def filter_activations(feature_model: keras.Model, images: np.ndarray, filter_indices: Sequence[int]) -> np.ndarray:
    """(N,) the ascent's objective for each image: its own filter's mean activation (no border)."""
    activations = feature_model(tf.convert_to_tensor(images, tf.float32), training=False)
    return filter_means(activations, tf.constant(filter_indices, tf.int32)).numpy()


def gradient_ascent(
    feature_model: keras.Model,
    images: np.ndarray,
    filter_indices: Sequence[int],
    steps: int,
    learning_rate: float,
    value_span: float,
) -> np.ndarray:
    """Images moved `steps` times up the gradient of their own filter's mean activation.

    In: (N, H, W, C) start images in the model's input format, one filter index per image,
    the step size as a fraction of `value_span` (the width of the input range). Out: the
    (N, H, W, C) float32 images, unclipped, as the book does. Costs `steps` batched passes.
    """
    indices = tf.constant(filter_indices, tf.int32)
    step_size = tf.constant(learning_rate * value_span, tf.float32)

    # One traced graph per call (per layer): the eager loop around it only dispatches.
    @tf.function
    def ascent_step(batch: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(batch)
            objective = tf.reduce_sum(filter_means(feature_model(batch, training=False), indices))
        grads = tape.gradient(objective, batch)
        # Per-image unit RMS: each filter moves its image by the same amount, however weak it is.
        rms = tf.sqrt(tf.reduce_mean(tf.square(grads), axis=[1, 2, 3], keepdims=True))
        return batch + step_size * grads / (rms + 1e-8)

    batch = tf.convert_to_tensor(images, tf.float32)
    for _ in range(steps):
        batch = ascent_step(batch)
    return batch.numpy()


def deprocess(image: np.ndarray) -> np.ndarray:
    """An optimised (H, W, C) float image as a displayable uint8 image, cropped of its margin.

    Centred and scaled to 64 gray levels per standard deviation around 128 (over all
    channels together, so the colours keep their balance), then clipped to 0..255.
    """
    image = np.asarray(image, dtype=np.float64)
    image = (image - image.mean()) / (image.std() + 1e-5)
    image = np.clip(image * DISPLAY_STD + DISPLAY_MEAN, 0, 255).astype(np.uint8)
    margin = int(round(image.shape[0] * CROP_FRACTION))
    if margin > 0 and image.shape[0] > 2 * margin and image.shape[1] > 2 * margin:
        image = image[margin:-margin, margin:-margin]
    return image


def layer_patterns(
    feature_model: keras.Model,
    filter_indices: Sequence[int],
    steps: int,
    learning_rate: float,
    value_range: tuple[float, float],
    seed: int,
) -> np.ndarray:
    """(N, h, w, C) uint8 patterns of the given filters of `feature_model`'s output, in one batch.

    The image size and channel count are those of `feature_model`'s input (see `pattern_model`).
    """
    _, size, _, channels = feature_model.inputs[0].shape
    start = start_images(len(filter_indices), size, channels, value_range, seed)
    span = value_range[1] - value_range[0]
    optimised = gradient_ascent(feature_model, start, filter_indices, steps, learning_rate, span)
    return np.stack([deprocess(image) for image in optimised])


def filter_patterns(
    model: keras.Model,
    layer_names: Sequence[str],
    filters_per_layer: int,
    steps: int,
    learning_rate: float,
    size: int,
    value_range: tuple[float, float],
    seed: int,
) -> dict[str, np.ndarray]:
    """Patterns of the first `filters_per_layer` filters of each named conv layer.

    In: a model taking (H, W, C) images with values in `value_range` (e.g. (0, 255) for the
    VGG16 classifier, (0, 1) for the MNIST baseline); the ascent settings; `size` the square
    image size (any size the conv layers accept). Out: {layer name: (n, h, w, C) uint8}.
    Cost: len(layer_names) x steps forward/backward passes of a batch of `filters_per_layer`.
    """
    patterns = {}
    for name in layer_names:
        feature_model = pattern_model(model, name, size)
        count = min(filters_per_layer, feature_model.outputs[0].shape[-1])
        patterns[name] = layer_patterns(feature_model, list(range(count)), steps, learning_rate, value_range, seed)
    return patterns


def patterns_figure(patterns: dict[str, np.ndarray], title: str = "filter patterns") -> Figure:
    """One row per layer, one panel per filter pattern ((n, h, w, C) uint8 per layer, C = 1 or 3)."""
    columns = max(len(images) for images in patterns.values())
    fig = new_figure(columns * 1.3, len(patterns) * 1.45 + 0.4)
    axes = fig.subplots(len(patterns), columns, squeeze=False)
    for row, (name, images) in enumerate(patterns.items()):
        for column, ax in enumerate(axes[row]):
            axes_off(ax)
            if column < len(images):
                image = images[column]
                ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
                ax.set_title(f"{name} #{column}" if column == 0 else f"#{column}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig
