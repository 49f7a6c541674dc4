"""Test-set scores of a classifier from its predictions: accuracy with its interval, loss,
per-class metrics, and the paired test of two classifiers scored on the same samples.

Pure numpy and scikit-learn: predicted probabilities and true labels in, numbers out. The
loss is computed from the same predictions as everything else, so the expensive forward
pass over the test photos runs once (no separate `model.evaluate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

# Keras clips probabilities to [EPSILON, 1 - EPSILON] in its cross-entropy losses; the same
# clip here gives the loss `model.evaluate` reports.
EPSILON = 1e-7


def class_probabilities(outputs: np.ndarray, from_logits: bool = False) -> np.ndarray:
    """(N, K) class probabilities from a model's outputs.

    In: (N, K) softmax outputs, or (N, 1) / (N,) sigmoid outputs (the probability of class 1
    of two); with `from_logits`, the scores before that softmax or sigmoid. Out: (N, K)
    float64, rows summing to 1.
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        positive = outputs.reshape(-1)
        if from_logits:
            positive = 0.5 * (1.0 + np.tanh(0.5 * positive))  # the sigmoid, without overflow
        return np.stack([1.0 - positive, positive], axis=1)
    if from_logits:
        shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    return outputs


def label_indices(labels: np.ndarray) -> np.ndarray:
    """(N,) integer labels from integer labels or (N, K) one-hot (or probability) rows."""
    labels = np.asarray(labels)
    return labels.argmax(axis=1) if labels.ndim == 2 else labels.astype(np.int64).reshape(-1)


def cross_entropy(labels: np.ndarray, outputs: np.ndarray, from_logits: bool = False) -> float:
    """Mean cross-entropy of (N,) integer labels, as Keras computes it in `model.evaluate`.

    From logits it is exact (Keras does the same when the model ends in a sigmoid or
    softmax): a confidently wrong prediction costs its full log-odds. From probabilities,
    they are clipped to [EPSILON, 1 - EPSILON] as Keras does, which caps each sample's loss.
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    if not from_logits:
        clipped = np.clip(class_probabilities(outputs), EPSILON, 1.0 - EPSILON)
        return float(-np.mean(np.log(clipped[np.arange(len(labels)), labels])))
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        z = outputs.reshape(-1)
        # log(1 + exp(-z)) for class 1, log(1 + exp(z)) for class 0, computed stably.
        return float(np.mean(np.logaddexp(0.0, np.where(labels == 1, -z, z))))
    top = outputs.max(axis=1)
    log_sum = top + np.log(np.exp(outputs - top[:, np.newaxis]).sum(axis=1))
    return float(np.mean(log_sum - outputs[np.arange(len(labels)), labels]))


def confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts: row = actual class, column = predicted class."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, predicted, labels=list(range(num_classes)))


def per_class_metrics(labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str]) -> dict[str, dict]:
    """{class name: {precision, recall, f1, support}} (scikit-learn; 0 where undefined).

    A class never predicted has precision 0 (not NaN), so the JSON stays valid and the
    number reads as "never right when it said so".
    """
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=list(range(len(class_names))), zero_division=0
    )
    return {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high): the Wilson score interval of a proportion `correct` / `total`.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or `total`
    correct, so it suits the small test sets of a quick run as well as the full one.
    """
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"a proportion needs 0 <= correct <= total and total > 0, not {correct} of {total}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    share, z2 = correct / total, z * z / total
    centre = (share + z2 / 2) / (1 + z2)
    half = z / (1 + z2) * math.sqrt(share * (1 - share) / total + z2 / (4 * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_a_right: int, only_b_right: int) -> float:
    """Two-sided p-value of the exact McNemar test: are two classifiers scored on the same
    samples equally good?

    Only the discordant samples (one right, the other wrong) carry evidence; under "equally
    good" each falls to either side with probability 1/2, so the p-value is the exact binomial
    probability of a split at least as lopsided as the one seen. No discordant sample: 1.0.
    """
    if only_a_right < 0 or only_b_right < 0:
        raise ValueError(f"discordant counts must be >= 0, not {only_a_right} and {only_b_right}")
    discordant, fewer = only_a_right + only_b_right, min(only_a_right, only_b_right)
    tail = sum(math.comb(discordant, k) for k in range(fewer + 1))
    return min(1.0, 2 * tail / 2**discordant)  # exact integers until this one division


def paired_test(a: str, a_correct: np.ndarray, b: str, b_correct: np.ndarray) -> dict:
    """McNemar's exact test of model `a` against model `b` from their per-sample correctness
    (booleans, same samples in the same order): {p_value, only_<a>_right, only_<b>_right}."""
    a_correct, b_correct = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a_correct.shape != b_correct.shape:
        raise ValueError(f"{a} and {b} were not scored on the same samples: {a_correct.shape} vs {b_correct.shape}")
    only_a, only_b = int(np.sum(a_correct & ~b_correct)), int(np.sum(b_correct & ~a_correct))
    return {"p_value": mcnemar_exact(only_a, only_b), f"only_{a}_right": only_a, f"only_{b}_right": only_b}


def score(labels: np.ndarray, outputs: np.ndarray, class_names: Sequence[str], from_logits: bool = False) -> dict:
    """The headline numbers evaluate.json holds for one model.

    In: true labels (integers or one-hot), the model's outputs on the same samples (or its
    logits, with `from_logits`), the class names in label order.
    Out: test_accuracy, test_accuracy_ci95 ([low, high], Wilson), test_loss, test_samples.
    """
    labels = label_indices(labels)
    probabilities = class_probabilities(outputs, from_logits)
    if probabilities.shape != (len(labels), len(class_names)):
        raise ValueError(
            f"outputs give {probabilities.shape[1]} classes for {probabilities.shape[0]} samples; "
            f"expected {len(class_names)} classes for {len(labels)} samples"
        )
    correct = probabilities.argmax(axis=1) == labels
    return {
        "test_accuracy": float(np.mean(correct)),
        "test_accuracy_ci95": list(wilson_interval(int(correct.sum()), len(labels))),
        "test_loss": cross_entropy(labels, outputs, from_logits),
        "test_samples": int(len(labels)),
    }


def pick_examples(labels: np.ndarray, predicted: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` test samples: up to half misclassified, the rest correct.

    Misclassified ones first (they are the instructive ones), each group in test order, so
    the choice is deterministic. Fewer than `count` only when there are fewer samples.
    """
    wrong = np.flatnonzero(predicted != labels)
    right = np.flatnonzero(predicted == labels)
    take_wrong = min(len(wrong), (count + 1) // 2)
    take_right = min(len(right), count - take_wrong)
    take_wrong = min(len(wrong), count - take_right)  # top up when there are few correct ones
    return np.concatenate([wrong[:take_wrong], right[:take_right]]).astype(np.int64)


def pooled_curve(rows: Sequence[dict]) -> list[dict]:
    """Accuracy against shift from per-direction counts, with each point's 95% Wilson interval.

    In: {model, direction, pixels, correct, samples} rows (direction "none" at 0 pixels).
    Out: the same rows with accuracy, ci95_low and ci95_high, and per model and shift a row of
    direction "all" that pools the directions (at 0 pixels, the unshifted digits). The pooled
    interval counts every shifted copy as a sample; copies of one digit are not independent,
    so it is somewhat narrower than an interval over distinct digits would be.
    """
    out: list[dict] = []
    pooled: dict[tuple, dict] = {}
    for row in rows:
        out.append(_with_interval(dict(row)))
        key = (row["model"], row["pixels"])
        total = pooled.setdefault(
            key, {"model": row["model"], "direction": "all", "pixels": row["pixels"], "correct": 0, "samples": 0}
        )
        total["correct"] += row["correct"]
        total["samples"] += row["samples"]
    return out + [_with_interval(row) for row in pooled.values()]


def _with_interval(row: dict) -> dict:
    low, high = wilson_interval(row["correct"], row["samples"])
    return {**row, "accuracy": row["correct"] / row["samples"], "ci95_low": low, "ci95_high": high}


def stratified_sample(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of `count` samples (all of them when there are fewer), drawn with
    `seed`: the classes take turns, each in a random order, so every class present is in it
    (as evenly as `count` allows)."""
    rng = np.random.default_rng(seed)
    queues = [rng.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels)]
    longest = max((len(queue) for queue in queues), default=0)
    turns = [queue[i] for i in range(longest) for queue in queues if i < len(queue)]
    return np.sort(np.asarray(turns[:count], dtype=np.int64))


def max_relative_difference(actual: np.ndarray, desired: np.ndarray) -> float:
    """max |actual - desired| over the largest |desired|: how far two float computations of
    the same outputs differ, relative to the outputs' magnitude (elements near zero come out
    of sums of large terms, so an element's own relative error says little)."""
    actual, desired = np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64)
    if actual.shape != desired.shape:
        raise ValueError(f"shapes differ: {actual.shape} and {desired.shape}")
    scale = float(np.max(np.abs(desired), initial=0.0))
    difference = float(np.max(np.abs(actual - desired), initial=0.0))
    if not scale:
        return float("inf") if difference else 0.0
    return difference / scale
