"""Confusion matrices and the misclassified examples behind them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from pipeline.evaluation import label_indices
from pipeline.viz.common import image_grid, new_figure, show_image

MAX_COLUMNS = 6


def confusion_matrix_figure(cm: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """A (K, K) confusion matrix (rows: true class, columns: predicted) with every count written.

    The colour is each row's share (the recall of that cell), not the raw count: with
    unequal class sizes raw counts would make big classes look good and hide the errors of
    small ones. Text is white on dark cells so it stays readable.
    """
    cm = np.asarray(cm)
    classes = len(class_names)
    if cm.shape != (classes, classes):
        raise ValueError(f"confusion matrix of shape {cm.shape} does not match {classes} class names")
    row_totals = cm.sum(axis=1, keepdims=True)
    shares = np.divide(cm, row_totals, out=np.zeros(cm.shape), where=row_totals > 0)
    side = 2.5 + 0.45 * classes
    fig = new_figure(side + 1.0, side)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    font_size = 10 if classes <= 5 else 8
    for row in range(classes):
        for column in range(classes):
            colour = "white" if shares[row, column] > 0.5 else "black"
            ax.text(column, row, f"{cm[row, column]:.0f}", ha="center", va="center", color=colour, fontsize=font_size)
    # Long or many names are slanted so they do not overlap.
    slanted = classes > 5 or max(len(name) for name in class_names) > 8
    ax.set_xticks(
        range(classes), labels=class_names, rotation=45 if slanted else 0, ha="right" if slanted else "center"
    )
    ax.set_yticks(range(classes), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"{title}  (accuracy {accuracy:.3f}, n={cm.sum():.0f})", fontsize=10)
    return fig


def misclassified_figure(
    images: np.ndarray,
    true_labels: np.ndarray,
    pred_labels: np.ndarray,
    class_names: Sequence[str],
    max_items: int,
) -> Figure:
    """A grid of the first `max_items` misclassified images, each titled "true X / pred Y".

    In: (N, H, W, 1) grayscale floats in [0, 1] or (N, H, W, 3) RGB (uint8 or floats); labels
    as class indices or one-hot rows. With no mistakes the figure says so instead.
    """
    true_classes, predicted = label_indices(true_labels), label_indices(pred_labels)
    wrong = np.flatnonzero(true_classes != predicted)[:max_items]
    if len(wrong) == 0:
        fig = new_figure(4.0, 1.5)
        fig.text(0.5, 0.5, f"no misclassified examples among {len(true_classes)}", ha="center", va="center")
        return fig
    fig, axes = image_grid(len(wrong), MAX_COLUMNS, cell_inches=1.8)
    for index, ax in zip(wrong, axes):
        show_image(ax, images[index])
        ax.set_title(f"true {class_names[true_classes[index]]} / pred {class_names[predicted[index]]}", fontsize=7)
    total_wrong = int(np.sum(true_classes != predicted))
    fig.suptitle(f"misclassified: {len(wrong)} shown of {total_wrong} (of {len(true_classes)})", fontsize=9)
    return fig
