"""evaluate: every model scored on its own test split, with the pictures of what it got wrong.

The baseline and the Dense model on the MNIST test digits, the convnet from scratch on the
test photos; models/head.keras ("feature_extraction") and models/finetuned.keras
("fine_tuning") on the test activations extract_features cached (data/features/test_*.npy,
memory-mapped): each model's layers above the cached layer run, not VGG16 again. A sample of
`evaluate.raw_sample` test photos (seeded, every class in it) runs through the two saved
whole models, so they are still checked end to end: their outputs must equal the cached
path's within `evaluate.raw_rtol`, else the stage fails with one line and writes nothing.
Writes metrics/evaluate.json (the headline numbers: per model
test_accuracy with its 95% Wilson interval test_accuracy_ci95, test_loss, test_samples; per
two models scored on the same test set, e.g. fine_tuning_vs_feature_extraction, the exact
McNemar p-value and the samples only one of them got right; raw_check: how many raw photos
were checked and each VGG16 model's largest relative difference) and plots/evaluate/: per model a
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
from pipeline.catalog import FEATURES, IMAGES, MNIST, MODELS, PAIRS
from pipeline.errors import UserError
from pipeline.params import EvaluateParams, Params, TranslationParams, load_params

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


# The VGG16 models, scored on extract_features' cached test activations.
CACHED_MODELS = ("feature_extraction", "fine_tuning")


def cached_inputs(unfreeze: int) -> dict[str, tuple[Path, int]]:
    """{VGG16 model: (its cached test activations, how many of its top conv layers run on them)}:
    the head reads block5_pool's output, the fine-tuned model the last frozen layer's."""
    feature_extraction, fine_tuning = CACHED_MODELS
    return {
        feature_extraction: (FEATURES / "test_pooled.npy", 0),
        fine_tuning: (FEATURES / "test_frozen.npy", unfreeze),
    }


def predict_cached(
    name: str, model, cache: Path, unfreeze: int, test: LabelledImages, batch_size: int
) -> tuple[np.ndarray, bool]:
    """`model`'s (outputs, from_logits) on the test photos, as `predict_all` gives them, from
    their activations in `cache` (memory-mapped): only its layers above the cached one run."""
    from pipeline.models.inference import cut_layer, layers_after, logit_model, predict_batches

    scorer, from_logits = logit_model(model)
    cut = cut_layer(scorer, unfreeze)
    top = layers_after(scorer, cut)
    activations = np.load(cache, mmap_mode="r")
    expected = (len(test.images), *top.inputs[0].shape[1:])
    if activations.shape != expected:
        raise UserError(
            f"{cache}: holds activations of shape {activations.shape}, but {name} needs {expected} "
            f"(the output of {cut} for each test photo): run `dvc repro extract_features`"
        )
    return predict_batches(top, activations, batch_size), from_logits


def predict_all(
    models: dict, test_sets: dict[Path, LabelledImages], batch_sizes: dict[Path, int], unfreeze: int
) -> tuple[dict, dict]:
    """Each model's (outputs, from_logits) on its test set, in batches of its set's
    `batch_sizes`, and inference timings per test set.

    The outputs are the logits when a model ends in a sigmoid or softmax (so the loss is
    exact, as in Keras' evaluate). The VGG16 models run on the cached activations
    (`cached_inputs`); the others on the test set, those that take the same one together,
    so the layers they share are computed once per sample. Timings: `inference_seconds.<set>`
    and `samples_per_second.<set>` (set = "mnist" or "images").
    """
    from pipeline.models.inference import logit_model, predict_together

    check_cached_labels(test_sets[IMAGES])
    cached = cached_inputs(unfreeze)
    outputs: dict[str, tuple[np.ndarray, bool]] = {}
    timings: dict[str, float] = {}
    for data, test in test_sets.items():
        batch_size = batch_sizes[data]
        names = [name for name, trained in MODELS.items() if trained.test_data == data and name not in cached]
        scorers = [logit_model(models[name]) for name in names]
        started = time.perf_counter()
        results = predict_together([scorer for scorer, _ in scorers], test.images, batch_size)
        for name, result, (_, from_logits) in zip(names, results, scorers):
            outputs[name] = (result, from_logits)
        if data == IMAGES:
            for name, (cache, layers) in cached.items():
                outputs[name] = predict_cached(name, models[name], cache, layers, test, batch_size)
        seconds = time.perf_counter() - started
        timings[f"inference_seconds.{data.stem}"] = round(seconds, 3)
        timings[f"samples_per_second.{data.stem}"] = round(len(test.images) / max(seconds, 1e-9), 2)
    return outputs, timings


def check_cached_labels(photos: LabelledImages) -> None:
    """The cache's test labels are the test split's, in its order (else the cache is stale)."""
    path = FEATURES / "test_labels.npy"
    if not np.array_equal(np.load(path), photos.labels):
        raise UserError(f"{path}: not the labels of {IMAGES}'s test photos: run `dvc repro extract_features`")


def check_raw_sample(
    models: dict, outputs: dict, photos: LabelledImages, p: EvaluateParams, seed: int
) -> tuple[dict, float]:
    """Run `p.raw_sample` test photos (seeded by `seed`, every class in it) through the saved
    whole VGG16 models and compare their outputs with the cached path's `outputs`.

    Returns ({"photos": N, "max_relative_difference": {model: d}}, seconds); raises a one-line
    UserError naming the model when a difference exceeds `p.raw_rtol`. Nothing runs for 0.
    """
    from pipeline.evaluation import max_relative_difference, stratified_sample
    from pipeline.models.inference import logit_model, predict_together

    names = list(CACHED_MODELS)
    chosen = stratified_sample(photos.labels, p.raw_sample, seed)
    checked: dict = {"photos": len(chosen), "max_relative_difference": {}}
    if not len(chosen):
        return checked, 0.0
    started = time.perf_counter()
    whole = predict_together([logit_model(models[name])[0] for name in names], photos.images[chosen], p.batch_size)
    seconds = round(time.perf_counter() - started, 3)
    for name, raw in zip(names, whole):
        difference = max_relative_difference(raw, outputs[name][0][chosen])
        if not difference <= p.raw_rtol:
            raise UserError(
                f"{name}: {MODELS[name].model} on {len(chosen)} raw test photos differs from its outputs on the "
                f"cached activations ({FEATURES}) by {difference:.3g} relative, above evaluate.raw_rtol "
                f"{p.raw_rtol:g}: the cache does not match the model; run `dvc repro -f extract_features`"
            )
        checked["max_relative_difference"][name] = difference
    return checked, seconds


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
    `raw_check.photos` and `raw_check.<model>.max_relative_difference`, and the per-class
    table as `model.precision.CLASS` (class names reduced to the characters MLflow accepts)."""
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
    checked = results["raw_check"]
    flat["raw_check.photos"] = checked["photos"]
    for model, difference in checked["max_relative_difference"].items():
        flat[f"raw_check.{model}.max_relative_difference"] = difference
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
    models: dict, test_sets: dict[Path, LabelledImages], params: Params
) -> tuple[dict[str, Evaluated], dict, dict]:
    """({model name: Evaluated}, inference timings, the raw photos' check): every model's
    outputs and scores, once the saved VGG16 models agreed with the cached path."""
    from pipeline.evaluation import score

    p = params.evaluate
    batch_sizes = {MNIST: p.digits_batch_size, IMAGES: p.batch_size}
    outputs, timings = predict_all(models, test_sets, batch_sizes, params.finetune.unfreeze)
    checked, timings["raw_check_seconds"] = check_raw_sample(models, outputs, test_sets[IMAGES], p, params.seed)
    evaluated = {}
    for name, trained in MODELS.items():
        test, (result, from_logits) = test_sets[trained.test_data], outputs[name]
        scores = score(test.labels, result, test.class_names, from_logits)
        evaluated[name] = Evaluated(test, result, from_logits, scores)
    return evaluated, timings, checked


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
    each direction (zero fill): evaluation.pooled_curve's rows (per direction, and pooled).

    Batch by batch (`predict_batches`), not one `model.predict` per shifted set: Keras sets up
    each predict call anew, which cost more than the 34 sets' forward passes (6.0 s against
    1.4 s for the default 17 sets of 2,000 digits, two models, measured on a 2-core CPU)."""
    from pipeline.data.shift import shifted_sets
    from pipeline.evaluation import pooled_curve
    from pipeline.models.inference import predict_batches

    images, labels = digits.images[: p.samples or None], digits.labels[: p.samples or None]
    rows = []
    for direction, pixels, shifted in shifted_sets(images, p.max_shift):
        for name in TRANSLATED:
            predicted = predict_batches(models[name], shifted, batch_size).argmax(axis=1)
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
        evaluated, timings, checked = evaluate_models(models, test_sets, params)
        figures = all_figures(models, evaluated, p)
        started = time.perf_counter()
        translation = translation_scores(models, test_sets[MNIST], p.translation, p.digits_batch_size)
        timings["translation_seconds"] = round(time.perf_counter() - started, 3)
        figures["translation.png"] = translation_figure(translation, TRANSLATION_TITLES)
        # The run id in each model's entry ties evaluate.json to this MLflow run.
        results: dict[str, dict] = {
            name: {**result.scores, "mlflow_run_id": run.info.run_id} for name, result in evaluated.items()
        }
        results.update(paired_tests(evaluated))
        results["translation"] = translation_headline(translation, p.translation.max_shift)
        results["raw_check"] = checked
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
