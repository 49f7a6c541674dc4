"""train_block_heads: what each VGG16 block knows, measured.

A small head (block_heads params: standardise, Dense, Dropout, output) is trained on the
globally average-pooled output of each VGG16 block that extract_features cached in its one
pass (data/features/<split>_block<N>_gap.npy, for `features.pooled_blocks`), and scored on
the test photos' features: exactly the photos evaluate scores the classifiers on. No model is
saved (they are probes of the frozen ImageNet features, not classifiers to ship).

Writes metrics/block_heads.json, headline numbers only: per block `block<N>` test_accuracy,
test_accuracy_ci95 ([low, high], Wilson), test_loss, test_samples, epochs, seconds_per_epoch;
per two adjacent blocks `block<M>_vs_block<N>` the exact McNemar p_value and the test photos
only one of them got right. And plots/block_heads/: accuracy_by_block.csv (a DVC plot) and
.png, history_block<N>.csv per head, correct.csv (0/1 per test photo and block).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import catalog
from pipeline.params import Params, load_params
from pipeline.stages.common import Distribution, FitResult, distribution_scope, fit, start_training

STAGE = catalog.STAGES["train_block_heads"]
FEATURES = catalog.FEATURES
PLOTS = catalog.BLOCK_HEADS_PLOTS
METRICS = catalog.BLOCK_HEADS_METRICS
SPLITS = ("train", "validation", "test")
BLOCK_FILE = re.compile(r"train_block(\d+)_gap\.npy")

Splits = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class BlockHead:
    """One block's head: its training and its scores on the test features."""

    block: int
    fit: FitResult
    scores: dict  # test_accuracy, test_accuracy_ci95, test_loss, test_samples
    correct: np.ndarray  # (N,) bool: the head was right on test photo i

    @property
    def key(self) -> str:
        return f"block{self.block}"


def cached_blocks(folder: Path = FEATURES) -> list[int]:
    """The blocks whose pooled outputs extract_features cached in `folder`, shallow to deep."""
    return sorted(
        int(match[1]) for path in folder.glob("train_block*_gap.npy") if (match := BLOCK_FILE.fullmatch(path.name))
    )


def load_block_features(block: int, folder: Path = FEATURES) -> Splits:
    """{split: (pooled block output (N, C), labels)} of one block."""
    from pipeline.stages.extract_features import block_features_file

    return {
        split: (np.load(folder / block_features_file(split, block)), np.load(folder / f"{split}_labels.npy"))
        for split in SPLITS
    }


def build_block_head_model(block: int, train_features: np.ndarray, num_classes: int, params: Params):
    """One block's head, compiled (call it inside the strategy's scope)."""
    from pipeline.models.optimizer import make_optimizer
    from pipeline.models.vgg import build_block_head
    from pipeline.stages.vgg_common import loss_for

    p = params.block_heads
    model = build_block_head(train_features, num_classes, p.units, p.dropout, name=f"block{block}_head")
    model.compile(
        optimizer=make_optimizer(p.optimizer, p.learning_rate), loss=loss_for(num_classes), metrics=["accuracy"]
    )
    return model


def fit_block_head(
    block: int, model, splits: Splits, class_names: list[str], params: Params, replicas: int
) -> BlockHead:
    """Fit and test one block's head (its per-epoch metrics logged as block<N>.*)."""
    from pipeline.evaluation import class_probabilities, score

    p = params.block_heads
    result = fit(
        model,
        splits["train"],
        splits["validation"],
        p.epochs,
        p.batch_size * replicas,
        p.early_stopping_patience,
        params.train.tf_data,
        params.seed,
        metric_prefix=f"block{block}.",
    )
    features, labels = splits["test"]
    outputs = model.predict(features, batch_size=256, verbose=0)
    correct = class_probabilities(outputs).argmax(axis=1) == labels
    return BlockHead(block, result, score(labels, outputs, class_names), correct)


def train_block_heads(
    features: dict[int, Splits], class_names: list[str], params: Params, distribution: Distribution | None = None
) -> list[BlockHead]:
    """A head per block of `features` ({block: splits}), shallow to deep: all built in the
    strategy's scope (entered once: it is a one-use context manager), then each fitted."""
    scope, replicas = distribution or distribution_scope(params.train)
    blocks = sorted(features)
    with scope:
        models = {
            block: build_block_head_model(block, features[block]["train"][0], len(class_names), params)
            for block in blocks
        }
    return [fit_block_head(block, models[block], features[block], class_names, params, replicas) for block in blocks]


def block_metrics(heads: list[BlockHead]) -> dict[str, dict]:
    """metrics/block_heads.json: each block's headline numbers, and the paired test of each
    block against the one before it (same test photos, so McNemar's exact test applies)."""
    from pipeline.evaluation import paired_test

    metrics: dict[str, dict] = {
        head.key: {
            **head.scores,
            "epochs": int(len(head.fit.history)),
            "seconds_per_epoch": round(head.fit.seconds_per_epoch, 3),
        }
        for head in heads
    }
    for shallower, deeper in zip(heads, heads[1:]):
        metrics[f"{deeper.key}_vs_{shallower.key}"] = paired_test(
            deeper.key, deeper.correct, shallower.key, shallower.correct
        )
    return metrics


def accuracy_frame(heads: list[BlockHead]):
    """accuracy_by_block.csv: block, test_accuracy, ci95_low, ci95_high, one row per block."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "block": head.key,
                "test_accuracy": head.scores["test_accuracy"],
                "ci95_low": head.scores["test_accuracy_ci95"][0],
                "ci95_high": head.scores["test_accuracy_ci95"][1],
            }
            for head in heads
        ]
    )


def write_plots(folder: Path, heads: list[BlockHead]) -> None:
    import pandas as pd

    from pipeline.viz.evidence import accuracy_with_intervals_figure

    accuracy_frame(heads).to_csv(folder / catalog.BLOCK_HEADS_ACCURACY.name, index=False)
    for head in heads:
        head.fit.history.to_csv(folder / f"history_{head.key}.csv", index=False)
    correct = pd.DataFrame({head.key: head.correct.astype(np.int8) for head in heads})
    correct.insert(0, "sample", np.arange(len(correct)))
    correct.to_csv(folder / "correct.csv", index=False)
    figure = accuracy_with_intervals_figure(
        [head.key for head in heads],
        [head.scores["test_accuracy"] for head in heads],
        [head.scores["test_accuracy_ci95"] for head in heads],
        "A small head on each VGG16 block's pooled output (ImageNet weights, frozen)",
        xlabel="depth: the block whose output the head reads",
    )
    figure.savefig(folder / "accuracy_by_block.png", dpi=100)


def mlflow_metrics(metrics: dict[str, dict]) -> dict[str, float]:
    """block_heads.json flattened: block3.test_accuracy, block3.test_accuracy_ci95_low, ...,
    block4_vs_block3.p_value."""
    flat = {}
    for key, values in metrics.items():
        for name, value in values.items():
            if name == "test_accuracy_ci95":
                flat[f"{key}.{name}_low"], flat[f"{key}.{name}_high"] = value
            else:
                flat[f"{key}.{name}"] = float(value)
    return flat


def run(params_file: Path) -> None:
    params = load_params(params_file)  # first: a bad param is reported before TensorFlow loads
    import json

    import mlflow

    from pipeline.errors import UserError
    from pipeline.files import atomic_path, write_json
    from pipeline.tracking import tracked

    distribution = start_training(params, *catalog.upstream(STAGE))
    blocks = cached_blocks()
    if not blocks:
        raise UserError(f"{FEATURES} holds no pooled block features: run `dvc repro extract_features` again")
    features = {block: load_block_features(block) for block in blocks}
    class_names = json.loads((FEATURES / "class_names.json").read_text())
    with tracked(STAGE, params):
        heads = train_block_heads(features, class_names, params, distribution)
        metrics = block_metrics(heads)
        with atomic_path(PLOTS, directory=True) as plots:
            write_plots(plots, heads)
        write_json(METRICS, metrics)
        mlflow.log_metrics(mlflow_metrics(metrics))
        mlflow.log_artifacts(str(PLOTS), artifact_path="plots")
    for head in heads:
        low, high = head.scores["test_accuracy_ci95"]
        print(f"{head.key}: test accuracy {head.scores['test_accuracy']:.4f} (95% CI {low:.4f}-{high:.4f})")
