"""Figures and pictures of what the models learned: pure functions, arrays/models in, figures out.

Modules: `kernels` (conv weights), `classic` (Gaussian/Sobel vs learned filters), `activations`
(feature maps of one image), `patterns` (filter patterns by gradient ascent), `gradcam`,
`curves` (training history), `confusion` (confusion matrix, misclassified examples).
Figures are `matplotlib.figure.Figure` on the Agg canvas; callers save them with
`fig.savefig(path)` or `figure_to_png_bytes(fig)`.
"""

from pipeline.viz.common import figure_to_png_bytes

__all__ = ["figure_to_png_bytes"]
