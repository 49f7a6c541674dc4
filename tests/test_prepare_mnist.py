import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.stages.prepare_mnist import prepare_mnist

from conftest import tiny_digits


def carried_labels(x: np.ndarray) -> np.ndarray:
    """Each tiny digit carries its label in pixel (0, 0) as 10*label."""
    return np.rint(x[:, 0, 0, 0] * 255 / 10).astype(int)


def prepared(validation_size: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    return prepare_mnist(tiny_digits(200, seed=1), tiny_digits(50, seed=2), validation_size, seed)


def test_every_split_keeps_its_own_labels():
    arrays = prepared()
    for split in ("train", "validation", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        assert np.array_equal(np.argmax(y, axis=1), carried_labels(x)), split


def test_catches_a_test_set_given_the_training_labels():
    """The check above fails loudly if a bug pairs test images with training labels."""
    train, test = tiny_digits(200, seed=1), tiny_digits(50, seed=2)
    wrong = prepare_mnist(train, (test[0], train[1][:50]), 0, 0)
    assert not np.array_equal(np.argmax(wrong["y_test"], axis=1), carried_labels(wrong["x_test"]))


def test_normalised_one_hot_and_stratified():
    arrays = prepared(validation_size=40)
    x = arrays["x_train"]
    assert x.dtype == np.float32 and x.shape[1:] == (28, 28, 1)
    assert 0.0 <= x.min() and x.max() == 1.0
    assert arrays["y_train"].dtype == np.float32 and arrays["y_train"].shape[1] == 10
    assert np.all(arrays["y_train"].sum(axis=1) == 1)
    assert len(arrays["x_train"]) + len(arrays["x_validation"]) == 200
    assert np.all(arrays["y_validation"].sum(axis=0) == 4)  # 40 images, 10 classes: 4 each
    assert len(arrays["x_test"]) == 50


def test_split_is_seeded():
    a, b, c = prepared(seed=3), prepared(seed=3), prepared(seed=4)
    assert np.array_equal(a["x_validation"], b["x_validation"])
    assert not np.array_equal(a["x_validation"], c["x_validation"])


def test_bad_validation_size_and_mismatched_files():
    with pytest.raises(UserError, match="mnist.validation_size: 200 is not below"):
        prepared(validation_size=200)
    images, labels = tiny_digits(20, seed=1)
    from pipeline.data.mnist import check_pair

    with pytest.raises(UserError, match="do not belong together"):
        check_pair(images, labels[:10], "train")


def test_one_hot_is_keras_to_categorical_byte_for_byte():
    """The numpy encoder gives what keras.utils.to_categorical gave (as float32), bit for bit."""
    from keras.utils import to_categorical

    from pipeline.data.mnist import one_hot

    labels = tiny_digits(200, seed=1)[1].astype(np.int64)
    ours, keras_ = one_hot(labels, 10), to_categorical(labels, 10).astype(np.float32)
    assert ours.dtype == keras_.dtype and ours.shape == keras_.shape and ours.flags.c_contiguous
    assert ours.tobytes() == keras_.tobytes()
    assert one_hot(labels[:0], 10).shape == (0, 10)
    with pytest.raises(UserError, match=r"labels must lie in \[0, 10\), got 0\.\.10"):
        one_hot(np.array([0, 10]), 10)
