"""Pictures of convolution kernels: the weights of a conv layer, one small image per filter."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline.viz.common import axes_off, image_grid

# A diverging map: white is 0, so a kernel's positive and negative lobes read at a glance.
DIVERGING_CMAP = "RdBu_r"
MAX_COLUMNS = 8


def rgb_kernel_image(kernel: np.ndarray) -> np.ndarray:
    """An (kh, kw, 3) kernel min-max normalised to [0, 1] so it can be shown as a colour image.

    Each kernel is normalised on its own: the weights' scale differs a lot between filters,
    and what the picture should show is the colour and orientation each one responds to.
    """
    kernel = np.asarray(kernel, dtype=np.float32)
    low, high = float(kernel.min()), float(kernel.max())
    if high == low:
        return np.full_like(kernel, 0.5)
    return (kernel - low) / (high - low)


def draw_kernel(ax: Axes, kernel: np.ndarray, limit: float | None = None) -> None:
    """Draw one kernel: (kh, kw, 3) as RGB, (kh, kw) or (kh, kw, 1) on the diverging map.

    `limit` is the symmetric colour range |w| <= limit for single-channel kernels; None uses
    the kernel's own largest |w|. Other channel counts are summed over the input channels,
    which is the kernel's response to an input whose channels are all equal.
    """
    kernel = np.asarray(kernel, dtype=np.float32)
    if kernel.ndim == 3 and kernel.shape[-1] == 3:
        ax.imshow(rgb_kernel_image(kernel), interpolation="nearest")
    else:
        flat = kernel.sum(axis=-1) if kernel.ndim == 3 else kernel
        bound = limit if limit is not None else float(np.abs(flat).max()) or 1.0
        ax.imshow(flat, cmap=DIVERGING_CMAP, vmin=-bound, vmax=bound, interpolation="nearest")
    axes_off(ax)


def kernel_grid(kernels: np.ndarray, title: str, bgr: bool = False) -> Figure:
    """A grid with one picture per output filter of a conv layer.

    In: `kernels` of shape (kh, kw, in, out), as in `layer.get_weights()[0]` of a Keras
    Conv2D. With in == 3 each kernel is an RGB image (normalised per kernel); pass `bgr=True`
    for a layer that reads B, G, R channels (VGG16's ImageNet weights: its preprocessing flips
    RGB to BGR) so the colours shown are the true ones. Otherwise each kernel is grayscale
    (summed over inputs if in > 1) on a diverging map centred at 0, with one shared range so
    that the kernels' strengths can be compared. Out: a figure titled `title`.
    """
    kernels = np.asarray(kernels, dtype=np.float32)
    if kernels.ndim != 4:
        raise ValueError(f"expected kernels of shape (kh, kw, in, out), got {kernels.shape}")
    count = kernels.shape[-1]
    fig, axes = image_grid(count, MAX_COLUMNS)
    in_channels = kernels.shape[2]
    if bgr and in_channels == 3:
        kernels = kernels[:, :, ::-1, :]
    shared_limit = None if in_channels == 3 else float(np.abs(kernels.sum(axis=2)).max()) or 1.0
    for index, ax in enumerate(axes):
        draw_kernel(ax, kernels[..., index], shared_limit)
        ax.set_title(str(index), fontsize=7)
    colour = "RGB, each kernel min-max normalised" if in_channels == 3 else "blue < 0 < red"
    fig.suptitle(
        f"{title}  ({kernels.shape[0]}x{kernels.shape[1]}x{in_channels}, {count} filters; {colour})", fontsize=9
    )
    return fig
