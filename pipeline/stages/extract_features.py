"""extract_features: VGG16's frozen layers run once over every photo, cached.

For each split writes data/features/<split>_frozen.npy (the activation at the last frozen
layer: block4_pool for `finetune.unfreeze: 3`), <split>_pooled.npy (block5_pool, the head's
input), for each block N of `features.pooled_blocks` <split>_block<N>_gap.npy (blockN_pool
averaged over its positions: train_block_heads' input, tapped in the same forward pass) and
<split>_labels.npy, plus class_names.json. Batches go straight into memory-mapped files, so memory stays bounded
whatever the number of photos.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import catalog
from pipeline.errors import raise_if_signalled
from pipeline.files import atomic_path
from pipeline.params import load_params

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


def extract(
    extractor,
    images: np.ndarray,
    batch_size: int,
    frozen_out: Path,
    pooled_out: Path,
    mirrored: bool = False,
    blocks_out: Sequence[Path] = (),
) -> None:
    """Run `extractor` over `images` in batches, writing its outputs as .npy memory maps: the
    first two to `frozen_out` and `pooled_out`, any further ones to `blocks_out`, in order.

    With `mirrored`, the left-right mirror image of every photo follows the originals (rows
    N..2N-1): each cached row is still the exact activation of a real photo, so training on
    the cache stays exactly the full network's training, on twice the photos.
    """
    shapes = [tuple(t.shape[1:]) for t in extractor.outputs]
    rows = len(images) * (2 if mirrored else 1)
    frozen = np.lib.format.open_memmap(frozen_out, "w+", np.float32, (rows, *shapes[0]))
    pooled = np.lib.format.open_memmap(pooled_out, "w+", np.float32, (rows, *shapes[1]))
    blocks = [
        np.lib.format.open_memmap(path, "w+", np.float32, (rows, *shape)) for path, shape in zip(blocks_out, shapes[2:])
    ]
    starts = [(start, False) for start in range(0, len(images), batch_size)]
    if mirrored:
        starts += [(start, True) for start, _ in starts]
    for start, flip in tqdm(starts, desc=frozen_out.stem, unit="batch"):
        raise_if_signalled()  # a signal swallowed inside predict stops the loop here
        batch = images[start : start + batch_size]
        cached, head_input, *block_outputs = extractor.predict_on_batch(batch[:, :, ::-1] if flip else batch)
        row = start + (len(images) if flip else 0)
        frozen[row : row + len(batch)] = cached
        pooled[row : row + len(batch)] = head_input
        for block, output in zip(blocks, block_outputs):
            block[row : row + len(batch)] = output
    for written in (frozen, pooled, *blocks):
        written.flush()
    del frozen, pooled, blocks


def run(params_file: Path) -> None:
    params = load_params(params_file)
    import mlflow

    from pipeline.tracking import tracked

    catalog.require_inputs(STAGE)
    with np.load(IMAGES) as data:
        class_names = [str(name) for name in data["class_names"]]
        splits = {split: (data[f"x_{split}"], data[f"y_{split}"]) for split in SPLITS}
    with tracked(STAGE, params):
        blocks = params.features.pooled_blocks
        extractor = feature_extractor(str(WEIGHTS), splits["train"][0].shape[1:], params.finetune.unfreeze, blocks)
        photos, started = 0, time.perf_counter()
        with atomic_path(OUT, directory=True) as staging:
            for split, (images, labels) in splits.items():
                mirrored = split == "train" and params.features.mirror_train
                extract(
                    extractor,
                    images,
                    params.features.batch_size,
                    staging / f"{split}_frozen.npy",
                    staging / f"{split}_pooled.npy",
                    mirrored,
                    [staging / block_features_file(split, block) for block in blocks],
                )
                np.save(staging / f"{split}_labels.npy", np.concatenate([labels, labels]) if mirrored else labels)
                photos += len(images) * (2 if mirrored else 1)
            (staging / "class_names.json").write_text(json.dumps(class_names) + "\n")
        mlflow.log_metrics({"photos": photos, "photos_per_second": photos / (time.perf_counter() - started)})
