"""The head against a plain logistic regression on the same frozen VGG16 features, same run.

A user brings photos, not hyperparameters: with the shipped head params (params.yaml), the
head must score within 3 points of scikit-learn's LogisticRegression fitted on the same
training rows (block5_pool globally averaged, standardized). Two photo sets:

1. `real`: the pipeline's own cache (data/features/*_pooled.npy, as extract_features wrote
   it with the current params: mirrors and augmented copies included in the training rows);
2. `ten_classes`: a 10-class photo set as a user's small folder would look (the issue's
   trial: 30/15/15 photos per class, 64 px, no mirrors), made from the MNIST digits the
   pipeline already has: each digit upscaled to 64 x 64 and made RGB (white on black),
   the first 30/15/15 of each class from MNIST's train/validation/test splits. Real images
   of ten classes that ImageNet never trained on, through the same frozen VGG16.

Needs the outputs of extract_features and prepare_mnist (and prepare_images,
download_weights). Prints JSON. `-S KEY=VALUE` (as `dvc exp run -S`, VALUE read as YAML)
measures other params than params.yaml's without editing it, e.g. a candidate default:
Run: `.venv/bin/python benchmarks/bench_head.py [-S head.learning_rate=5e-4 ...]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import numpy as np

from pipeline import catalog
from pipeline.errors import UserError
from pipeline.evaluation import wilson_interval
from pipeline.params import PARAMS_FILE, Params, parse_params

Splits = dict[str, tuple[np.ndarray, np.ndarray]]
SPLITS = ("train", "validation", "test")


def ten_class_photos(per_split: dict[str, int], size: int) -> tuple[Splits, list[str]]:
    """{split: (uint8 RGB photos, labels)} of MNIST digits, `per_split[split]` per class."""
    import tensorflow as tf

    splits = {}
    with np.load(catalog.MNIST) as data:
        for split in SPLITS:
            x, y = data[f"x_{split}"], data[f"y_{split}"].argmax(axis=1)
            rows = np.concatenate([np.flatnonzero(y == digit)[: per_split[split]] for digit in range(10)])
            photos = tf.image.resize(np.repeat(x[rows], 3, axis=-1) * 255.0, (size, size), antialias=True).numpy()
            splits[split] = (photos.round().clip(0, 255).astype(np.uint8), y[rows])
    return splits, [str(digit) for digit in range(10)]


def pooled_features(photos: Splits, params: Params) -> Splits:
    """block5_pool of every photo, through the stage's own extractor (VGG16, imagenet weights)."""
    from pipeline.stages.extract_features import feature_extractor

    extractor = feature_extractor(str(catalog.WEIGHTS), photos["train"][0].shape[1:], params.finetune.unfreeze)
    return {
        split: (extractor.predict(x, batch_size=params.features.batch_size, verbose=0)[1], y)
        for split, (x, y) in photos.items()
    }


def head_accuracy(features: Splits, num_classes: int, params: Params) -> dict:
    """train_head's own training (shipped head params) on `features`; its test accuracy."""
    from pipeline.stages.common import seed_everything
    from pipeline.stages.train_head import fit_head

    seed_everything(params.seed)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Keras' epoch lines: stdout holds only the JSON
        trained = fit_head(features, num_classes, params)
    return {
        "test_accuracy": trained.test_accuracy,
        "epochs": len(trained.fit.history),
        "kept_epoch": trained.fit.kept_epoch,
        "seconds": round(time.perf_counter() - started, 1),
    }


def logistic_regression_accuracy(features: Splits, max_iter: int) -> dict:
    """scikit-learn's LogisticRegression (default C) on the globally averaged, standardized features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    averaged = {split: (x.mean(axis=(1, 2)), y) for split, (x, y) in features.items()}
    started = time.perf_counter()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    model.fit(*averaged["train"])
    return {
        "test_accuracy": float(model.score(*averaged["test"])),
        "seconds": round(time.perf_counter() - started, 1),
    }


def compare(name: str, features: Splits, num_classes: int, params: Params, max_iter: int) -> dict:
    head = head_accuracy(features, num_classes, params)
    reference = logistic_regression_accuracy(features, max_iter)
    tests = len(features["test"][1])
    for result in (head, reference):
        result["test_accuracy_ci95"] = [
            round(v, 4) for v in wilson_interval(round(result["test_accuracy"] * tests), tests)
        ]
        result["test_accuracy"] = round(result["test_accuracy"], 4)
    return {
        "set": name,
        "classes": num_classes,
        "rows": {split: len(features[split][1]) for split in SPLITS},
        "head": head,
        "logistic_regression": reference,
        "head_minus_reference_points": round(100 * (head["test_accuracy"] - reference["test_accuracy"]), 1),
    }


def params_with(overrides: list[str]) -> Params:
    """params.yaml with each `KEY=VALUE` (a dotted key, a YAML value) set, then validated."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    raw = yaml.load(PARAMS_FILE.read_text(encoding="utf-8"))
    for override in overrides:
        key, sep, value = override.partition("=")
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not sep or not isinstance(node, dict) or leaf not in node:
            raise UserError(f"-S {override}: not KEY=VALUE with KEY a param of {PARAMS_FILE}")
        node[leaf] = yaml.load(value)
    return parse_params(raw, f"{PARAMS_FILE} with {' '.join(overrides)}" if overrides else str(PARAMS_FILE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="photo size of the 10-class set")
    parser.add_argument("--per-class", type=int, nargs=3, default=[30, 15, 15], metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--max-iter", type=int, default=2000, help="LogisticRegression's iteration bound")
    parser.add_argument("--sets", nargs="+", choices=("real", "ten_classes"), default=["real", "ten_classes"])
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    try:
        params = params_with(args.overrides)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    from pipeline.stages.vgg_common import load_features

    results = []
    if "real" in args.sets:
        real, class_names = load_features("pooled")
        results.append(compare("real", real, len(class_names), params, args.max_iter))
    if "ten_classes" in args.sets:
        photos, names = ten_class_photos(dict(zip(SPLITS, args.per_class, strict=True)), args.size)
        results.append(compare("ten_classes", pooled_features(photos, params), len(names), params, args.max_iter))
    print(json.dumps({"overrides": args.overrides, "results": results}, indent=2))


if __name__ == "__main__":
    main()
