"""Batched inference of several classifiers that share their first layers, in one pass.

The feature-extraction and fine-tuned VGG16 classifiers are identical below the fine-tuned
layers (block1..block4 keep their ImageNet weights): running both on every test photo would
compute those layers twice, and they are most of VGG16's cost. `predict_together` finds the
deepest layer up to which the models are the same (same layer names, types and weights),
runs that part once per batch, and branches into each model's remaining layers.

When those first layers' outputs are already cached (extract_features' activations at the
last frozen layer), `layers_after` gives the rest of a model, to run on the cache alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

from pipeline.models.graph import (
    apply_layers,
    conv_and_pool_layer_names,
    conv_layer_names,
    layer_chain,
    layer_output,
    logits_of,
)


def logit_model(model: keras.Model) -> tuple[keras.Model, bool]:
    """(`model` ending in its logits, True) when its last layer is a Dense sigmoid or softmax,
    else (`model`, False).

    Why: from a probability of exactly 1.0 (float32 saturates near a logit of 17) the loss
    of a wrong prediction can no longer be computed; Keras' own `evaluate` uses the logits
    then. The returned model shares every weight with `model`.
    """
    logits, from_logits = logits_of(model)
    if not from_logits:
        return model, False
    return keras.Model(model.inputs, logits, name=f"{model.name}_logits"), True


def _same_layer(first: keras.Layer, second: keras.Layer) -> bool:
    if first.name != second.name or type(first) is not type(second):
        return False
    if first.get_config() != second.get_config():
        return False
    weights = first.get_weights(), second.get_weights()
    return len(weights[0]) == len(weights[1]) and all(np.array_equal(a, b) for a, b in zip(*weights))


def shared_depth(chains: Sequence[Sequence[keras.Layer]]) -> int:
    """How many leading layers every chain has in common (0 = none), never the last layer."""
    depth = 0
    shortest = min(len(chain) for chain in chains)
    while depth < shortest - 1 and all(_same_layer(chains[0][depth], chain[depth]) for chain in chains[1:]):
        depth += 1
    return depth


def split_models(models: Sequence[keras.Model]) -> tuple[keras.Model, list[keras.Model]] | None:
    """(the shared first layers as one model, each model's remaining layers as a model).

    Built from the models' own layers (same weights, nothing copied); `tops[i](shared(x))`
    is `models[i](x)`. None when a model is not a simple chain of layers, the models take
    different inputs, or they share no layer.
    """
    found = [layer_chain(model) for model in models]
    chains = [chain for chain in found if chain is not None]
    if len(chains) != len(found):
        return None
    if len({tuple(model.inputs[0].shape[1:]) for model in models}) != 1:
        return None
    depth = shared_depth(chains)
    if depth == 0:
        return None
    image = keras.Input(shape=models[0].inputs[0].shape[1:], dtype=models[0].inputs[0].dtype)
    shared = apply_layers(chains[0][:depth], image)
    tops = []
    for model, chain in zip(models, chains):
        features = keras.Input(shape=shared.shape[1:], dtype=shared.dtype)
        tops.append(keras.Model(features, apply_layers(chain[depth:], features), name=f"{model.name}_top"))
    return keras.Model(image, shared, name="shared_layers"), tops


def predict_together(models: Sequence[keras.Model], images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Each model's outputs on `images`, batched, computing the layers they share once.

    In: models taking the same input, images in that input's format (uint8 is fine: each
    batch is cast on its own, so the whole set is never held as float32). Out: one array per
    model, in order, equal to `model.predict(images)` up to float rounding. Models that share
    no layer with the others (a convnet from scratch beside two VGG16 classifiers) run apart,
    so they do not keep the others from sharing theirs.
    """
    groups = sharing_groups(models)
    if len(groups) > 1:
        outputs: dict[int, np.ndarray] = {}
        for group in groups:
            together = predict_together([models[i] for i in group], images, batch_size)
            outputs.update(zip(group, together))
        return [outputs[i] for i in range(len(models))]
    split = split_models(models) if len(models) > 1 else None
    if split is None:
        return [model.predict(images, batch_size=batch_size, verbose=0) for model in models]
    shared, tops = split
    batches: list[list[np.ndarray]] = [[] for _ in models]
    for start in range(0, len(images), batch_size):
        features = shared.predict_on_batch(images[start : start + batch_size])
        for top, collected in zip(tops, batches):
            collected.append(np.asarray(top.predict_on_batch(features)))
    return [np.concatenate(collected) for collected in batches]


def sharing_groups(models: Sequence[keras.Model]) -> list[list[int]]:
    """The indices of `models`, grouped (in order) with the first model they share layers with."""
    groups: list[list[int]] = []
    for i, model in enumerate(models):
        for group in groups:
            if split_models([models[group[0]], model]) is not None:
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def cut_layer(model: keras.Model, unfreeze: int) -> str:
    """The layer of a VGG16-like classifier below its top `unfreeze` learned conv layers:
    the one before the `unfreeze`-th last conv layer, or for 0 the last conv or pooling layer
    (the head's input). For VGG16 it is `pipeline.models.vgg.last_frozen_layer(unfreeze)`,
    the layer whose output extract_features caches."""
    chain = layer_chain(model)
    convs = conv_layer_names(model)
    if chain is None or not 0 <= unfreeze <= len(convs):
        raise ValueError(f"{model.name}: not a chain of layers with {unfreeze} conv layers to keep on top")
    if unfreeze == 0:
        return conv_and_pool_layer_names(model)[-1]
    names = [layer.name for layer in chain]
    return names[names.index(convs[-unfreeze]) - 1]


def layers_after(model: keras.Model, layer_name: str) -> keras.Model:
    """`model`'s layers after `layer_name` as a model of their own (the same layer objects:
    weights shared), taking that layer's output: `layers_after(model, name)(x)` is `model`'s
    output when `x` is what `name` output. ValueError when `model` is not a chain of layers."""
    chain = layer_chain(model)
    if chain is None:
        raise ValueError(f"{model.name}: not a chain of layers")
    names = [layer.name for layer in chain]
    cut = layer_output(model, layer_name)
    activation = keras.Input(shape=cut.shape[1:], dtype=cut.dtype, name=f"{layer_name}_output")
    outputs = apply_layers(chain[names.index(layer_name) + 1 :], activation)
    return keras.Model(activation, outputs, name=f"{model.name}_after_{layer_name}")


def predict_batches(model: keras.Model, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """`model` on `inputs` in batches of `batch_size`: only one batch of a memory-mapped
    array (np.load(..., mmap_mode="r")) is read into memory at a time."""
    outputs = [
        np.asarray(model.predict_on_batch(np.asarray(inputs[start : start + batch_size])))
        for start in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(outputs)
