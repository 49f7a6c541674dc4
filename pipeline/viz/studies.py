"""A study's pictures: its metric against the param it sweeps, and its training curves overlaid."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.viz.common import new_figure


def metric_figure(
    labels: Sequence[str],
    values: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    x_label: str,
    metric: str,
) -> Figure:
    """One point per run (its label on the x axis, in the study's order) with its 95% interval."""
    fig = new_figure(max(4.0, 1.2 * len(labels) + 2.0), 3.4)
    ax = fig.subplots()
    positions = range(len(labels))
    errors = [[v - low for v, low in zip(values, lows)], [high - v for v, high in zip(values, highs)]]
    ax.errorbar(positions, values, yerr=errors, fmt="o", capsize=5, color="C0")
    for x, value in zip(positions, values):
        ax.annotate(f"{value:.4f}", (x, value), textcoords="offset points", xytext=(8, 0), fontsize=8)
    ax.set_xticks(list(positions), list(labels))
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{metric} (95% interval)")
    ax.set_title(f"{metric} against {x_label}")
    ax.grid(alpha=0.3)
    return fig


def curves_figure(labels: Sequence[str], histories: Sequence[dict[str, list[float]]], x_label: str) -> Figure:
    """Left: training (dashed) and validation (solid) accuracy per epoch, one colour per run;
    right: their gap (training minus validation), the picture of overfitting."""
    fig = new_figure(9.0, 3.6)
    accuracy_ax, gap_ax = fig.subplots(1, 2)
    for index, (label, history) in enumerate(zip(labels, histories)):
        colour = f"C{index}"
        train, validation = history.get("accuracy", []), history.get("val_accuracy", [])
        epochs = list(range(1, len(train) + 1))
        accuracy_ax.plot(epochs, train, linestyle="--", marker=".", color=colour, label=f"{label}: training")
        accuracy_ax.plot(epochs[: len(validation)], validation, marker="o", color=colour, label=f"{label}: validation")
        gaps = [t - v for t, v in zip(train, validation)]
        gap_ax.plot(epochs[: len(gaps)], gaps, marker="o", color=colour, label=label)
    accuracy_ax.set_title("accuracy per epoch (dashed: training)")
    accuracy_ax.set_ylabel("accuracy")
    gap_ax.set_title("training minus validation accuracy")
    gap_ax.set_ylabel("gap")
    gap_ax.axhline(0.0, color="black", linewidth=0.6)
    for ax in (accuracy_ax, gap_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title=x_label, title_fontsize=7)
    return fig
