"""Small helpers shared by the figure makers: headless figures, grids, PNG bytes, image display.

Figures are built with the object-oriented API on an Agg canvas, never with pyplot: pyplot keeps
global state (the "current figure"), which is neither thread-safe nor needed without a screen.
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Inches per grid cell: small enough that a 64-kernel grid stays a sensible PNG size.
CELL_INCHES = 1.3


def new_figure(width: float, height: float) -> Figure:
    """A headless figure of `width` x `height` inches, with an Agg canvas attached."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def axes_off(ax: Axes) -> None:
    """No axis lines, ticks or labels on `ax` (an image panel).

    Also hides the two Axis objects, which `set_axis_off` leaves visible: placing a panel's
    title then still asks each of them for its tick labels' extent (built and laid out, though
    never drawn), at every draw and again for constrained layout. Hidden, they are skipped:
    the same pixels, and a 64-panel titled grid saves 2.8x faster (1.19 s -> 0.43 s).
    """
    ax.set_axis_off()
    ax.xaxis.set_visible(False)
    ax.yaxis.set_visible(False)


def grid_shape(count: int, max_columns: int) -> tuple[int, int]:
    """(rows, columns) of a near-square grid holding `count` cells, at most `max_columns` wide."""
    if count < 1:
        raise ValueError(f"a grid needs at least one cell, got {count}")
    columns = min(max_columns, math.ceil(math.sqrt(count)))
    return math.ceil(count / columns), columns


def image_grid(count: int, max_columns: int, cell_inches: float = CELL_INCHES) -> tuple[Figure, list[Axes]]:
    """A figure with a grid of `count` axes (ticks off) and the spare cells removed.

    Returns the figure and the `count` axes in row-major order.
    """
    rows, columns = grid_shape(count, max_columns)
    fig = new_figure(columns * cell_inches, rows * cell_inches + 0.4)
    axes = list(fig.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes[count:]:
        ax.remove()
    for ax in axes[:count]:
        axes_off(ax)
    return fig, axes[:count]


def show_image(ax: Axes, image: np.ndarray) -> None:
    """Draw one image as a picture, not a heat map.

    In: (H, W), (H, W, 1) or (H, W, 3); floats in [0, 1], or uint8 / floats in [0, 255].
    Grayscale is drawn with a fixed [0, 1] or [0, 255] range so that a dark digit stays dark
    instead of being stretched to full contrast.
    """
    picture = np.asarray(image)
    if picture.ndim == 3 and picture.shape[-1] == 1:
        picture = picture[..., 0]
    top = 1.0 if picture.dtype != np.uint8 and float(np.max(picture, initial=0.0)) <= 1.0 else 255.0
    if picture.ndim == 2:
        ax.imshow(picture, cmap="gray", vmin=0.0, vmax=top)
    else:
        # imshow wants RGB floats in [0, 1] or integers in [0, 255].
        ax.imshow(np.clip(picture, 0, 255).astype(np.uint8) if top == 255.0 else picture)
    axes_off(ax)


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """(H, W) float32 luminance of an (H, W), (H, W, 1) or (H, W, 3) image, in its own units.

    RGB uses the ITU-R BT.601 weights (those of PIL's "L" mode), so the result matches what
    an image library would call the grayscale version.
    """
    picture = np.asarray(image, dtype=np.float32)
    if picture.ndim == 2:
        return picture
    if picture.ndim == 3 and picture.shape[-1] == 1:
        return picture[..., 0]
    if picture.ndim == 3 and picture.shape[-1] == 3:
        return picture @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {picture.shape}")


def figure_to_png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure rendered as PNG bytes (for MLflow artifacts, HTML reports and tests)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
