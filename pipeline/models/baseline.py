"""The MNIST baseline convnet, built from params: reads top to bottom like its diagram."""

from __future__ import annotations

import keras
from keras import layers

from pipeline.errors import UserError
from pipeline.params import BaselineParams


def build_baseline(input_shape: tuple[int, ...], num_classes: int, p: BaselineParams) -> keras.Model:
    """Conv/pool stack -> Flatten -> Dense -> Dropout -> softmax.

    With `input_scale` other than 1 a Rescaling layer first multiplies the pixels (in [0, 1]
    as prepared) by it: 255 feeds the convolutions raw 0-255 values.

    Each conv layer but the last is followed by max pooling (the classic 32-64-64 stack);
    `pool_size: 0` leaves pooling out. A stack that shrinks the input below one pixel is a
    UserError naming the baseline params.
    """
    stack: list[keras.Layer] = []
    if p.input_scale != 1.0:  # the default model has no such layer: it stays as it was
        stack.append(layers.Rescaling(p.input_scale, name="input_scale"))
    for i, filters in enumerate(p.conv_filters, start=1):
        stack.append(
            layers.Conv2D(
                filters,
                p.kernel_size,
                strides=p.strides,
                padding=p.padding,
                activation="relu",
                name=f"conv{i}",
            )
        )
        if p.pool_size and i < len(p.conv_filters):
            stack.append(layers.MaxPooling2D(p.pool_size, name=f"pool{i}"))
    stack += [
        layers.Flatten(name="flatten"),
        layers.Dense(p.dense_units, activation="relu", name="dense"),
        layers.Dropout(p.dropout, name="dropout"),
        layers.Dense(num_classes, activation="softmax", name="output"),
    ]
    try:
        return keras.Sequential([keras.Input(input_shape), *stack], name="baseline")
    except ValueError:
        raise UserError(
            f"baseline: conv_filters/kernel_size/strides/padding/pool_size shrink the "
            f"{input_shape[0]}x{input_shape[1]} input to nothing; "
            "use padding: same, smaller strides or fewer layers"
        ) from None
