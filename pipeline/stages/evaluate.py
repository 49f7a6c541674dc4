"""evaluate: every model scored on its own test split, with the pictures of what it got wrong.

The baseline on the MNIST test digits; models/head.keras ("feature_extraction") and
models/finetuned.keras ("fine_tuning") on the test photos, raw photos in, so the saved
models are checked end to end. Writes metrics/evaluate.json (the headline numbers: per model
test_accuracy with its 95% Wilson interval test_accuracy_ci95, test_loss, test_samples; per
two models scored on the same test set, e.g. fine_tuning_vs_feature_extraction, the exact
McNemar p-value and the samples only one of them got right) and plots/evaluate/: per model a
confusion CSV (one `actual,predicted` row per test sample: a DVC confusion plot), the
confusion matrix and the misclassified examples as PNGs; per_class.csv (precision, recall,
F1, support of every class of every model); per test set correct_<set>.csv (0/1 per sample
and model, what the paired tests count); and Grad-CAM heat maps of the fine-tuned model over
test photos; registry.json says what the model registry did with each model (a version of
its registered name, champion or challenger: pipeline/registry.py). One MLflow run, like
every stage, whose inputs are the test splits (with their sha256).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import catalog
from pipeline.catalog import IMAGES, MNIST, MODELS, PAIRS
from pipeline.errors import UserError
from pipeline.params import EvaluateParams, TranslationParams, load_params

if TYPE_CHECKING:
    import pandas as pd

STAGE = catalog.STAGES["evaluate"]
METRICS = catalog.EVALUATE_METRICS
PLOTS = catalog.EVALUATE_PLOTS
GRADCAM_MODEL = "fine_tuning"
TRANSLATED = [name for name, trained in MODELS.items() if trained.test_data == MNIST]  # scored on shifted digits
TRANSLATION_TITLES = {"baseline": "convnet (baseline)", "dense": "Dense-only"}


@dataclass
class LabelledImages:
    images: np.ndarray  # (N, H, W, C) in the model's input format
    labels: np.ndarray  # (N,) integer classes
    class_names: list[str]


@dataclass
class Evaluated:
    """One model's outputs on its test set and the scores computed from them."""

    test: LabelledImages
    outputs: np.ndarray  # the model's outputs (N, K) or (N, 1): its logits when from_logits
    from_logits: bool
    scores: dict  # its headline numbers in evaluate.json

    @property
    def probabilities(self) -> np.ndarray:
        from pipeline.evaluation import class_probabilities

        return class_probabilities(self.outputs, self.from_logits)

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.test.labels

    @cached_property
    def per_class(self) -> dict[str, dict]:
        """{class: {precision, recall, f1, support}} on its test set."""
        from pipeline.evaluation import per_class_metrics

        return per_class_metrics(self.test.labels, self.predicted, self.test.class_names)


def load_test_sets() -> dict[Path, LabelledImages]:
    """The MNIST and photo test splits (images as stored: float [0, 1] digits, uint8 photos)."""
    from pipeline.evaluation import label_indices

    with np.load(MNIST) as data:
        labels = label_indices(data["y_test"])
        digits = LabelledImages(data["x_test"], labels, [str(i) for i in range(data["y_test"].shape[1])])
    with np.load(IMAGES) as data:
        class_names = [str(name) for name in data["class_names"]]
        photos = LabelledImages(data["x_test"], label_indices(data["y_test"]), class_names)
    return {MNIST: digits, IMAGES: photos}


def predict_all(models: dict, test_sets: dict[Path, LabelledImages], batch_size: int) -> tuple[dict, dict]:
    """Each model's (outputs, from_logits) on its test set, and inference timings per test set.

    The outputs are the logits when a model ends in a sigmoid or softmax (so the loss is
    exact, as in Keras' evaluate). Models that take the same test set run together, so the
    layers they share (VGG16's frozen blocks) are computed once per photo. Timings:
    `inference_seconds.<set>` and `samples_per_second.<set>` (set = "mnist" or "images").
    """
    from pipeline.models.inference import logit_model, predict_together

    outputs: dict[str, tuple[np.ndarray, bool]] = {}
    timings: dict[str, float] = {}
    for data, test in test_sets.items():
        names = [name for name, trained in MODELS.items() if trained.test_data == data]
        scorers = [logit_model(models[name]) for name in names]
        started = time.perf_counter()
        results = predict_together([scorer for scorer, _ in scorers], test.images, batch_size)
        seconds = time.perf_counter() - started
        for name, result, (_, from_logits) in zip(names, results, scorers):
            outputs[name] = (result, from_logits)
        timings[f"inference_seconds.{data.stem}"] = round(seconds, 3)
        timings[f"samples_per_second.{data.stem}"] = round(len(test.images) / max(seconds, 1e-9), 2)
    return outputs, timings


def gradcam_figure_for(model, evaluated: Evaluated, p: EvaluateParams):
    """Grad-CAM over `p.gradcam.photos` test photos (up to half misclassified), titled
    with the true class, the predicted class and the model's confidence in it."""
    from pipeline.evaluation import pick_examples
    from pipeline.models.graph import conv_layer_names
    from pipeline.viz.gradcam import grad_cam, gradcam_figure

    conv_layers = conv_layer_names(model)
    if p.gradcam.layer not in conv_layers:
        raise UserError(
            f"evaluate.gradcam.layer: {p.gradcam.layer!r} is not a conv layer of the fine-tuned model "
            f"(last ones: {', '.join(conv_layers[-3:])})"
        )
    test, predicted = evaluated.test, evaluated.predicted
    chosen = pick_examples(test.labels, predicted, p.gradcam.photos)
    images = test.images[chosen]
    heatmaps = grad_cam(model, images.astype(np.float32), p.gradcam.layer, None)
    confidence = evaluated.probabilities[chosen, predicted[chosen]]
    names = test.class_names
    titles = [
        f"{'WRONG ' if test.labels[i] != predicted[i] else ''}true {names[test.labels[i]]} / "
        f"pred {names[predicted[i]]} ({conf:.0%})"
        for i, conf in zip(chosen, confidence)
    ]
    figure = gradcam_figure(images, heatmaps, titles)
    figure.suptitle(f"Grad-CAM at {p.gradcam.layer}: where the fine-tuned model saw its predicted class", fontsize=10)
    return figure


def model_figures(name: str, evaluated: Evaluated, p: EvaluateParams) -> dict:
    """{file name: Figure}: the confusion matrix and the misclassified examples of one model."""
    from pipeline.evaluation import confusion
    from pipeline.viz.confusion import confusion_matrix_figure, misclassified_figure

    test = evaluated.test
    matrix = confusion(test.labels, evaluated.predicted, len(test.class_names))
    return {
        f"confusion_{name}.png": confusion_matrix_figure(matrix, test.class_names, name.replace("_", " ")),
        f"misclassified_{name}.png": misclassified_figure(
            test.images, test.labels, evaluated.predicted, test.class_names, p.misclassified
        ),
    }


def per_class_frame(evaluated: dict[str, Evaluated]) -> pd.DataFrame:
    """per_class.csv: one row per model and class (model, class, precision, recall, f1, support)."""
    import pandas as pd

    rows = [
        {"model": name, "class": class_name, **values}
        for name, result in evaluated.items()
        for class_name, values in result.per_class.items()
    ]
    return pd.DataFrame(rows, columns=["model", "class", "precision", "recall", "f1", "support"])


def correct_frames(evaluated: dict[str, Evaluated]) -> dict[Path, pd.DataFrame]:
    """{correct_<set>.csv: frame}: per test set, a `sample` index and a 0/1 column per model."""
    import pandas as pd

    frames = {}
    for data in dict.fromkeys(trained.test_data for trained in MODELS.values()):
        scored = {name: result.correct for name, result in evaluated.items() if MODELS[name].test_data == data}
        samples = len(next(iter(scored.values())))
        columns = {name: correct.astype(np.int8) for name, correct in scored.items()}
        frames[catalog.evaluate_correct(data)] = pd.DataFrame({"sample": np.arange(samples), **columns})
    return frames


def write_plots(folder: Path, evaluated: dict[str, Evaluated], figures: dict, translation: list[dict]) -> None:
    """The confusion CSVs (class names, one row per test sample), per_class.csv, the
    correct_<set>.csv files, translation.csv (the translation curve) and the figures, as PNGs."""
    import pandas as pd

    for name, result in evaluated.items():
        names = np.asarray(result.test.class_names)
        frame = pd.DataFrame({"actual": names[result.test.labels], "predicted": names[result.predicted]})
        frame.to_csv(folder / f"confusion_{name}.csv", index=False)
    per_class_frame(evaluated).to_csv(folder / catalog.EVALUATE_PER_CLASS.name, index=False)
    for path, correct in correct_frames(evaluated).items():
        correct.to_csv(folder / path.name, index=False)
    if translation:
        pd.DataFrame(translation).to_csv(folder / catalog.EVALUATE_TRANSLATION.name, index=False)
    for file_name, figure in figures.items():
        figure.savefig(folder / file_name, dpi=100)


def paired_tests(evaluated: dict[str, Evaluated]) -> dict[str, dict]:
    """{"later_vs_earlier": {p_value, only_<later>_right, only_<earlier>_right}} for each pair
    of models scored on the same test samples (catalog.PAIRS)."""
    from pipeline.evaluation import paired_test

    return {
        key: paired_test(later, evaluated[later].correct, earlier, evaluated[earlier].correct)
        for key, (later, earlier) in PAIRS.items()
    }


def mlflow_metrics(results: dict[str, dict], evaluated: dict[str, Evaluated]) -> dict[str, float]:
    """evaluate.json flattened to MLflow metric names: `model.test_accuracy`,
    `model.test_accuracy_ci95_low` and `_high`, `fine_tuning_vs_feature_extraction.p_value`,
    and the per-class table as `model.precision.CLASS` (class names reduced to the
    characters MLflow accepts)."""
    flat = {}
    for model in MODELS:
        for key in ("test_accuracy", "test_loss", "test_samples"):
            flat[f"{model}.{key}"] = float(results[model][key])
        low, high = results[model]["test_accuracy_ci95"]
        flat[f"{model}.test_accuracy_ci95_low"], flat[f"{model}.test_accuracy_ci95_high"] = low, high
        for class_name, values in evaluated[model].per_class.items():
            safe = re.sub(r"[^\w.\- /]", "_", class_name)
            for key in ("precision", "recall", "f1"):
                flat[f"{model}.{key}.{safe}"] = values[key]
    for pair in PAIRS:
        flat.update({f"{pair}.{key}": float(value) for key, value in results[pair].items()})
    return flat


def log_translation_curve(curve: list[dict]) -> None:
    """The pooled curve as MLflow metrics with step = pixels (the MLflow UI draws it):
    `translation.<model>.accuracy` and its `_ci95_low` / `_ci95_high`."""
    import mlflow

    for row in curve:
        if row["direction"] == "all":
            name = f"translation.{row['model']}.accuracy"
            values = {name: row["accuracy"], f"{name}_ci95_low": row["ci95_low"], f"{name}_ci95_high": row["ci95_high"]}
            mlflow.log_metrics(values, step=row["pixels"])


def evaluate_models(
    models: dict, test_sets: dict[Path, LabelledImages], p: EvaluateParams
) -> tuple[dict[str, Evaluated], dict]:
    """({model name: Evaluated}, inference timings): every model's outputs and scores."""
    from pipeline.evaluation import score

    outputs, timings = predict_all(models, test_sets, p.batch_size)
    evaluated = {}
    for name, trained in MODELS.items():
        test, (result, from_logits) = test_sets[trained.test_data], outputs[name]
        scores = score(test.labels, result, test.class_names, from_logits)
        evaluated[name] = Evaluated(test, result, from_logits, scores)
    return evaluated, timings


def test_data_tags(test_sets: dict[Path, LabelledImages]) -> dict[str, str]:
    """{"test_data.<set>.sha256": hash of its images, labels and their shapes}: two evaluate runs
    with the same hash scored the same samples in the same order (`pipeline compare --paired`)."""
    import hashlib

    tags = {}
    for data, test in test_sets.items():
        digest = hashlib.sha256()
        for array in (test.images, test.labels):
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        tags[f"test_data.{data.stem}.sha256"] = digest.hexdigest()
    return tags


def translation_scores(models: dict, digits: LabelledImages, p: TranslationParams, batch_size: int) -> list[dict]:
    """The MNIST models on the first `p.samples` test digits shifted 0..`p.max_shift` pixels in
    each direction (zero fill): evaluation.pooled_curve's rows (per direction, and pooled)."""
    from pipeline.data.shift import shifted_sets
    from pipeline.evaluation import pooled_curve

    images, labels = digits.images[: p.samples or None], digits.labels[: p.samples or None]
    rows = []
    for direction, pixels, shifted in shifted_sets(images, p.max_shift):
        for name in TRANSLATED:
            predicted = models[name].predict(shifted, batch_size=batch_size, verbose=0).argmax(axis=1)
            correct = int(np.sum(predicted == labels))
            rows.append(
                {"model": name, "direction": direction, "pixels": pixels, "correct": correct, "samples": len(labels)}
            )
    return pooled_curve(rows)


def translation_headline(curve: list[dict], max_shift: int) -> dict:
    """evaluate.json's `translation`: per MNIST model the accuracy at the largest shift (the
    four directions pooled) with its 95% interval; the whole curve is plots/evaluate/translation.csv."""
    headline: dict = {"max_shift": max_shift}
    for row in curve:
        if row["direction"] == "all" and row["pixels"] == max_shift:
            headline[row["model"]] = {"accuracy": row["accuracy"], "accuracy_ci95": [row["ci95_low"], row["ci95_high"]]}
    return headline


def all_figures(models: dict, evaluated: dict[str, Evaluated], p: EvaluateParams) -> dict:
    """{file name: Figure}: each model's confusion matrix and mistakes, and the Grad-CAM maps."""
    figures: dict = {}
    for name, result in evaluated.items():
        figures.update(model_figures(name, result, p))
    gradcam = gradcam_figure_for(models[GRADCAM_MODEL], evaluated[GRADCAM_MODEL], p)
    figures[f"gradcam_{GRADCAM_MODEL}.png"] = gradcam
    return figures


def log_test_data() -> dict[Path, str]:
    """Each test split as an input of the active run ("evaluation"); {test data: sha256}.
    The hash is of the arrays as stored, as the training runs log it for their test split."""
    from pipeline.tracking import log_datasets

    hashes = {}
    for data in dict.fromkeys(trained.test_data for trained in MODELS.values()):
        with np.load(data) as arrays:
            split = {"test": (arrays["x_test"], arrays["y_test"])}
        hashes[data] = log_datasets(data, split, {"test": "evaluation"})["test"]
    return hashes


def register_models(models: dict, evaluated: dict[str, Evaluated], p: EvaluateParams, run_id: str) -> dict:
    """Every scored model a version in MLflow's registry, the champion moved only when a new
    one is measurably better (pipeline/registry.py); {model: Registered}."""
    from pipeline.registry import Scored, register_all

    hashes = log_test_data()
    scored = {
        name: Scored(
            name,
            models[name],
            result.correct,
            hashes[MODELS[name].test_data],
            result.test.class_names,
            float(result.scores["test_accuracy"]),
            result.test.images[:1],
        )
        for name, result in evaluated.items()
    }
    return register_all(scored, p.registry, run_id)


def run(params_file: Path) -> None:
    params = load_params(params_file)  # first: a bad param is reported before TensorFlow loads
    from pipeline.registry import as_json, check_names, summary

    check_names(params.evaluate.registry)
    import keras
    import mlflow

    import pipeline.models.vgg  # noqa: F401 - registers VGGPreprocess, which the VGG models hold
    from pipeline.data.shift import check_max_shift
    from pipeline.files import atomic_path, write_json
    from pipeline.tracking import tracked
    from pipeline.viz.translation import translation_figure

    p = params.evaluate
    catalog.require_inputs(STAGE)
    test_sets = load_test_sets()
    check_max_shift(p.translation.max_shift, test_sets[MNIST].images.shape[1:], "evaluate.translation.max_shift")
    with tracked(STAGE, params) as run:
        mlflow.set_tags(test_data_tags(test_sets))
        models = {name: keras.models.load_model(trained.model) for name, trained in MODELS.items()}
        evaluated, timings = evaluate_models(models, test_sets, p)
        figures = all_figures(models, evaluated, p)
        started = time.perf_counter()
        translation = translation_scores(models, test_sets[MNIST], p.translation, p.batch_size)
        timings["translation_seconds"] = round(time.perf_counter() - started, 3)
        figures["translation.png"] = translation_figure(translation, TRANSLATION_TITLES)
        # The run id in each model's entry ties evaluate.json to this MLflow run.
        results: dict[str, dict] = {
            name: {**result.scores, "mlflow_run_id": run.info.run_id} for name, result in evaluated.items()
        }
        results.update(paired_tests(evaluated))
        results["translation"] = translation_headline(translation, p.translation.max_shift)
        registered = register_models(models, evaluated, p, run.info.run_id)
        with atomic_path(PLOTS, directory=True) as plots:
            write_plots(plots, evaluated, figures, translation)
            write_json(plots / catalog.EVALUATE_REGISTRY.name, as_json(registered))
        write_json(METRICS, results)
        mlflow.set_tags({f"registry.{name}": summary(outcome) for name, outcome in registered.items()})
        mlflow.log_metrics({**mlflow_metrics(results, evaluated), **timings})
        log_translation_curve(translation)
        mlflow.log_artifacts(str(PLOTS), artifact_path="plots")
        mlflow.log_artifact(str(METRICS))
    for name in MODELS:
        result = results[name]
        low, high = result["test_accuracy_ci95"]
        print(
            f"{name}: test accuracy {result['test_accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}), "
            f"loss {result['test_loss']:.4f} on {result['test_samples']} samples"
        )
    for name, values in results["translation"].items():
        if isinstance(values, dict):
            print(f"{name}: accuracy {values['accuracy']:.4f} on test digits shifted {p.translation.max_shift} px")
    for pair, (later, earlier) in PAIRS.items():
        paired = results[pair]
        print(
            f"{later} vs {earlier}: McNemar p = {paired['p_value']:.4g} "
            f"({paired[f'only_{later}_right']} vs {paired[f'only_{earlier}_right']} samples only one got right)"
        )
    for outcome in registered.values():
        print(f"registry: {summary(outcome)}")
