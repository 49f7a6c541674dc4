"""The translation test's inputs: a shifted digit is the original moved, zeros filled in."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.shift import DIRECTIONS, check_max_shift, shift_images, shifted_sets
from pipeline.errors import UserError


def digits(count=3, size=6):
    return np.random.default_rng(0).uniform(0.1, 1.0, (count, size, size, 1)).astype(np.float32)


@pytest.mark.parametrize("down, right", [(0, 2), (0, -2), (3, 0), (-1, 0), (2, -3), (0, 0)])
def test_a_shifted_image_is_the_original_moved_with_zeros_filled_in(down, right):
    images = digits()
    shifted = shift_images(images, down, right)
    size = images.shape[1]
    for row in range(size):
        for col in range(size):
            source = (row - down, col - right)
            inside = 0 <= source[0] < size and 0 <= source[1] < size
            expected = images[:, source[0], source[1]] if inside else 0.0
            np.testing.assert_array_equal(shifted[:, row, col], expected)
    assert shifted.dtype == images.dtype and shifted.shape == images.shape


def test_one_pixel_right_by_hand():
    image = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3)
    assert shift_images(image, 0, 1)[0].tolist() == [[0, 1, 2], [0, 4, 5], [0, 7, 8]]
    assert shift_images(image, -1, 0)[0].tolist() == [[4, 5, 6], [7, 8, 9], [0, 0, 0]]
    assert not shift_images(image, 0, 3).any()  # moved out of the frame entirely


def test_shifted_sets_are_every_direction_at_every_distance_and_the_original_once():
    images = digits()
    sets = list(shifted_sets(images, 2))
    assert [(direction, pixels) for direction, pixels, _ in sets] == [("none", 0)] + [
        (name, pixels) for pixels in (1, 2) for name, _ in DIRECTIONS]
    np.testing.assert_array_equal(sets[0][2], images)
    np.testing.assert_array_equal(dict(((d, p), x) for d, p, x in sets)[("up", 2)], shift_images(images, -2, 0))


def test_a_shift_range_the_size_of_the_image_is_a_user_error():
    check_max_shift(27, (28, 28, 1), "evaluate.translation.max_shift")
    with pytest.raises(UserError, match="^evaluate.translation.max_shift: 28 pixels is not smaller than the 28x28"):
        check_max_shift(28, (28, 28, 1), "evaluate.translation.max_shift")
