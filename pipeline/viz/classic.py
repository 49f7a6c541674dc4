"""The hand-made filters of classic image processing (Gaussian blur, Sobel edges), applied with
the very operation a Keras Conv2D layer uses, so they can be set beside the learned ones.
"""

from __future__ import annotations

import keras
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline.viz.common import axes_off, new_figure, show_image, to_grayscale
from pipeline.viz.kernels import draw_kernel

CLIP_PERCENTILE = 98.0


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """A (size, size) float32 Gaussian blur kernel with standard deviation `sigma` (in pixels).

    Sums to 1, so blurring keeps the image's mean brightness. `size` must be odd so the kernel
    has a centre pixel and does not shift the image.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd number, got {size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    profile = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel = np.outer(profile, profile)
    return (kernel / kernel.sum()).astype(np.float32)


def sobel_kernels() -> dict[str, np.ndarray]:
    """The two 3x3 Sobel kernels, as float32 arrays indexed [row, column].

    "sobel_x" responds to changes along x (left to right), i.e. to vertical edges; it is
    positive where the image gets brighter to the right. "sobel_y" is its transpose: changes
    along y (top to bottom), i.e. horizontal edges. The signs assume cross-correlation, which
    is what `apply_kernels` (and every conv layer) computes.
    """
    sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)
    return {"sobel_x": sobel_x, "sobel_y": sobel_x.T.copy()}


def classic_kernels(gaussian_size: int, gaussian_sigma: float) -> dict[str, np.ndarray]:
    """The lesson's hand-made filters by name: "gaussian", "sobel_x" and "sobel_y"."""
    return {"gaussian": gaussian_kernel(gaussian_size, gaussian_sigma), **sobel_kernels()}


def apply_kernels(image: np.ndarray, kernels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Filter the grayscale version of `image` with each 2-D kernel.

    In: an (H, W), (H, W, 1) or (H, W, 3) image (any dtype; the grayscale keeps its units,
    e.g. 0..255 for uint8) and 2-D kernels by name. Out: an (H, W) float32 response per name.

    Uses `keras.ops.conv` with stride 1 and "same" padding (zeros outside the image), the
    operation inside Conv2D. Like every deep-learning "convolution" it is really a
    cross-correlation: the kernel is not flipped, out[i, j] = sum k[a, b] * in[i + a - c, j + b - c].
    That is why the Sobel signs above read "brighter to the right is positive".
    """
    gray = to_grayscale(image)[np.newaxis, :, :, np.newaxis]  # NHWC, one channel
    responses = {}
    for name, kernel in kernels.items():
        kernel = np.asarray(kernel, dtype=np.float32)
        if kernel.ndim != 2:
            raise ValueError(f"kernel {name!r} must be 2-D, got shape {kernel.shape}")
        filtered = keras.ops.conv(gray, kernel[:, :, np.newaxis, np.newaxis], strides=1, padding="same")
        responses[name] = keras.ops.convert_to_numpy(filtered)[0, :, :, 0]
    return responses


def as_learned_size(reference: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Centre-crop or zero-pad a 2-D kernel to `shape`, so kernels of different sizes compare."""
    out = np.zeros(shape, dtype=np.float32)
    rows, cols = min(shape[0], reference.shape[0]), min(shape[1], reference.shape[1])
    r_in, c_in = (reference.shape[0] - rows) // 2, (reference.shape[1] - cols) // 2
    r_out, c_out = (shape[0] - rows) // 2, (shape[1] - cols) // 2
    out[r_out : r_out + rows, c_out : c_out + cols] = reference[r_in : r_in + rows, c_in : c_in + cols]
    return out


def most_similar_kernels(
    learned_kernels: np.ndarray, references: dict[str, np.ndarray]
) -> dict[str, tuple[int, float]]:
    """For each hand-made kernel, the learned filter that looks most like it.

    In: learned (kh, kw, in, out) weights and 2-D reference kernels by name. Out: per name,
    (filter index, cosine similarity in [-1, 1]). A learned kernel is compared through its
    sum over input channels: that is exactly the filter it applies to a gray image (all
    channels equal), which is what the hand-made filters see. References of another size are
    centre-cropped or padded to the learned size; the sign of the similarity is kept because
    the learned layer's ReLU keeps only one sign of the response.
    """
    learned = np.asarray(learned_kernels, dtype=np.float32).sum(axis=2)  # (kh, kw, out)
    flat = learned.reshape(-1, learned.shape[-1])
    flat_norms = np.linalg.norm(flat, axis=0) + 1e-12
    best = {}
    for name, reference in references.items():
        ref = as_learned_size(np.asarray(reference, dtype=np.float32), learned.shape[:2]).ravel()
        similarity = (ref @ flat) / (flat_norms * (np.linalg.norm(ref) + 1e-12))
        index = int(np.argmax(np.abs(similarity)))
        best[name] = (index, float(similarity[index]))
    return best


def draw_response(ax: Axes, response: np.ndarray, title: str) -> None:
    """Draw a filter response: signed ones on the diverging map (0 is white), others in gray.

    The colour range stops at the 98th percentile of |response|: a few extreme pixels (the
    zero padding makes a bright image's border look like an edge) would otherwise wash out
    every other edge.
    """
    high = float(np.percentile(np.abs(response), CLIP_PERCENTILE)) or 1.0
    if response.min() < 0 < response.max():
        ax.imshow(response, cmap="RdBu_r", vmin=-high, vmax=high)
    else:
        ax.imshow(response, cmap="gray", vmin=0.0, vmax=high)
    ax.set_title(title, fontsize=8)
    axes_off(ax)


def classic_vs_learned_figure(
    image: np.ndarray,
    kernels: dict[str, np.ndarray],
    filtered: dict[str, np.ndarray],
    learned_kernels: np.ndarray,
    learned_maps: np.ndarray | None,
    layer_name: str,
) -> Figure:
    """Hand-made filters and their outputs beside the most similar learned first-layer filters.

    In: the image; the hand-made 2-D kernels and their responses by name (`apply_kernels`);
    the first conv layer's (kh, kw, in, out) weights and, optionally, its (H', W', out) or
    (1, H', W', out) activations on the same image (after bias and ReLU, as the model
    computes them). Out: a figure with one row per hand-made filter: its kernel, its output,
    the learned kernel most like it (`most_similar_kernels`) and that filter's activation.
    """
    maps = None if learned_maps is None else np.asarray(learned_maps).reshape(-1, *np.shape(learned_maps)[-3:])[0]
    matches = most_similar_kernels(learned_kernels, kernels)
    columns = 4 if maps is not None else 3
    fig = new_figure(columns * 2.0, (len(kernels) + 1) * 2.0 + 0.3)
    axes = fig.subplots(len(kernels) + 1, columns, squeeze=False)
    for ax in axes.ravel():
        axes_off(ax)
    show_image(axes[0, 0], image)
    axes[0, 0].set_title("image", fontsize=8)
    draw_response(axes[0, 1], to_grayscale(image), "grayscale (hand-made filters' input)")
    show_image(axes[0, 2], image)
    axes[0, 2].set_title("image (the model's input)", fontsize=8)
    for row, (name, kernel) in enumerate(kernels.items(), start=1):
        index, similarity = matches[name]
        draw_kernel(axes[row, 0], kernel)
        axes[row, 0].set_title(f"{name} {kernel.shape[0]}x{kernel.shape[1]}", fontsize=8)
        draw_response(axes[row, 1], filtered[name], f"{name} output")
        # Summed over input channels: the filter the learned kernel applies to a gray image.
        draw_kernel(axes[row, 2], np.asarray(learned_kernels)[..., index].sum(axis=-1))
        axes[row, 2].set_title(f"{layer_name} #{index}\nsummed over channels, cos {similarity:+.2f}", fontsize=8)
        if maps is not None:
            draw_response(axes[row, 3], maps[..., index], f"#{index} activation")
    fig.suptitle("hand-made filters (left) vs the most similar learned filters (right)", fontsize=10)
    return fig
