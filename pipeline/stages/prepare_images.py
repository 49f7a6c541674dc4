"""prepare_images: photos -> data/prepared/images.npz.

uint8 RGB at images.size x images.size, a seeded stratified split with images.per_class
photos of each class per split, integer labels, and the class names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import catalog
from pipeline.data.images import decode_folder, find_class_folders, stratified_split
from pipeline.files import write_npz
from pipeline.params import load_params

STAGE = catalog.STAGES["prepare_images"]
RAW = catalog.IMAGES_RAW
OUT = catalog.IMAGES
SPLITS = ("train", "validation", "test")


def prepare_images(raw: Path, size: int, per_class: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Decode, resize and split every photo below `raw` (one folder per class)."""
    images, labels, class_names, _ = decode_folder(find_class_folders(raw), size, progress=True)
    splits = stratified_split(labels, class_names, per_class, seed)
    arrays: dict[str, np.ndarray] = {"class_names": np.array(class_names)}
    for split in SPLITS:
        arrays[f"x_{split}"] = images[splits[split]]
        arrays[f"y_{split}"] = labels[splits[split]]
    return arrays


def run(params_file: Path) -> None:
    params = load_params(params_file)
    from pipeline.tracking import tracked

    catalog.require_inputs(STAGE)
    p = params.images
    with tracked(STAGE, params):
        arrays = prepare_images(RAW, p.size, p.per_class.model_dump(), params.seed)
        write_npz(OUT, arrays)
