"""Training curves: each metric per epoch, training beside validation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.viz.common import new_figure


def training_curves_figure(
    history: pd.DataFrame,
    metrics: Sequence[str] = ("loss", "accuracy"),
    start: Mapping[str, float] | None = None,
) -> Figure:
    """One panel per metric, training ("loss") and validation ("val_loss") against the epoch.

    In: a Keras-style history table (e.g. from CSVLogger or `pd.DataFrame(fit.history)`);
    the x axis is its "epoch" column if it has one, else its row number. Metrics absent from
    the table are skipped. The best validation epoch (lowest loss, highest anything else)
    is marked, because that is the epoch to compare against the training curve. `start`
    ({metric: value}) is the validation score of the weights training began from (a
    fine-tuning's trained head): drawn as epoch 0, and a candidate for the best.
    """
    shown = [name for name in metrics if name in history.columns or f"val_{name}" in history.columns]
    if not shown:
        raise ValueError(f"history has none of the columns {list(metrics)}; it has {list(history.columns)}")
    epochs = history["epoch"].to_numpy() if "epoch" in history.columns else np.arange(len(history))
    fig = new_figure(4.2 * len(shown), 3.4)
    for ax, name in zip(fig.subplots(1, len(shown), squeeze=False)[0], shown):
        if name in history.columns:
            ax.plot(epochs, history[name], marker=".", label="training")
        validation = f"val_{name}"
        if validation in history.columns:
            values, x = history[validation].to_numpy(dtype=float), epochs
            if start is not None and name in start:
                values, x = np.concatenate([[start[name]], values]), np.concatenate([[0], epochs])
            ax.plot(x, values, marker=".", label="validation")
            best = int(np.nanargmin(values) if "loss" in name else np.nanargmax(values))
            ax.plot(
                x[best],
                values[best],
                "o",
                markersize=10,
                fillstyle="none",
                color="black",
                label=f"best validation ({values[best]:.3g})",
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig
