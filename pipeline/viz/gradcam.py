"""Grad-CAM (Selvaraju et al. 2017): where in the image a conv layer saw evidence for a class.

The class score's gradient with respect to the conv layer's output, averaged over space, weighs
each channel; the weighted sum of channels, through a ReLU (only evidence *for* the class),
is the heat map at the conv layer's resolution.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

from pipeline.models.graph import layer_output, logits_of, model_input, probability_layer
from pipeline.viz.common import image_grid, show_image

MAX_COLUMNS = 4
# Share of the heat map in the overlay: enough colour to read, enough image to recognise.
OVERLAY_ALPHA = 0.45


def score_model(model: keras.Model, conv_layer_name: str) -> keras.Model:
    """A model from `model`'s input to [the conv layer's output, the class scores].

    The scores are the logits when the model ends in a Dense layer with a sigmoid or softmax,
    as the Grad-CAM paper uses them: a confident prediction saturates the probability (p = 1.0
    in float32 has a zero gradient, hence a blank map), its logit does not. Otherwise, the
    model's output itself.
    """
    scores, _ = logits_of(model)
    return keras.Model(model_input(model), [layer_output(model, conv_layer_name), scores])


def chosen_scores(scores: tf.Tensor, class_index: int | None, threshold: float) -> tf.Tensor:
    """(N,) the score of the class to explain in each image, from (N, K) scores.

    K > 1: column `class_index`, or each image's top class when None. K == 1 (a single sigmoid
    unit, p = P(class 1)): class 1 uses the score, class 0 its negative (the logit of 1 - p;
    for a probability output, -p has the gradient of 1 - p); None picks each image's
    predicted class: score >= `threshold` (0 for a logit, 0.5 for a probability) means class 1.
    """
    if scores.shape[-1] > 1:
        if class_index is None:
            classes = tf.argmax(scores, axis=-1, output_type=tf.int32)
        else:
            classes = tf.fill(tf.shape(scores)[:1], class_index)
        return tf.gather(scores, classes, axis=1, batch_dims=1)
    score = scores[:, 0]
    if class_index is None:
        return tf.where(score >= threshold, score, -score)
    if class_index not in (0, 1):
        raise ValueError(f"a single-output model has classes 0 and 1, got class_index={class_index}")
    return score if class_index == 1 else -score


def grad_cam(model: keras.Model, images: np.ndarray, conv_layer_name: str, class_index: int | None) -> np.ndarray:
    """(N, h, w) Grad-CAM heat maps in [0, 1] at `conv_layer_name`'s resolution.

    In: (N, H, W, C) images in the model's input format; the conv layer to explain (usually the
    last one, e.g. "block5_conv3"); the class to explain, or None for each image's predicted
    class (see `chosen_scores` for a single sigmoid output). Each map is divided by its own
    maximum; a map with no positive evidence is all 0.
    """
    explainer = score_model(model, conv_layer_name)
    threshold = 0.0 if probability_layer(model) is not None else 0.5  # logits vs probabilities
    batch = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        conv_maps, scores = explainer(batch, training=False)
        score = chosen_scores(scores, class_index, threshold)
    grads = tape.gradient(score, conv_maps)
    channel_weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
    heatmaps = tf.nn.relu(tf.reduce_sum(channel_weights * conv_maps, axis=-1)).numpy()
    peaks = heatmaps.max(axis=(1, 2), keepdims=True)
    return np.divide(heatmaps, peaks, out=np.zeros_like(heatmaps), where=peaks > 0)


def gradcam_figure(images: np.ndarray, heatmaps: np.ndarray, titles: list[str]) -> Figure:
    """Each image with its (h, w) heat map stretched over it (jet colours, red = most evidence).

    In: (N, H, W, C) images (floats in [0, 1] or uint8/0..255, as `show_image`), (N, h, w)
    heat maps in [0, 1] (any h, w: drawn with bilinear smoothing over the image's extent),
    one title per image.
    """
    fig, axes = image_grid(len(images), MAX_COLUMNS, cell_inches=2.4)
    for image, heatmap, title, ax in zip(images, heatmaps, titles, axes):
        height, width = np.shape(image)[:2]
        show_image(ax, image)
        ax.imshow(
            heatmap,
            cmap="jet",
            alpha=OVERLAY_ALPHA,
            vmin=0.0,
            vmax=1.0,
            interpolation="bilinear",
            extent=(-0.5, width - 0.5, height - 0.5, -0.5),
        )
        ax.set_title(title, fontsize=8)
    fig.suptitle("Grad-CAM", fontsize=10)
    return fig
