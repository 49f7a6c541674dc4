"""The Dense-only MNIST model: every pixel is its own input, so a digit moved by one pixel
is, to it, a different pattern (the convnet's counterpart in the translation test)."""

from __future__ import annotations

import keras
from keras import layers

from pipeline.params import DenseParams


def build_dense(input_shape: tuple[int, ...], num_classes: int, p: DenseParams) -> keras.Model:
    """Flatten -> one ReLU Dense layer per `p.units` entry -> Dropout -> softmax."""
    stack: list[keras.Layer] = [layers.Flatten(name="flatten")]
    for i, units in enumerate(p.units, start=1):
        stack.append(layers.Dense(units, activation="relu", name=f"dense{i}"))
    stack += [
        layers.Dropout(p.dropout, name="dropout"),
        layers.Dense(num_classes, activation="softmax", name="output"),
    ]
    return keras.Sequential([keras.Input(input_shape), *stack], name="dense")
