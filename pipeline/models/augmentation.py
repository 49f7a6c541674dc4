"""Seeded random augmentation of photos: Keras preprocessing layers, reproducible per batch.

extract_features pushes augmented copies of the training photos through VGG16's frozen
layers once; because those layers never change, training on the cached rows is exactly
training the whole network on these augmented photos. `augment_batch` is a pure function of
(photos, factors, seed, copy, first row), so a test (or anyone) can rebuild any augmented
photo and check its cached activation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# The augmentation layers, in the order they are applied (each gets its own seed).
LAYERS = ("flip", "rotation", "zoom", "shift", "brightness", "contrast")


class AugmentationFactors(NamedTuple):
    """How strong each random change may be (features.augmentation in params.yaml)."""

    rotation: float  # fraction of a full turn, either way
    zoom: float  # fraction of the size, in or out
    shift: float  # fraction of the height and width, either way
    brightness: float  # fraction of the value range added or removed
    contrast: float  # contrast scaled by a factor in [1 - contrast, 1 + contrast]


def augmentation(factors: AugmentationFactors, seeds: tuple[int, ...]):
    """The augmentation as a Keras model: RGB photos in [0, 255] -> float32 photos in [0, 255].

    Random horizontal flip, rotation, zoom, shift (reflected borders), brightness and contrast,
    each drawn per photo; `seeds` gives one seed per layer of LAYERS. Active only when called
    with `training=True`, as Keras' preprocessing layers are.
    """
    import keras
    from keras import layers

    flip, rotation, zoom, shift, brightness, contrast = seeds
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=flip),
            layers.RandomRotation(factors.rotation, seed=rotation),
            layers.RandomZoom(factors.zoom, seed=zoom),
            layers.RandomTranslation(factors.shift, factors.shift, seed=shift),
            layers.RandomBrightness(factors.brightness, value_range=(0, 255), seed=brightness),
            layers.RandomContrast(factors.contrast, value_range=(0, 255), seed=contrast),
        ],
        name="augmentation",
    )


def batch_seeds(seed: int, copy: int, start: int) -> tuple[int, ...]:
    """Independent layer seeds for augmented copy `copy` of the batch whose first row is `start`."""
    state = np.random.SeedSequence([seed, copy, start]).generate_state(len(LAYERS))
    return tuple(int(value) for value in state)


def augment_batch(photos: np.ndarray, factors: AugmentationFactors, seed: int, copy: int, start: int) -> np.ndarray:
    """Augmented copy `copy` (1, 2, ...) of `photos`, a batch beginning at row `start` of its
    split: float32 in [0, 255], the same shape. Same arguments, same photos."""
    model = augmentation(factors, batch_seeds(seed, copy, start))
    augmented = model(photos.astype(np.float32), training=True)
    return np.clip(np.asarray(augmented), 0.0, 255.0)
