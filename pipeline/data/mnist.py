"""MNIST-style arrays: checks, normalisation, one-hot labels and a stratified split."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.errors import UserError


def check_pair(images: np.ndarray, labels: np.ndarray, split: str) -> None:
    """An images/labels pair must be (N, H, W) and (N,) with the same N."""
    if images.ndim != 3:
        raise UserError(f"{split} images: expected rank 3 (N, H, W), got shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(
            f"{split}: {len(images)} images but labels of shape {labels.shape}; "
            "the images and labels files do not belong together"
        )


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, H, W, 1) in [0, 1]."""
    return (images.astype(np.float32) / np.float32(255.0))[..., np.newaxis]


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer labels -> float32 one-hot rows: keras.utils.to_categorical's numbers, in
    numpy (importing Keras loads TensorFlow, seconds and hundreds of MB for a lookup)."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return np.eye(num_classes, dtype=np.float32)[labels]


def stratified_split(labels: np.ndarray, validation_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation): a seeded split with each class in proportion."""
    indices = np.arange(len(labels))
    if validation_size == 0:
        return indices, indices[:0]
    if validation_size >= len(labels):
        raise UserError(
            f"mnist.validation_size: {validation_size} is not below the "
            f"{len(labels)} training images; choose a smaller number"
        )
    try:
        train, validation = train_test_split(indices, test_size=validation_size, stratify=labels, random_state=seed)
    except ValueError as exc:  # e.g. fewer validation images than classes
        raise UserError(f"mnist.validation_size: {validation_size} does not work: {exc}") from None
    return np.sort(train), np.sort(validation)
