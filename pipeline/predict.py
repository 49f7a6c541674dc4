"""`pipeline predict`: a trained classifier on new picture files, one line (or row) per file.

The model is a registered version (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, from the
project's MLflow store) or a saved Keras file (`models/finetuned.keras`). What it takes
decides how a file is read (pipeline/data/inputs.py): a model of RGB photos gets the file
decoded as the training photos were (uint8, stretched to its square); a model of one-channel
28x28 digits gets an MNIST-like digit (white on black, centred, float in [0, 1]). Files that
do not decode are listed with the reason and skipped; the others are still predicted.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.params import PredictParams

REGISTRY_SCHEME = "models:/"


@dataclass
class Classifier:
    """A loaded image classifier and what its input and output mean."""

    reference: str  # as the user named it
    model: Any  # keras.Model
    class_names: list[str]
    digits: bool  # one grey channel: files are read as MNIST digits
    height: int
    width: int


@dataclass
class Prediction:
    file: str
    predicted: str | None = None  # the class, or None when the file did not decode
    probability: float | None = None
    error: str | None = None  # why it was skipped


# ---------------------------------------------------------------------------- the model


def load_classifier(reference: str) -> Classifier:
    """The model `reference` names, checked to be an image classifier (UserError if not)."""
    import pipeline.models.vgg  # noqa: F401 - registers VGGPreprocess, which the VGG models hold

    if reference.startswith(REGISTRY_SCHEME):
        model, class_names = _registered(reference)
    else:
        model, class_names = _saved(Path(reference))
    return _checked(reference, model, class_names)


def _registered(reference: str) -> tuple[Any, list[str] | None]:
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import tracking_uri

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    target = reference.removeprefix(REGISTRY_SCHEME).strip("/")
    if "@" in target:
        name, alias = target.split("@", 1)
    elif "/" in target:
        name, number = target.split("/", 1)
    else:
        raise UserError(f"--model {reference}: name a version (models:/NAME@ALIAS or models:/NAME/VERSION)")
    try:
        version = (
            client.get_model_version_by_alias(name, alias) if "@" in target else client.get_model_version(name, number)
        )
    except MlflowException:
        listing = _registry_listing(client)
        raise UserError(f"--model {reference}: not in the model registry of {uri} ({listing})") from None
    try:
        model = mlflow.keras.load_model(f"{REGISTRY_SCHEME}{name}/{version.version}")
    except MlflowException as exc:
        raise UserError(f"--model {reference}: not a Keras model ({_first_line(exc)})") from None
    names = version.tags.get("class_names")
    return model, json.loads(names) if names else None


def _registry_listing(client: Any) -> str:
    """ "registered: a (champion -> 2, challenger -> 3), b (...)" or "nothing is registered"."""
    models = client.search_registered_models()
    if not models:
        return "nothing is registered; `dvc repro evaluate` registers the models it scores"
    listed = []
    for registered in models:
        aliases = ", ".join(f"{alias} -> {version}" for alias, version in sorted(registered.aliases.items()))
        listed.append(f"{registered.name} ({aliases or 'no aliases'})")
    return "registered: " + "; ".join(listed)


def _saved(path: Path) -> tuple[Any, list[str] | None]:
    import keras

    if not path.exists():
        raise UserError(f"--model {path}: no such file (a .keras file, or models:/NAME@ALIAS)")
    try:
        model = keras.models.load_model(path)
    except Exception as exc:  # Keras raises ValueError, OSError, TypeError... for what is not a model
        raise UserError(f"--model {path}: not a Keras model file ({_first_line(exc)})") from None
    return model, _catalog_class_names(path)


def _catalog_class_names(path: Path) -> list[str] | None:
    """The class names of a model of the catalog, from the data it was tested on, if there."""
    from pipeline.catalog import MNIST, MODELS

    for trained in MODELS.values():
        if path.resolve() == trained.model.resolve() and trained.test_data.exists():
            if trained.test_data == MNIST:
                return None  # digits: their class names are their indices
            with np.load(trained.test_data) as data:
                return [str(name) for name in data["class_names"]]
    return None


def _checked(reference: str, model: Any, class_names: list[str] | None) -> Classifier:
    """A Classifier, or a UserError when `model` does not take pictures and give class scores."""
    inputs, outputs = getattr(model, "inputs", None) or [], getattr(model, "outputs", None) or []
    shapes = [tuple(tensor.shape) for tensor in inputs], [tuple(tensor.shape) for tensor in outputs]
    if len(inputs) != 1 or len(outputs) != 1:
        raise UserError(f"--model {reference}: takes {shapes[0]} and gives {shapes[1]}: not an image classifier")
    (image,), (scores,) = shapes
    if len(image) != 4 or image[3] not in (1, 3) or image[1] is None or image[2] is None or len(scores) != 2:
        raise UserError(
            f"--model {reference}: takes {image} and gives {scores}: not an image classifier "
            "(pictures (N, H, W, 3) or digits (N, H, W, 1) in, class scores (N, K) out)"
        )
    classes = max(2, int(scores[1]))  # one sigmoid unit: two classes
    if class_names is None or len(class_names) != classes:
        class_names = [str(i) for i in range(classes)]
    return Classifier(reference, model, class_names, image[3] == 1, int(image[1]), int(image[2]))


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


# ---------------------------------------------------------------------------- the files


def image_files(paths: Sequence[Path]) -> tuple[list[Path], bool]:
    """Every file named, and every picture file (by suffix) below every folder named, in
    order; and whether a folder was named (then a progress bar is shown)."""
    from pipeline.data.inputs import IMAGE_SUFFIXES

    files: list[Path] = []
    folders = False
    for path in paths:
        if path.is_dir():
            folders = True
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{path}: no picture files in it (JPEG, PNG, ...)")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files, folders


def read_input(classifier: Classifier, path: Path, p: PredictParams) -> np.ndarray:
    """The file as the model's input; raises UndecodableImage (with the reason) if it is not."""
    from pipeline.data.inputs import UndecodableImage, digit_input, photo_input

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UndecodableImage(f"unreadable ({exc.strerror or exc})") from None
    if classifier.digits:
        box = max(1, round(p.digit_box * classifier.height / 28))
        return digit_input(data, path.suffix, classifier.height, box)
    return photo_input(data, path.suffix, classifier.height, classifier.width)


def predict_files(classifier: Classifier, files: Sequence[Path], p: PredictParams, progress: bool) -> list[Prediction]:
    """One Prediction per file, in order: its class and probability, or why it was skipped."""
    from tqdm import tqdm

    from pipeline.data.inputs import UndecodableImage
    from pipeline.evaluation import class_probabilities

    results = [Prediction(str(path)) for path in files]
    batch: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        outputs = classifier.model.predict_on_batch(np.stack([array for _, array in batch]))
        probabilities = class_probabilities(np.asarray(outputs))
        for (index, _), row in zip(batch, probabilities):
            best = int(row.argmax())
            results[index].predicted, results[index].probability = classifier.class_names[best], float(row[best])
        batch.clear()

    for index, path in enumerate(tqdm(files, desc="predicting", unit="file", disable=None if progress else True)):
        try:
            batch.append((index, read_input(classifier, path, p)))
        except UndecodableImage as exc:
            results[index].error = exc.reason
        if len(batch) == p.batch_size:
            flush()
    if batch:
        flush()
    return results


# ---------------------------------------------------------------------------- the output


def render(predictions: Iterable[Prediction], output_format: str) -> tuple[str, str]:
    """(stdout, stderr): a table of the predicted files with the skipped ones on stderr, or
    CSV / JSON of every file (`error` filled for the skipped ones) with nothing on stderr."""
    rows = list(predictions)
    if output_format == "json":
        records = [{"file": r.file, "class": r.predicted, "probability": r.probability, "error": r.error} for r in rows]
        return json.dumps(records, indent=2) + "\n", ""
    if output_format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["file", "class", "probability", "error"])
        for r in rows:
            probability = "" if r.probability is None else f"{r.probability:.6f}"
            writer.writerow([r.file, r.predicted or "", probability, r.error or ""])
        return buffer.getvalue(), ""
    predicted = [r for r in rows if r.error is None]
    width = max((len(r.file) for r in predicted), default=0)
    classes = max((len(r.predicted or "") for r in predicted), default=0)
    table = "".join(f"{r.file:<{width}}  {r.predicted:<{classes}}  {r.probability:.4f}\n" for r in predicted)
    skipped = "".join(f"skipped {r.file}: {r.error}\n" for r in rows if r.error is not None)
    return table, skipped


def predict(paths: Sequence[Path], reference: str, output_format: str, p: PredictParams) -> tuple[str, str]:
    """`pipeline predict`: (stdout, stderr) text. The paths are checked before the model loads."""
    files, folders = image_files(paths)
    classifier = load_classifier(reference)
    return render(predict_files(classifier, files, p, progress=folders), output_format)
