"""VGG16 transfer learning: the convolutional base, where to cut it, the head, the whole.

Fine-tuning trains the top `unfreeze` conv layers of block5 and the head. Everything below
the cut (`last_frozen_layer`) never changes, so its output is computed once per image and
cached; `split_at_last_frozen_layer` returns the two halves, built from the SAME layer
objects as the conv base, so training `top` on cached activations trains the base itself
and `assemble_classifier` then gives the exact same network, flat, on raw images.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers

from pipeline.errors import UserError
from pipeline.models.graph import PREPROCESSING, apply_layers, path_layers

# The conv base's layers, input excluded, in order (keras.applications.VGG16 names).
VGG16_LAYERS: tuple[str, ...] = (
    "block1_conv1", "block1_conv2", "block1_pool",
    "block2_conv1", "block2_conv2", "block2_pool",
    "block3_conv1", "block3_conv2", "block3_conv3", "block3_pool",
    "block4_conv1", "block4_conv2", "block4_conv3", "block4_pool",
    "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool",
)  # fmt: skip
VGG16_CONV_LAYERS: tuple[str, ...] = tuple(name for name in VGG16_LAYERS if "_conv" in name)

# Only block5's convolutions may be unfrozen: below it, the cached activations would be
# too large to be worth caching (block4_conv3 is 4x block4_pool's size).
MAX_UNFREEZE = 3

# ImageNet channel means in BGR order, as keras.applications.vgg16.preprocess_input uses.
IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)

HEAD_POOLINGS = {"flatten": layers.Flatten, "gap": layers.GlobalAveragePooling2D}


def last_frozen_layer(unfreeze: int) -> str:
    """The layer whose output is cached when the top `unfreeze` (0-3) conv layers train.

    3 -> "block4_pool", 2 -> "block5_conv1", 1 -> "block5_conv2", 0 -> "block5_pool".
    """
    if not 0 <= unfreeze <= MAX_UNFREEZE:
        raise ValueError(f"unfreeze must be between 0 and {MAX_UNFREEZE}, got {unfreeze}")
    if unfreeze == 0:
        return VGG16_LAYERS[-1]
    first_trainable = VGG16_CONV_LAYERS[-unfreeze]
    return VGG16_LAYERS[VGG16_LAYERS.index(first_trainable) - 1]


def build_conv_base(weights: str | None, input_shape: tuple[int, ...]) -> keras.Model:
    """VGG16 without its classifier, for images of `input_shape` (height, width, 3).

    `weights` is None (random), "imagenet" (Keras downloads them) or the path of a
    notop weights file (.h5 or .weights.h5); a file that does not fit is a UserError.
    """
    if weights is None or weights == "imagenet":
        return _vgg16(weights, input_shape)
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"VGG16 weights file {path} does not exist: check vgg16.weights")
    conv_base = _vgg16(None, input_shape)
    try:
        # Keras warns once per unmatched layer before raising; the error says it all.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conv_base.load_weights(str(path))
    except (ValueError, OSError, KeyError) as err:
        raise UserError(f"{path} does not hold VGG16 notop weights: {_first_line(err)}") from err
    return conv_base


def _vgg16(weights: str | None, input_shape: tuple[int, ...]) -> keras.Model:
    return keras.applications.VGG16(include_top=False, weights=weights, input_shape=tuple(input_shape))


def _first_line(err: Exception) -> str:
    """Keras' loading errors run to pages; their first line (up to its example) says why."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = lines[0].split(" Example error message")[0] if lines else type(err).__name__
    return first[:200]


def VGGPreprocess(name: str = PREPROCESSING) -> layers.Conv2D:  # noqa: N802 - used like a layer class
    """keras.applications.vgg16.preprocess_input as a layer: RGB [0, 255] -> BGR - means.

    A frozen 1x1 convolution whose kernel permutes the channels and whose bias subtracts
    the ImageNet means: exact (each output is one input times 1 plus zeros), and a built-in
    layer, so a saved classifier loads with plain `keras.models.load_model` (or MLflow)
    without this package, and takes raw uint8 or float RGB photos.
    """
    layer = layers.Conv2D(3, 1, trainable=False, name=name)
    layer.build((None, None, None, 3))
    permutation = np.zeros((1, 1, 3, 3), dtype="float32")
    for out_channel, in_channel in enumerate((2, 1, 0)):
        permutation[0, 0, in_channel, out_channel] = 1.0
    layer.set_weights([permutation, -np.asarray(IMAGENET_BGR_MEANS, dtype="float32")])
    return layer


def set_trainable_layers(conv_base: keras.Model, unfreeze: int) -> None:
    """Make exactly the top `unfreeze` conv layers of `conv_base` trainable, in place.

    The flag lives on the shared layer objects, so it holds in every model built from them
    (`top`, the fine-tuning model, the assembled classifier). Recompile after a change.
    """
    last_frozen_layer(unfreeze)  # validates the range
    trainable = set(VGG16_CONV_LAYERS[len(VGG16_CONV_LAYERS) - unfreeze :])
    conv_base.trainable = True  # a False here would hide every sublayer's weights
    for name in VGG16_LAYERS:
        conv_base.get_layer(name).trainable = name in trainable


def split_at_last_frozen_layer(conv_base: keras.Model, unfreeze: int) -> tuple[keras.Model, keras.Model]:
    """Cut `conv_base` after `last_frozen_layer(unfreeze)` into (frozen, top).

    `frozen`: preprocessed images -> activation at the cut (nothing trainable).
    `top`: that activation -> the conv base output (block5_pool), re-applying the same
    layer objects, with the top `unfreeze` conv layers trainable and nothing else.
    Sets the trainable flags of `conv_base`'s layers (see `set_trainable_layers`).
    """
    cut = last_frozen_layer(unfreeze)
    set_trainable_layers(conv_base, unfreeze)
    cut_output = conv_base.get_layer(cut).output
    frozen = keras.Model(conv_base.input, cut_output, name="vgg16_frozen")
    activation = keras.Input(shape=cut_output.shape[1:], name="activation")
    above_cut = VGG16_LAYERS[VGG16_LAYERS.index(cut) + 1 :]
    outputs = apply_layers(_named_layers(conv_base, above_cut), activation)
    top = keras.Model(activation, outputs, name="vgg16_top")
    return frozen, top


def build_head(input_shape: tuple[int, ...], num_classes: int, pooling: str, units: int, dropout: float) -> keras.Model:
    """The classifier on top of the conv base: pool, Dense(relu), Dropout, output.

    `input_shape` is the conv base's output shape (without the batch axis); `pooling` is
    "flatten" or "gap". The output is one sigmoid unit for 2 classes (the probability of
    class 1), else a softmax over `num_classes`.
    """
    if pooling not in HEAD_POOLINGS:
        raise ValueError(f"pooling must be one of {sorted(HEAD_POOLINGS)}, got {pooling!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    binary = num_classes == 2
    features = keras.Input(shape=tuple(input_shape), name="features")
    x = HEAD_POOLINGS[pooling](name="head_pool")(features)
    x = layers.Dense(units, activation="relu", name="head_dense")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(
        1 if binary else num_classes,
        activation="sigmoid" if binary else "softmax",
        name="head_output",
    )(x)
    return keras.Model(features, outputs, name="head")


def assemble_classifier(conv_base: keras.Model, head: keras.Model, unfreeze: int) -> keras.Model:
    """The whole classifier as one flat model: raw RGB images in [0, 255] -> head output.

    VGGPreprocess, then each VGG16 layer, then each head layer, applied in sequence
    (shared weights, no nested models: `get_layer("block5_conv3")` works for Grad-CAM).
    The top `unfreeze` conv layers are left trainable, the others frozen.
    """
    set_trainable_layers(conv_base, unfreeze)
    image = keras.Input(shape=conv_base.input.shape[1:], name="image")
    x = VGGPreprocess()(image)
    x = apply_layers(_named_layers(conv_base, VGG16_LAYERS), x)
    outputs = apply_layers(path_layers(head), x)
    return keras.Model(image, outputs, name="vgg16_classifier")


def build_finetune_model(top: keras.Model, head: keras.Model) -> keras.Model:
    """Cached activation -> `top`'s layers -> `head`'s layers, flat, weights shared.

    Trains the unfrozen conv layers and the head without recomputing the frozen ones. For
    head-only training, call `set_trainable_layers(conv_base, 0)` first: the block5
    layers above the cut then still run, frozen.
    """
    activation = keras.Input(shape=top.input.shape[1:], name="activation")
    x = apply_layers(path_layers(top), activation)
    outputs = apply_layers(path_layers(head), x)
    return keras.Model(activation, outputs, name="vgg16_finetune")


def standalone_copy(model: keras.Model) -> keras.Model:
    """A copy of `model` with its own layers and a snapshot of its weights.

    Why: a layer shared by several models reports its FIRST use as `layer.output` (here,
    inside the conv base), so `assembled.get_layer("block5_conv3").output` is not connected
    to the assembled model's input. In a copy, as in a model loaded from a .keras file,
    each layer has one use and Grad-CAM can tap any layer.
    """
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _named_layers(model: keras.Model, names: tuple[str, ...]) -> list[layers.Layer]:
    return [model.get_layer(name) for name in names]


def block_output_layer(block: int) -> str:
    """The layer whose output is VGG16 block `block`'s output (1-5): its max pooling."""
    name = f"block{block}_pool"
    if name not in VGG16_LAYERS:
        raise ValueError(f"VGG16 has blocks 1 to 5, not {block}")
    return name


def feature_model(conv_base: keras.Model, unfreeze: int, pooled_blocks: tuple[int, ...] = ()) -> keras.Model:
    """Raw RGB photos -> [activation at `last_frozen_layer(unfreeze)`, block5_pool, then the
    globally average-pooled output of each block in `pooled_blocks`], in ONE forward pass.

    The conv base's layers are applied once, in order (shared weights), and each output is
    tapped where it passes: the pooled block outputs cost a mean over each map, not a pass.
    Sets the trainable flags as `split_at_last_frozen_layer` does (the same cut).
    """
    cut = last_frozen_layer(unfreeze)
    set_trainable_layers(conv_base, unfreeze)
    image = keras.Input(shape=conv_base.input.shape[1:], name="image")
    x = VGGPreprocess()(image)
    tapped = {}
    for name in VGG16_LAYERS:
        x = conv_base.get_layer(name)(x)
        tapped[name] = x
    pooled = [
        layers.GlobalAveragePooling2D(name=f"block{block}_gap")(tapped[block_output_layer(block)])
        for block in pooled_blocks
    ]
    return keras.Model(image, [tapped[cut], tapped[VGG16_LAYERS[-1]], *pooled], name="feature_extractor")


def build_block_head(
    train_features: np.ndarray, num_classes: int, units: int, dropout: float, name: str = "block_head"
) -> keras.Model:
    """A small classifier on one block's pooled features (N, C): standardise, Dense(relu),
    Dropout, output (one sigmoid unit for 2 classes, else softmax).

    The standardisation is a Normalization layer adapted to `train_features` (their mean
    and variance per channel): blocks differ in scale, and the comparison across depth
    should be of what the features hold, not of how large they are.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    binary = num_classes == 2
    standardise = layers.Normalization(axis=-1, name="standardise")
    standardise.adapt(train_features)
    features = keras.Input(shape=train_features.shape[1:], name="features")
    x = standardise(features)
    x = layers.Dense(units, activation="relu", name="head_dense")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(
        1 if binary else num_classes, activation="sigmoid" if binary else "softmax", name="head_output"
    )(x)
    return keras.Model(features, outputs, name=name)
