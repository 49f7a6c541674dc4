"""Images moved by whole pixels with zeros filled in: the translation test's inputs."""

from __future__ import annotations

import numpy as np

from pipeline.errors import UserError

# (name, (rows down, columns right)) per pixel of shift: the four directions a digit is moved.
DIRECTIONS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("right", (0, 1)),
    ("left", (0, -1)),
    ("down", (1, 0)),
    ("up", (-1, 0)),
)


def shift_images(images: np.ndarray, down: int, right: int) -> np.ndarray:
    """(N, H, W, ...) images moved `down` rows and `right` columns (negative: up, left).

    What leaves the frame is lost and what enters it is 0 (black, the MNIST background);
    nothing wraps around. A shift of the image's size or more leaves only zeros.
    """
    shifted = np.zeros_like(images)
    height, width = images.shape[1:3]
    if abs(down) >= height or abs(right) >= width:
        return shifted
    rows_to, rows_from = _span(down, height)
    cols_to, cols_from = _span(right, width)
    shifted[:, rows_to, cols_to] = images[:, rows_from, cols_from]
    return shifted


def _span(offset: int, size: int) -> tuple[slice, slice]:
    """(target, source) slices of one axis for a shift by `offset`."""
    if offset >= 0:
        return slice(offset, size), slice(0, size - offset)
    return slice(0, size + offset), slice(-offset, size)


def check_max_shift(max_shift: int, image_shape: tuple[int, ...], key: str) -> None:
    """A shift range that moves the whole image out of its frame is a UserError naming `key`."""
    smallest = min(image_shape[:2])
    if max_shift >= smallest:
        raise UserError(
            f"{key}: {max_shift} pixels is not smaller than the {image_shape[0]}x{image_shape[1]} images "
            f"(a shift that large leaves nothing of them); choose at most {smallest - 1}"
        )


def shifted_sets(images: np.ndarray, max_shift: int):
    """(direction, pixels, shifted images) for pixels 0..max_shift in each of DIRECTIONS;
    the unshifted images once, as direction "none"."""
    yield "none", 0, images
    for pixels in range(1, max_shift + 1):
        for name, (down, right) in DIRECTIONS:
            yield name, pixels, shift_images(images, down * pixels, right * pixels)
