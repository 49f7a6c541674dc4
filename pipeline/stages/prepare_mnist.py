"""prepare_mnist: IDX files -> data/prepared/mnist.npz.

float32 pixels in [0, 1] with a channel axis, one-hot labels, and a seeded stratified
validation split carved from the training set; the test set is left as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import catalog
from pipeline.data.idx import parse_idx
from pipeline.data.mnist import check_pair, normalize, one_hot, stratified_split
from pipeline.errors import UserError
from pipeline.files import write_npz
from pipeline.params import load_params

STAGE = catalog.STAGES["prepare_mnist"]
RAW = catalog.MNIST_RAW
OUT = catalog.MNIST


def read_split(raw: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = raw / f"{split}_images.idx", raw / f"{split}_labels.idx"
    images = parse_idx(images_file.read_bytes(), str(images_file), rank=3)
    labels = parse_idx(labels_file.read_bytes(), str(labels_file), rank=1)
    check_pair(images, labels, split)
    return images, labels.astype(np.int64)


def prepare_mnist(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    validation_size: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Raw uint8 images and integer labels -> the arrays of mnist.npz."""
    (train_images, train_labels), (test_images, test_labels) = train, test
    if train_images.shape[1:] != test_images.shape[1:]:
        raise UserError(f"train images are {train_images.shape[1:]} but test images {test_images.shape[1:]}")
    num_classes = int(train_labels.max()) + 1
    if test_labels.max() >= num_classes:
        raise UserError(f"test labels reach {test_labels.max()}, training labels only {num_classes - 1}")
    train_idx, val_idx = stratified_split(train_labels, validation_size, seed)
    return {
        "x_train": normalize(train_images[train_idx]),
        "y_train": one_hot(train_labels[train_idx], num_classes),
        "x_validation": normalize(train_images[val_idx]),
        "y_validation": one_hot(train_labels[val_idx], num_classes),
        "x_test": normalize(test_images),
        "y_test": one_hot(test_labels, num_classes),
    }


def run(params_file: Path) -> None:
    params = load_params(params_file)
    from pipeline.tracking import tracked

    catalog.require_inputs(STAGE)
    with tracked(STAGE, params):
        arrays = prepare_mnist(
            read_split(RAW, "train"), read_split(RAW, "test"), params.mnist.validation_size, params.seed
        )
        write_npz(OUT, arrays)
