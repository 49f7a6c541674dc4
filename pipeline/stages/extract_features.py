"""extract_features: VGG16's frozen layers run once over every photo, cached.

For each split writes data/features/<split>_frozen.npy (the activation at the last frozen
layer: block4_pool for `finetune.unfreeze: 3`), <split>_pooled.npy (block5_pool, the head's
input, computed from that cache through the block5 layers), for each block N of
`features.pooled_blocks` <split>_block<N>_gap.npy (blockN_pool averaged over its positions:
train_block_heads' input, tapped in the same forward pass) and <split>_labels.npy, plus
class_names.json. Batches are written into the .npy files by offset, so memory stays bounded
whatever the number of photos or of augmented copies (`features.augment_copies`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from pipeline import catalog
from pipeline.errors import UserError, raise_if_signalled
from pipeline.files import atomic_path
from pipeline.models.augmentation import AugmentationFactors, augment_batch
from pipeline.params import FeaturesParams, load_params

STAGE = catalog.STAGES["extract_features"]
IMAGES = catalog.IMAGES
WEIGHTS = catalog.WEIGHTS
OUT = catalog.FEATURES
SPLITS = ("train", "validation", "test")


def feature_extractor(
    weights: str | None, image_shape: tuple[int, int, int], unfreeze: int, pooled_blocks: Sequence[int] = ()
):
    """Raw uint8 photos -> (activation at the last frozen layer, block5_pool, then each block
    of `pooled_blocks` globally average-pooled), all from one forward pass."""
    from pipeline.models.vgg import build_conv_base, feature_model

    return feature_model(build_conv_base(weights, image_shape), unfreeze, tuple(pooled_blocks))


def block_features_file(split: str, block: int) -> str:
    """The cache file of block `block`'s pooled output for `split`: train_block3_gap.npy."""
    return f"{split}_block{block}_gap.npy"


class Augmented(NamedTuple):
    """`copies` seeded random augmentations of every photo, cached after the originals."""

    copies: int
    factors: AugmentationFactors
    seed: int


def views_per_photo(mirrored: bool, augmented: Augmented | None) -> int:
    """Cached rows per photo: the original, its mirror, its augmented copies."""
    return 1 + int(mirrored) + (augmented.copies if augmented else 0)


def extract(
    extractor,
    images: np.ndarray,
    batch_size: int,
    frozen_out: Path,
    pooled_out: Path,
    mirrored: bool = False,
    augmented: Augmented | None = None,
    blocks_out: Sequence[Path] = (),
) -> None:
    """Run `extractor` over `images` in batches, writing its outputs as .npy files, row by row:
    the first two to `frozen_out` and `pooled_out`, any further ones to `blocks_out`, in order.

    With `mirrored`, the left-right mirror image of every photo follows the originals (rows
    N..2N-1); with `augmented`, copy k (1..K) of every photo follows them, each batch made by
    `augment_batch(batch, factors, seed, k, first row of the batch)`. Each cached row is
    the exact activation of a photo, so training on the cache stays exactly the full
    network's training, on every one of those photos.
    """
    shapes = [tuple(t.shape[1:]) for t in extractor.outputs]
    count = len(images)
    rows = count * views_per_photo(mirrored, augmented)
    with ExitStack() as files:
        frozen = files.enter_context(NpyRows(frozen_out, (rows, *shapes[0])))
        pooled = files.enter_context(NpyRows(pooled_out, (rows, *shapes[1])))
        blocks = [files.enter_context(NpyRows(path, (rows, *shape))) for path, shape in zip(blocks_out, shapes[2:])]
        views = (
            ["original"] + (["mirror"] if mirrored else []) + (["augmented"] * (augmented.copies if augmented else 0))
        )
        batches = [(view, start) for view in views for start in range(0, count, batch_size)]
        for index, (view, start) in enumerate(tqdm(batches, desc=frozen_out.stem, unit="batch")):
            raise_if_signalled()  # a signal swallowed inside predict stops the loop here
            batch = images[start : start + batch_size]
            part = index // -(-count // batch_size)  # which view: rows part*N .. part*N + N-1
            if view == "mirror":
                batch = batch[:, :, ::-1]
            elif view == "augmented" and augmented is not None:
                copy = part - int(mirrored)
                batch = augment_batch(batch, augmented.factors, augmented.seed, copy, start)
            cached, head_input, *block_outputs = extractor.predict_on_batch(batch)
            row = part * count + start
            frozen.write(row, cached)
            pooled.write(row, head_input)
            for block, output in zip(blocks, block_outputs):
                block.write(row, output)


class NpyRows:
    """A float32 .npy file of `shape`, its header written by numpy (`open_memmap`), its rows
    written by offset through the page cache: unlike a live memory map, whose written pages
    count in the process' resident memory until it is closed, this keeps memory flat
    whatever the number of rows."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        header = np.lib.format.open_memmap(path, "w+", np.float32, shape)  # header + sparse file
        self.offset, self.row_bytes = header.offset, 4 * int(np.prod(shape[1:]))
        del header
        self.handle = path.open("r+b")

    def write(self, row: int, values: np.ndarray) -> None:
        self.handle.seek(self.offset + row * self.row_bytes)
        self.handle.write(np.ascontiguousarray(values, dtype=np.float32).tobytes())

    def __enter__(self) -> NpyRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def cache_bytes(extractor, rows: int) -> int:
    """Bytes that `rows` cached rows of every output take (float32)."""
    return rows * sum(4 * int(np.prod(t.shape[1:])) for t in extractor.outputs)


def check_free_space(needed: int, folder: Path) -> None:
    """Stop with one line, before writing, when `folder`'s disk has less than `needed` bytes free."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise UserError(
            f"{folder}: the feature cache needs {needed / 2**30:.1f} GiB but the disk has "
            f"{free / 2**30:.1f} GiB free: lower features.augment_copies (or free some space)"
        )


def augmented_of(features: FeaturesParams, seed: int) -> Augmented | None:
    if not features.augment_copies:
        return None
    return Augmented(features.augment_copies, AugmentationFactors(**features.augmentation.model_dump()), seed)


def run(params_file: Path) -> None:
    params = load_params(params_file)
    import mlflow

    from pipeline.tracking import tracked

    catalog.require_inputs(STAGE)
    with np.load(IMAGES) as data:
        class_names = [str(name) for name in data["class_names"]]
        splits = {split: (data[f"x_{split}"], data[f"y_{split}"]) for split in SPLITS}
    augmented = augmented_of(params.features, params.seed)
    blocks = params.features.pooled_blocks
    extractor = feature_extractor(str(WEIGHTS), splits["train"][0].shape[1:], params.finetune.unfreeze, blocks)
    train_views = views_per_photo(params.features.mirror_train, augmented)
    views = {split: train_views if split == "train" else 1 for split in SPLITS}
    rows = sum(len(images) * views[split] for split, (images, _) in splits.items())
    check_free_space(cache_bytes(extractor, rows), OUT.parent)  # before anything is written
    with tracked(STAGE, params):
        photos, started = 0, time.perf_counter()
        with atomic_path(OUT, directory=True) as staging:
            for split, (images, labels) in splits.items():
                train = split == "train"
                extract(
                    extractor,
                    images,
                    params.features.batch_size,
                    staging / f"{split}_frozen.npy",
                    staging / f"{split}_pooled.npy",
                    train and params.features.mirror_train,
                    augmented if train else None,
                    [staging / block_features_file(split, block) for block in blocks],
                )
                np.save(staging / f"{split}_labels.npy", np.concatenate([labels] * views[split]))
                photos += len(images) * views[split]
            (staging / "class_names.json").write_text(json.dumps(class_names) + "\n")
        mlflow.log_metrics({"photos": photos, "photos_per_second": photos / (time.perf_counter() - started)})
