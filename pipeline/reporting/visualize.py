"""The report's filter pictures: hand-made vs learned filters, filter patterns, activation maps.

Models and images in, matplotlib figures (or their PNG bytes) out. The cost is bounded by
the report params (filters per layer, ascent steps, image size) and each kind's time,
drawing to PNG included, is returned, so the report can say what it cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

from pipeline.params import ClassicFilterParams, PatternParams


@dataclass
class FilterPictures:
    """The pictures of one model's filters as PNG bytes, and the seconds each kind took."""

    classic: bytes
    patterns: bytes
    activations: dict[str, bytes]  # layer name -> picture, input to output
    seconds: dict[str, float] = field(default_factory=dict)


def classic_vs_learned(model, image: np.ndarray, p: ClassicFilterParams) -> Figure:
    """Gaussian and Sobel filters on `image`, beside the most similar filters of the model's
    first conv layer and their activations on the same image (same conv op as the model)."""
    from pipeline.models.graph import conv_layer_names
    from pipeline.viz.activations import activation_maps
    from pipeline.viz.classic import apply_kernels, classic_kernels, classic_vs_learned_figure

    first = conv_layer_names(model)[0]
    kernels = classic_kernels(p.gaussian_size, p.gaussian_sigma)
    learned_maps = activation_maps(model, image.astype(np.float32), [first])[first]
    learned_kernels = model.get_layer(first).get_weights()[0]
    filtered = apply_kernels(image, kernels)
    return classic_vs_learned_figure(image, kernels, filtered, learned_kernels, learned_maps, first)


def patterns(
    model, layer_names: list[str], p: PatternParams, size: int, value_range: tuple[float, float], seed: int, title: str
) -> Figure:
    """Gradient-ascent patterns of the first `p.filters_per_layer` filters of each layer."""
    from pipeline.viz.patterns import filter_patterns, patterns_figure

    found = filter_patterns(model, layer_names, p.filters_per_layer, p.steps, p.learning_rate, size, value_range, seed)
    return patterns_figure(found, title)


def activations(model, image: np.ndarray, max_channels: int) -> dict[str, Figure]:
    """One figure per conv and pooling layer: the first `max_channels` channels for `image`."""
    from pipeline.models.graph import conv_and_pool_layer_names
    from pipeline.viz.activations import activation_maps, activation_maps_figures

    maps = activation_maps(model, image.astype(np.float32), conv_and_pool_layer_names(model))
    return activation_maps_figures(maps, max_channels)


def filter_pictures(
    model,
    image: np.ndarray,
    pattern_layers: list[str],
    classic: ClassicFilterParams,
    pattern_params: PatternParams,
    pattern_size: int,
    value_range: tuple[float, float],
    max_channels: int,
    seed: int,
    title: str,
) -> FilterPictures:
    """All three kinds of filter pictures for one model and one test image, as PNGs, timed."""
    from pipeline.viz.common import figure_to_png_bytes

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    classic_png = figure_to_png_bytes(classic_vs_learned(model, image, classic))
    seconds["classic"] = time.perf_counter() - started
    started = time.perf_counter()
    pattern_title = f"{title}: filter patterns ({pattern_params.steps} ascent steps, {pattern_size}x{pattern_size} px)"
    patterns_png = figure_to_png_bytes(
        patterns(model, pattern_layers, pattern_params, pattern_size, value_range, seed, pattern_title)
    )
    seconds["patterns"] = time.perf_counter() - started
    started = time.perf_counter()
    activation_pngs = {
        layer: figure_to_png_bytes(figure) for layer, figure in activations(model, image, max_channels).items()
    }
    seconds["activations"] = time.perf_counter() - started
    return FilterPictures(
        classic_png, patterns_png, activation_pngs, {key: round(value, 2) for key, value in seconds.items()}
    )
