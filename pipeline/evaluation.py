"""Test-set scores of a classifier from its predictions: accuracy, loss, per-class metrics.

Pure numpy and scikit-learn: predicted probabilities and true labels in, numbers out. The
loss is computed from the same predictions as everything else, so the expensive forward
pass over the test photos runs once (no separate `model.evaluate`).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def score(labels: np.ndarray, outputs: np.ndarray, class_names: Sequence[str], from_logits: bool = False) -> dict:
    """Everything evaluate.json holds for one model.

    In: true labels (integers or one-hot), the model's outputs on the same samples (or its
    logits, with `from_logits`), the class names in label order.
    Out: test_accuracy, test_loss, test_samples, per_class.
    """
    labels = label_indices(labels)
    probabilities = class_probabilities(outputs, from_logits)
    if probabilities.shape != (len(labels), len(class_names)):
        raise ValueError(
            f"outputs give {probabilities.shape[1]} classes for {probabilities.shape[0]} samples; "
            f"expected {len(class_names)} classes for {len(labels)} samples"
        )
    predicted = probabilities.argmax(axis=1)
    return {
        "test_accuracy": float(np.mean(predicted == labels)),
        "test_loss": cross_entropy(labels, outputs, from_logits),
        "test_samples": int(len(labels)),
        "per_class": per_class_metrics(labels, predicted, class_names),
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
