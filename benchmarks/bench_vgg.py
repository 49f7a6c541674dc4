"""VGG16 speed and memory, measured against plain Keras in the same run.

1. extract_features throughput vs a bare `conv_base.predict` on the same photos;
2. one fine-tuning epoch (train + validation) on the cached activations vs the book-style
   loop that runs the whole VGG16 forward pass every epoch, with the same layers unfrozen;
3. with --memory N: peak RSS of `pipeline extract-features` on N photos (the real ones
   repeated), from /usr/bin/time -v.

Needs the outputs of prepare_images and download_weights (`dvc repro prepare_images
download_weights`). Prints JSON. Run: `.venv/bin/python benchmarks/bench_vgg.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGES = Path("data/prepared/images.npz")
WEIGHTS = Path("data/raw/weights/vgg16_notop.h5")


def timed(function, repeats: int) -> float:
    """Median wall seconds of `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def throughput(photos: np.ndarray, unfreeze: int, batch_size: int, repeats: int) -> dict:
    import keras

    from pipeline.models.vgg import build_conv_base
    from pipeline.stages.extract_features import extract, feature_extractor

    conv_base = build_conv_base(str(WEIGHTS), photos.shape[1:])
    extractor = feature_extractor(str(WEIGHTS), photos.shape[1:], unfreeze)
    with tempfile.TemporaryDirectory() as scratch:
        ours = lambda: extract(extractor, photos, batch_size, Path(scratch) / "f.npy", Path(scratch) / "p.npy")  # noqa: E731
        bare = lambda: conv_base.predict(  # noqa: E731
            keras.applications.vgg16.preprocess_input(photos.astype("float32")), batch_size=batch_size, verbose=0
        )
        bare(), ours()  # warm-up: tracing, oneDNN kernel selection
        bare_seconds, ours_seconds = timed(bare, repeats), timed(ours, repeats)
    return {
        "photos": len(photos),
        "bare_predict_photos_per_second": round(len(photos) / bare_seconds, 2),
        "extract_features_photos_per_second": round(len(photos) / ours_seconds, 2),
        "ratio_extract_to_bare": round(bare_seconds / ours_seconds, 3),
    }


def finetune_epoch(data: dict, unfreeze: int, batch_size: int) -> dict:
    import keras

    from pipeline.models.vgg import (
        assemble_classifier,
        build_conv_base,
        build_finetune_model,
        build_head,
        split_at_last_frozen_layer,
    )
    from pipeline.stages.extract_features import feature_extractor

    shape = data["x_train"].shape[1:]
    extractor = feature_extractor(str(WEIGHTS), shape, unfreeze)
    cached = {
        split: extractor.predict(data[f"x_{split}"], batch_size=32, verbose=0)[0] for split in ("train", "validation")
    }
    conv_base = build_conv_base(str(WEIGHTS), shape)
    frozen, top = split_at_last_frozen_layer(conv_base, unfreeze)
    head = build_head(top.output_shape[1:], 2, "gap", 256, 0.5)
    fast = build_finetune_model(top, head)
    book = assemble_classifier(conv_base, head, unfreeze)  # raw photos -> full VGG16 -> head
    assert [w.path for w in fast.trainable_weights] == [w.path for w in book.trainable_weights]

    def epoch(model, x_train, x_validation) -> float:
        model.compile(optimizer=keras.optimizers.RMSprop(1e-5), loss="binary_crossentropy", metrics=["accuracy"])
        model.fit(x_train[:batch_size], data["y_train"][:batch_size], epochs=1, batch_size=batch_size, verbose=0)
        started = time.perf_counter()  # after a warm-up step: tracing is not an epoch's cost
        model.fit(
            x_train,
            data["y_train"],
            validation_data=(x_validation, data["y_validation"]),
            epochs=1,
            batch_size=batch_size,
            verbose=0,
        )
        return time.perf_counter() - started

    cached_seconds = epoch(fast, cached["train"], cached["validation"])
    book_seconds = epoch(book, data["x_train"], data["x_validation"])
    return {
        "train_photos": len(data["x_train"]),
        "validation_photos": len(data["x_validation"]),
        "unfreeze": unfreeze,
        "cached_epoch_seconds": round(cached_seconds, 2),
        "full_forward_epoch_seconds": round(book_seconds, 2),
        "speedup": round(book_seconds / cached_seconds, 2),
    }


def peak_memory(count: int, params_file: Path) -> dict:
    """Peak RSS of the real extract_features stage on `count` photos, in a scratch project."""
    with np.load(IMAGES) as data:
        arrays = {key: data[key] for key in data.files}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "data/prepared").mkdir(parents=True)
        (root / "data/raw/weights").mkdir(parents=True)
        photos = np.concatenate([arrays["x_train"], arrays["x_validation"], arrays["x_test"]])
        repeated = np.resize(photos, (count, *photos.shape[1:]))
        labels = np.resize(np.concatenate([arrays["y_train"], arrays["y_validation"], arrays["y_test"]]), count)
        third = count // 3
        splits = {"train": slice(0, third), "validation": slice(third, 2 * third), "test": slice(2 * third, count)}
        np.savez(
            root / "data/prepared/images.npz",
            class_names=arrays["class_names"],
            **{f"x_{s}": repeated[i] for s, i in splits.items()},
            **{f"y_{s}": labels[i] for s, i in splits.items()},
        )
        del photos, repeated
        shutil.copy(WEIGHTS, root / WEIGHTS)
        shutil.copy(params_file, root / "params.yaml")
        pipeline = Path(sys.executable).parent / "pipeline"
        result = subprocess.run(
            ["/usr/bin/time", "-v", str(pipeline), "extract-features"],
            cwd=root,
            capture_output=True,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        if result.returncode != 0:
            raise SystemExit(result.stderr[-2000:])
        kilobytes = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", result.stderr).group(1)
    return {"photos": count, "peak_rss_gib": round(kilobytes / 2**20, 3), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=256, help="photos for the throughput test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", type=int, default=0, help="photos for the peak-memory test (0: skip)")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()

    from pipeline.params import load_params

    params = load_params(Path("params.yaml"))
    report: dict = {}
    if not args.skip_speed:
        with np.load(IMAGES) as npz:
            data = {key: npz[key] for key in npz.files}
        photos = np.resize(data["x_test"], (args.photos, *data["x_test"].shape[1:]))
        report["extract_features"] = throughput(
            photos, params.finetune.unfreeze, params.features.batch_size, args.repeats
        )
        report["finetune_epoch"] = finetune_epoch(data, params.finetune.unfreeze, params.finetune.batch_size)
    if args.memory:
        report["extract_features_memory"] = peak_memory(args.memory, Path("params.yaml"))
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
