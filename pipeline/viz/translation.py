"""The translation test's picture: accuracy against how far the test digits were moved."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.viz.common import new_figure


def translation_figure(curve: Sequence[dict], titles: Mapping[str, str]) -> Figure:
    """Per model, accuracy against shift in pixels: the four directions pooled (line and 95%
    band) and each direction on its own (thin lines).

    In: evaluation.pooled_curve's rows; {model: what a reader calls it}.
    """
    fig = new_figure(6.4, 4.0)
    ax = fig.subplots()
    for index, (model, title) in enumerate(titles.items()):
        rows = sorted((row for row in curve if row["model"] == model), key=lambda row: row["pixels"])
        if not rows:
            continue
        colour = f"C{index}"
        pooled = [row for row in rows if row["direction"] == "all"]  # at 0 pixels: the unshifted digits
        pixels = [row["pixels"] for row in pooled]
        ax.plot(pixels, [row["accuracy"] for row in pooled], marker="o", color=colour, label=f"{title} (4 directions)")
        ax.fill_between(
            pixels, [row["ci95_low"] for row in pooled], [row["ci95_high"] for row in pooled], color=colour, alpha=0.2
        )
        start = next(row for row in pooled if row["pixels"] == 0)
        for direction in sorted({row["direction"] for row in rows} - {"all", "none"}):
            line = [start, *(row for row in rows if row["direction"] == direction)]
            ax.plot(
                [row["pixels"] for row in line],
                [row["accuracy"] for row in line],
                color=colour,
                linewidth=0.7,
                alpha=0.6,
                linestyle="--",
            )
    ax.set_xlabel("shift of the test digits (pixels; dashed: right, left, down, up each)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.set_title("Translation: accuracy on shifted test digits (zero fill, 95% bands)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig
