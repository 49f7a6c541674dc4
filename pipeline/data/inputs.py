"""New pictures as a trained model's input: photos as the photo models saw them, digits as
the MNIST test digits look. Pure: file bytes in, arrays out (used by `pipeline predict`).

Photos go through the very decoder the training photos went through (`decode_image`:
any size, grey, palette, RGBA or CMYK to RGB, stretched to the model's square). A digit
is made to look like MNIST's: grey, white ink on black (inverted when the background is
light, as a digit drawn on paper is), the ink cropped and scaled so that its longer side
fills the box MNIST's digits fill (20 of 28 pixels), and centred by its centre of mass.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from pipeline.data.images import EXPECTED_FORMAT, UndecodableImage, decode_image

# MNIST's digits were size-normalised into a 20x20 box and centred in a 28x28 field.
MNIST_SIZE = 28

# The suffixes a folder is searched for (the photo formats the training photos may have).
IMAGE_SUFFIXES = frozenset(EXPECTED_FORMAT)


def photo_input(data: bytes, suffix: str, height: int, width: int) -> np.ndarray:
    """uint8 RGB (height, width, 3), decoded as the training photos were; raises
    UndecodableImage(reason) for what does not decode (see `decode_image`)."""
    square = decode_image(data, suffix, max(height, width))
    if height == width:
        return square
    return np.asarray(Image.fromarray(square).resize((width, height), Image.Resampling.BILINEAR))


def grey_pixels(data: bytes, suffix: str) -> np.ndarray:
    """float64 (H, W) in [0, 1] at the picture's own size, upright per its EXIF tag.

    Checked first by `decode_image`, so a damaged file or a PNG named .jpg is refused with
    the same reason as in the training data (UndecodableImage)."""
    decode_image(data, suffix, 8)  # the checks; the tiny result is not used
    with Image.open(io.BytesIO(data)) as image:
        upright = ImageOps.exif_transpose(image)
        return np.asarray(upright.convert("L"), dtype=np.float64) / 255.0


def light_background(grey: np.ndarray) -> bool:
    """Whether the picture's border (its outermost rows and columns) is mostly light."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    return float(np.median(border)) > 0.5


def mnist_like(grey: np.ndarray, size: int = MNIST_SIZE, box: int = 20) -> np.ndarray:
    """A grey picture of one digit -> float32 (size, size, 1) in [0, 1], white ink on black.

    Inverted when its background is light; the ink (pixels above half of the brightest) is
    cropped, scaled to `box` pixels on its longer side (aspect kept) and placed so that its
    centre of mass is the field's centre, as MNIST's digits were made. A blank picture gives
    a black field.
    """
    ink = 1.0 - grey if light_background(grey) else grey.copy()
    ink = ink - float(np.median(ink))  # the background to 0, whatever its shade
    ink = np.clip(ink, 0.0, None)
    field = np.zeros((size, size), dtype=np.float64)
    peak = float(ink.max())
    if peak <= 0.0:
        return field.astype(np.float32)[..., np.newaxis]
    ink /= peak
    rows, columns = np.nonzero(ink > 0.5)
    crop = ink[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    scale = box / max(crop.shape)
    height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    resized = Image.fromarray((crop * 255).astype(np.uint8)).resize((width, height), Image.Resampling.LANCZOS)
    digit = np.asarray(resized, dtype=np.float64) / 255.0
    total = digit.sum()
    if total <= 0:
        return field.astype(np.float32)[..., np.newaxis]
    centre_row = float((digit.sum(axis=1) * np.arange(height)).sum() / total)
    centre_column = float((digit.sum(axis=0) * np.arange(width)).sum() / total)
    top = int(np.clip(round(size / 2 - 0.5 - centre_row), 0, size - height))
    left = int(np.clip(round(size / 2 - 0.5 - centre_column), 0, size - width))
    field[top : top + height, left : left + width] = digit
    return field.astype(np.float32)[..., np.newaxis]


def digit_input(data: bytes, suffix: str, size: int, box: int) -> np.ndarray:
    """float32 (size, size, 1) in [0, 1]: a digit file as an MNIST digit (see `mnist_like`);
    raises UndecodableImage(reason) for what does not decode."""
    return mnist_like(grey_pixels(data, suffix), size, box)


__all__ = ["IMAGE_SUFFIXES", "UndecodableImage", "digit_input", "mnist_like", "photo_input"]
