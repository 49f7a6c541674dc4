"""Reading and re-wiring Keras models: layer outputs, conv layers, logits, chains of layers.

What viz, evaluation and the VGG16 pieces need to know about a model's graph, in one place:
- which layers are learned conv layers, and which are drawn as feature maps (one rule each);
- the output and input of a layer *in a given model* (`layer_output`, `layer_input`);
- a model's logits when it ends in a sigmoid or softmax (`logits_of`), shared by
  evaluation's loss and Grad-CAM;
- a list of layers applied in turn (`apply_layers`), and a model's single path of layers.
The private Keras API behind `layer_output`/`layer_input` is in pipeline/keras_internals.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from pipeline import keras_internals

# Conv layers that are not learned filters: VGG16's preprocessing is a frozen 1x1 convolution
# (pipeline.models.vgg.VGGPreprocess) that only reorders channels and subtracts means.
PREPROCESSING = "vgg_preprocess"
# Layers whose output is a spatial feature map worth drawing (global pooling is not spatial).
SPATIAL_LAYER_TYPES = (keras.layers.Conv2D, keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)


def conv_layer_names(model: keras.Model) -> list[str]:
    """The model's learned Conv2D layers, input to output (VGG16's preprocessing left out)."""
    return [
        layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D) and layer.name != PREPROCESSING
    ]


def conv_and_pool_layer_names(model: keras.Model) -> list[str]:
    """The learned conv layers and the (max/average, not global) 2-D pooling layers, in order."""
    return [
        layer.name for layer in model.layers if isinstance(layer, SPATIAL_LAYER_TYPES) and layer.name != PREPROCESSING
    ]


def model_input(model: keras.Model) -> Any:
    """`model`'s input in the structure a sub-model should take: the tensor when there is one.

    (A sub-model built on a one-element list warns when called with a plain array.)
    """
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def layer_output(model: keras.Model, layer_name: str) -> Any:
    """The symbolic output of `layer_name` inside `model`'s graph."""
    return keras_internals.node_output(keras_internals.layer_node(model, layer_name))


def layer_input(model: keras.Model, layer_name: str) -> Any:
    """The symbolic (first) input of `layer_name` inside `model`'s graph."""
    return keras_internals.node_input(keras_internals.layer_node(model, layer_name))


def apply_layers(layers: Sequence[keras.Layer], x: Any) -> Any:
    """`x` through each layer in turn (the same layer objects: weights are shared)."""
    for layer in layers:
        x = layer(x)
    return x


def path_layers(model: keras.Model) -> list[keras.Layer]:
    """The layers of a single-path model, in order, without its input layer."""
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def layer_chain(model: keras.Model) -> list[keras.Layer] | None:
    """`model`'s layers (input layer excluded) when each feeds exactly the next, else None."""
    chain = path_layers(model)
    if not chain or layer_input(model, chain[0].name) is not model.inputs[0]:
        return None
    for previous, layer in zip(chain, chain[1:]):
        if layer_input(model, layer.name) is not layer_output(model, previous.name):
            return None
    if layer_output(model, chain[-1].name) is not model.outputs[0]:
        return None
    return chain


class PreActivation(keras.layers.Layer):
    """A Dense or conv layer's output before its activation, computed with that layer's
    weights: the logits of a Dense sigmoid or softmax, a conv layer's response before ReLU."""

    def __init__(self, layer: keras.layers.Dense | keras.layers.Conv2D, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer

    def call(self, inputs):
        if isinstance(self.layer, keras.layers.Dense):
            outputs = keras.ops.matmul(inputs, self.layer.kernel)
        else:
            outputs = self.layer.convolution_op(inputs, self.layer.kernel)
        return outputs + self.layer.bias if self.layer.use_bias else outputs


def probability_layer(model: keras.Model) -> keras.layers.Dense | None:
    """The model's last layer if it is a Dense layer with a sigmoid or softmax, else None."""
    last = model.layers[-1]
    probabilities = (keras.activations.sigmoid, keras.activations.softmax)
    return last if isinstance(last, keras.layers.Dense) and last.activation in probabilities else None


def logits_of(model: keras.Model) -> tuple[Any, bool]:
    """(the symbolic logits, True) when `model` ends in a Dense sigmoid or softmax, else
    (its output, False). The logits share that Dense layer's weights.

    Why logits: from a probability of exactly 1.0 (float32 saturates near a logit of 17)
    neither the loss of a wrong prediction nor a gradient can be computed any more.
    """
    last = probability_layer(model)
    if last is None:
        return model.outputs[0], False
    return PreActivation(last, name=f"{last.name}_logits")(layer_input(model, last.name)), True
