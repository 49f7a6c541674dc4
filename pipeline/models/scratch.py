"""The small convnet trained from scratch on the photos: the classic four conv blocks of the
cats-vs-dogs lesson (Conv2D 3x3 + max pooling, x4), then Flatten, Dropout, Dense, output.

Raw RGB photos in [0, 255] in, like the VGG16 classifiers: the model resizes them to
`scratch.size` and rescales them to [0, 1] itself (normalisation belongs to the model), and
its optional augmentation layers act only while training.
"""

from __future__ import annotations

import keras
from keras import layers

from pipeline.errors import UserError
from pipeline.params import ScratchParams


def augmentation(p: ScratchParams, seed: int) -> list[keras.Layer]:
    """Random flips, rotations (`p.rotation` of a turn) and zooms (`p.zoom`), seeded."""
    return [
        layers.RandomFlip("horizontal", seed=seed, name="random_flip"),
        layers.RandomRotation(p.rotation, seed=seed, name="random_rotation"),
        layers.RandomZoom(p.zoom, seed=seed, name="random_zoom"),
    ]


def build_scratch_convnet(
    input_shape: tuple[int, ...], num_classes: int, p: ScratchParams, seed: int = 0
) -> keras.Model:
    """Resize, rescale, [augment], (Conv2D relu + MaxPooling2D) per `p.conv_filters`, Flatten,
    Dropout, Dense relu, output: one sigmoid unit for 2 classes, else a softmax.

    A stack that shrinks `p.size` pixels below one is a UserError naming the scratch params.
    """
    stack: list[keras.Layer] = []
    if tuple(input_shape[:2]) != (p.size, p.size):
        stack.append(layers.Resizing(p.size, p.size, name="resize"))
    stack.append(layers.Rescaling(1.0 / 255, name="rescale"))
    if p.augment:
        stack += augmentation(p, seed)
    for i, filters in enumerate(p.conv_filters, start=1):
        stack.append(layers.Conv2D(filters, p.kernel_size, activation="relu", name=f"conv{i}"))
        stack.append(layers.MaxPooling2D(2, name=f"pool{i}"))
    binary = num_classes == 2
    stack += [
        layers.Flatten(name="flatten"),
        layers.Dropout(p.dropout, name="dropout"),
        layers.Dense(p.dense_units, activation="relu", name="dense"),
        layers.Dense(1 if binary else num_classes, activation="sigmoid" if binary else "softmax", name="output"),
    ]
    try:
        return keras.Sequential([keras.Input(input_shape), *stack], name="scratch_convnet")
    except ValueError:
        raise UserError(
            f"scratch: {len(p.conv_filters)} conv blocks of kernel {p.kernel_size} shrink {p.size}x{p.size} "
            "photos to nothing; raise scratch.size or use fewer conv_filters"
        ) from None


def loss_for(num_classes: int) -> str:
    """The loss of the output above (integer labels): as the VGG16 stages' vgg_common.loss_for,
    kept here so that this model's stage does not depend on the VGG16 code."""
    return "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"
