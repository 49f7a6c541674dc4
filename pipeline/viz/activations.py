"""What the conv and pooling layers of a model output for one image, and models that expose it."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from matplotlib.figure import Figure

from pipeline.models.graph import layer_output, model_input
from pipeline.viz.common import image_grid

MAX_COLUMNS = 8


def at_input_shape(model: keras.Model, input_shape: tuple[int | None, ...] | None) -> keras.Model:
    """`model`, or the same layers (same weights) re-applied to an Input of `input_shape`.

    Keras refuses inputs of a shape a functional model was not built for (e.g. the VGG16
    classifier built for 150x150 images, run at the filter patterns' size), although conv and
    pooling layers accept any size. So the graph is re-applied to a new Input with the same
    layer objects (`clone_model` with an identity clone function). `model` must not contain
    size-bound layers (Flatten + Dense): truncate it first.
    """
    built_for = tuple(model.inputs[0].shape[1:])
    if input_shape is None or all(b is None or b == s for b, s in zip(built_for, input_shape)):
        return model
    new_input = keras.Input(shape=input_shape, dtype=model.inputs[0].dtype)
    return keras.models.clone_model(
        model,
        input_tensors=[new_input] if isinstance(model.input, list) else new_input,
        clone_function=lambda layer: layer,  # the same layer objects, hence the same weights
    )


def layer_outputs_model(
    model: keras.Model, layer_names: Sequence[str], input_shape: tuple[int | None, ...] | None = None
) -> keras.Model:
    """A model from `model`'s input to a dict {layer name: that layer's output}, sharing weights.

    `input_shape` (without batch) runs it at another image size (see `at_input_shape`).
    """
    extractor = keras.Model(model_input(model), {name: layer_output(model, name) for name in layer_names})
    return at_input_shape(extractor, input_shape)


def activation_model(model: keras.Model, layer_names: Sequence[str]) -> keras.Model:
    """A model mapping `model`'s input to {layer name: activation} for each of `layer_names`."""
    return layer_outputs_model(model, layer_names)


def activation_maps(model: keras.Model, image: np.ndarray, layer_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The (H', W', C) activations of one image (in the model's input format) at each named layer.

    Runs the image at its own size, so images of any size work with the conv layers.
    """
    extractor = layer_outputs_model(model, layer_names, tuple(np.shape(image)))
    outputs = extractor(np.asarray(image, dtype=np.float32)[np.newaxis], training=False)
    return {name: keras.ops.convert_to_numpy(outputs[name])[0] for name in layer_names}


def layer_activation_figure(layer_name: str, activation: np.ndarray, max_channels: int) -> Figure:
    """The first `max_channels` channels of one layer's (H, W, C) activation, one panel each.

    Each channel is drawn with its own colour range (viridis): channels differ in scale by
    orders of magnitude, and the question is *where* each one fires. A channel that is
    constant (often all 0 after ReLU: the filter found nothing) is drawn flat and labelled.
    """
    activation = np.asarray(activation)
    if activation.ndim != 3:
        raise ValueError(f"expected an (H, W, C) activation for {layer_name!r}, got shape {activation.shape}")
    count = min(max_channels, activation.shape[-1])
    fig, axes = image_grid(count, MAX_COLUMNS)
    for channel, ax in enumerate(axes):
        values = activation[..., channel]
        ax.imshow(values, cmap="viridis", interpolation="nearest")
        flat = " (flat)" if values.min() == values.max() else ""
        ax.set_title(f"{channel}{flat}", fontsize=7)
    height, width, channels = activation.shape
    fig.suptitle(f"{layer_name}  {height}x{width}x{channels}  (first {count} channels)", fontsize=9)
    return fig


def activation_maps_figures(maps: dict[str, np.ndarray], max_channels: int) -> dict[str, Figure]:
    """One figure per layer (`layer_activation_figure`), keyed and ordered like `maps`."""
    return {name: layer_activation_figure(name, activation, max_channels) for name, activation in maps.items()}


def conv_figures(model: keras.Model, image: np.ndarray, kernels_title: str) -> dict[str, Figure]:
    """A convnet's first conv kernels (kernels.png) and the activation maps of `image` at each
    conv and pooling layer (activations_<layer>.png), as its training stage draws them."""
    from pipeline.models.graph import conv_and_pool_layer_names, conv_layer_names
    from pipeline.viz.kernels import kernel_grid

    first_conv = model.get_layer(conv_layer_names(model)[0])
    result = {"kernels.png": kernel_grid(first_conv.get_weights()[0], f"{first_conv.name}: {kernels_title}")}
    maps = activation_maps(model, image, conv_and_pool_layer_names(model))
    for name, figure in activation_maps_figures(maps, max_channels=16).items():
        result[f"activations_{name}.png"] = figure
    return result
