"""Accuracies with their 95% intervals, side by side: the report's evidence figures."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from pipeline.viz.common import new_figure


def accuracy_with_intervals_figure(
    labels: Sequence[str],
    accuracies: Sequence[float],
    intervals: Sequence[Sequence[float]],
    title: str,
    xlabel: str = "",
    line: bool = True,
) -> Figure:
    """Test accuracy per item (a block, a model) with its 95% interval as an error bar, in
    the order given; `line` joins the points (a depth axis), else they stand apart.

    In: one label, accuracy in [0, 1] and (low, high) interval per item. Each point is
    annotated with its percentage so the figure reads without the table.
    """
    if not len(labels) == len(accuracies) == len(intervals) or not labels:
        raise ValueError(
            f"need one accuracy and one interval per label, got {len(labels)}, {len(accuracies)}, {len(intervals)}"
        )
    values = 100 * np.asarray(accuracies, dtype=float)
    bounds = 100 * np.asarray(intervals, dtype=float).reshape(-1, 2)
    errors = np.stack([values - bounds[:, 0], bounds[:, 1] - values])
    x = np.arange(len(labels))
    fig = new_figure(1.4 * len(labels) + 2.4, 3.4)
    ax = fig.add_subplot()
    ax.errorbar(x, values, yerr=errors, fmt="o-" if line else "o", capsize=5, markersize=6)
    for xi, value in zip(x, values):
        ax.annotate(f"{value:.1f}%", (xi, value), textcoords="offset points", xytext=(8, -3), fontsize=8)
    ax.set_xticks(x, list(labels))
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_ylabel("test accuracy (%), 95% interval")
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig
