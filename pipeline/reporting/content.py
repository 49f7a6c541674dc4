"""What the report says: its sections, written from the pipeline's results.

Pure: the results (metrics, summaries, pictures, provenance, MLflow tables) come in as plain
data, a `Report` (see render.py) goes out. The wording is plain on purpose: a reader who has
not seen the code should learn how each model did and what its filters respond to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from pipeline.reporting.render import Block, Bullets, Picture, Preformatted, Report, Section, Table, Text


@dataclass
class ModelResult:
    """One trained model: how it was trained and how it did on its test split."""

    name: str  # key in evaluate.json: baseline, feature_extraction, fine_tuning
    title: str  # what a reader calls it, e.g. "VGG16 fine-tuned"
    data: str  # its test data, e.g. "MNIST digits"
    training: dict  # the training stage's metrics file (epochs, seconds_per_epoch, ...)
    evaluation: dict  # its entry in evaluate.json
    per_class: dict[str, dict]  # {class: {precision, recall, f1, support}}, from per_class.csv
    key_params: dict[str, object]  # the params that define it
    summary: str  # Keras' layer table (plots/<stage>/summary.txt)
    shapes: list[tuple[str, tuple]] = field(default_factory=list)  # (layer, output shape), in order


@dataclass
class Figures:
    """The report's pictures, by the section they belong to (any list may be empty)."""

    curves: list[Picture] = field(default_factory=list)
    evaluation: list[Picture] = field(default_factory=list)
    gradcam: list[Picture] = field(default_factory=list)
    classic: list[Picture] = field(default_factory=list)
    patterns: list[Picture] = field(default_factory=list)
    activations: list[Picture] = field(default_factory=list)


@dataclass
class ReportInputs:
    models: list[ModelResult]
    paired: dict[str, dict]  # evaluate.json's paired tests, e.g. {"fine_tuning_vs_feature_extraction": {...}}
    figures: Figures
    provenance: dict  # {"mnist": {...}, "images": {...}, "weights": {...}}; see provenance_section
    timings: pd.DataFrame  # one row per stage: stage, run_id, started, seconds
    earlier: pd.DataFrame  # one row per stage: this run vs the best run (see comparison_section)
    visualize_seconds: dict[str, float]  # what the report's own pictures cost
    generated: str  # when and from which commit, one line
    registry: dict = field(default_factory=dict)  # plots/evaluate/registry.json: {model: what the registry did}


# The level at which a paired test calls a difference measurable: that of the 95% intervals.
SIGNIFICANCE = 0.05


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def format_p(p_value: float) -> str:
    """A p-value to two significant digits ("1.0", "0.021"), tiny ones as a bound."""
    return "< 0.0001" if p_value < 1e-4 else f"{p_value:.2g}" if p_value < 1 else "1.0"


def format_interval(interval: Sequence[float]) -> str:
    low, high = interval
    return f"{low:.4f} - {high:.4f}"


def format_params(values: dict[str, object]) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items())


# ---------------------------------------------------------------------------- results


def results_table(models: Sequence[ModelResult]) -> pd.DataFrame:
    """One row per model: test accuracy with its 95% (Wilson) interval and loss, test size,
    epochs, seconds per epoch, params."""
    rows = []
    for model in models:
        rows.append(
            {
                "model": model.title,
                "test data": model.data,
                "test accuracy": round(model.evaluation["test_accuracy"], 4),
                "95% interval": format_interval(model.evaluation["test_accuracy_ci95"]),
                "test loss": round(model.evaluation["test_loss"], 4),
                "test samples": model.evaluation["test_samples"],
                "epochs": model.training.get("epochs"),
                "kept epoch": model.training.get("kept_epoch"),
                "seconds per epoch": model.training.get("seconds_per_epoch"),
                "key params": format_params(model.key_params),
            }
        )
    return pd.DataFrame(rows)


def per_class_table(models: Sequence[ModelResult]) -> pd.DataFrame:
    """One row per model and class: precision, recall, F1 and support on the test split."""
    rows = []
    for model in models:
        for class_name, values in model.per_class.items():
            rows.append(
                {
                    "model": model.title,
                    "class": class_name,
                    "precision": round(values["precision"], 4),
                    "recall": round(values["recall"], 4),
                    "f1": round(values["f1"], 4),
                    "support": values.get("support"),
                }
            )
    return pd.DataFrame(rows)


def model_sentence(model: ModelResult) -> str:
    """How one model did, in one or two plain sentences."""
    scores, per_class = model.evaluation, model.per_class
    worst = min(per_class, key=lambda name: per_class[name]["f1"])
    best = max(per_class, key=lambda name: per_class[name]["f1"])
    right = round(scores["test_accuracy"] * scores["test_samples"])
    low, high = scores["test_accuracy_ci95"]
    training = ""
    epochs = model.training.get("epochs")
    if epochs:
        training = (
            f" after {epochs} epoch{'s' if epochs != 1 else ''} of about "
            f"{model.training.get('seconds_per_epoch', 0):.1f} s"
        )
        kept = model.training.get("kept_epoch")
        if kept == 0:
            training += ", none of which beat its starting weights on validation loss, so it kept those"
        elif kept is not None and kept != epochs:
            training += f", keeping epoch {kept}'s weights (the best validation loss)"
    return (
        f"{model.title} got {right} of {scores['test_samples']} {model.data} right "
        f"({percent(scores['test_accuracy'])}, 95% interval {percent(low)} to {percent(high)}; "
        f"test loss {scores['test_loss']:.3f}){training}. "
        f"Its weakest class is {worst} (F1 {per_class[worst]['f1']:.3f}: it found "
        f"{percent(per_class[worst]['recall'])} of them and was right "
        f"{percent(per_class[worst]['precision'])} of the times it said {worst}); "
        f"its strongest is {best} (F1 {per_class[best]['f1']:.3f})."
    )


def errors(model: ModelResult) -> int:
    scores = model.evaluation
    return scores["test_samples"] - round(scores["test_accuracy"] * scores["test_samples"])


def paired_verdict(p_value: float, better: bool, subject: str) -> str:
    """ "no measurable difference", or "<subject> is better" / "worse" (at SIGNIFICANCE)."""
    if p_value >= SIGNIFICANCE:
        return "no measurable difference"
    return f"{subject} is {'better' if better else 'worse'}"


def transfer_sentence(models: Sequence[ModelResult], paired: dict[str, dict]) -> str | None:
    """What fine-tuning changed against feature extraction, stated from their paired test
    (McNemar's, on the same test photos), when both are in the report."""
    by_name = {model.name: model for model in models}
    test = paired.get("fine_tuning_vs_feature_extraction")
    if test is None or not {"feature_extraction", "fine_tuning"} <= by_name.keys():
        return None
    before, after = by_name["feature_extraction"], by_name["fine_tuning"]
    only_after, only_before = test["only_fine_tuning_right"], test["only_feature_extraction_right"]
    change = 100 * (after.evaluation["test_accuracy"] - before.evaluation["test_accuracy"])
    verdict = paired_verdict(test["p_value"], only_after > only_before, "fine-tuning")
    return (
        f"Fine-tuning against feature extraction, on the same test photos: {verdict} "
        f"(p = {format_p(test['p_value'])}, {errors(after)} vs {errors(before)} errors, "
        f"{only_after + only_before} discordant); test accuracy {percent(before.evaluation['test_accuracy'])} "
        f"-> {percent(after.evaluation['test_accuracy'])} ({change:+.1f} points). The p-value is "
        f"McNemar's exact test on the discordant photos, those only one of the two got right "
        f"({only_after} only fine-tuning, {only_before} only feature extraction)."
    )


def registry_sentences(models: Sequence[ModelResult], registry: dict[str, dict]) -> list[str]:
    """What evaluate did in MLflow's Model Registry with each model, one sentence each."""
    titles = {model.name: model.title for model in models}
    sentences = []
    for key, outcome in registry.items():
        where = f"{titles.get(key, key)}: version {outcome['version']} of `{outcome['name']}`"
        if not outcome["new"]:
            sentences.append(f"{where}, registered before ({outcome['reason']}).")
            continue
        said = f"{where}, registered as `{outcome['alias']}`: {outcome['reason']}"
        if outcome.get("p_value") is not None:
            said += (
                f" (McNemar p = {format_p(outcome['p_value'])}; {outcome['only_new_right']} test samples only it "
                f"got right, {outcome['only_champion_right']} only the champion did)"
            )
        sentences.append(said + ".")
    return sentences


def results_section(models: Sequence[ModelResult], paired: dict[str, dict], registry: dict | None = None) -> Section:
    blocks: list[Block] = [
        Text(
            "Each model is scored once on its own held-out test split, which no training step "
            "saw: the baseline on the MNIST test digits, both VGG16 models on the test photos "
            "(raw photos into the saved model, as a user would call it)."
        ),
        Table(results_table(models), name="results"),
    ]
    blocks += [Text(model_sentence(model)) for model in models]
    transfer = transfer_sentence(models, paired)
    if transfer:
        blocks.append(Text(transfer))
    if registry:
        blocks.append(
            Text(
                "In MLflow's Model Registry each model is a version of its name; the alias `champion` "
                "moves to a new version only when it is better than the champion on the same test data "
                "and the paired test says the difference is real, else the new version is `challenger` "
                "(`pipeline predict --model models:/NAME@champion` uses it):"
            )
        )
        blocks.append(Bullets(registry_sentences(models, registry)))
    blocks += [
        Text(
            "Per class: precision is how often the model was right when it named the class, "
            "recall how many of the class it found, F1 their harmonic mean."
        ),
        Table(per_class_table(models), name="per-class"),
    ]
    return Section("Results", blocks)


# ---------------------------------------------------------------------------- pictures


def training_section(figures: Figures) -> Section:
    return Section(
        "Training curves",
        [
            Text(
                "Loss and accuracy per epoch, on the training data and on the validation data. "
                "The circle marks the best validation epoch. Training accuracy far above "
                "validation accuracy means the model memorises its training data (overfitting)."
            ),
            *figures.curves,
        ],
    )


def evaluation_section(figures: Figures) -> Section:
    return Section(
        "Confusion matrices and mistakes",
        [
            Text(
                "Rows are the true classes and columns the predicted ones; the diagonal holds the "
                "correct predictions, every other cell a kind of mistake. Below each matrix are "
                "test examples the model got wrong, with the true and the predicted class."
            ),
            *figures.evaluation,
            Text(
                "Grad-CAM heat maps show where in a photo the fine-tuned model found the evidence "
                "for the class it predicted (red: most evidence). On a good prediction the heat "
                "sits on the animal; on a mistake it often sits on something else."
            ),
            *figures.gradcam,
        ],
    )


def filters_section(figures: Figures) -> Section:
    return Section(
        "What the filters respond to",
        [
            Text(
                "A convolution slides a small grid of weights (a filter, or kernel) over the image "
                "and writes the weighted sum at each position. Classic image processing uses "
                "hand-made filters: a Gaussian blur averages neighbouring pixels, and the two Sobel "
                "filters respond to brightness changing from left to right (vertical edges) or "
                "from top to bottom (horizontal edges). A network learns its own. Each row shows a "
                "hand-made filter and its output next to the learned first-layer filter most like "
                "it and that filter's output, computed with the same convolution."
            ),
            *figures.classic,
            Text(
                "Filter patterns: for the first filters of each layer, an image was optimised by "
                "gradient ascent to make that filter respond as strongly as possible. First layers "
                "respond to colours, edges and stripes; deeper layers to textures and repeated "
                "shapes built out of those."
            ),
            *figures.patterns,
            Text(
                "Activation maps: what each conv and pooling layer outputs for one test image, one "
                "panel per channel (bright = strong response). Early maps still look like the "
                "image; deeper maps are smaller and more abstract, and many channels stay dark "
                "because their pattern is not in this image."
            ),
            *figures.activations,
        ],
    )


# ---------------------------------------------------------------------------- models


def shape_walk(shapes: Sequence[tuple[str, tuple]]) -> str:
    """ "input 28x28x1 -> conv1 26x26x32 -> ..." for the spatial layers of a model."""
    steps = []
    for name, shape in shapes:
        dims = [d for d in shape if d is not None]
        steps.append(f"{name} {'x'.join(str(d) for d in dims)}")
    return " -> ".join(steps)


def models_section(models: Sequence[ModelResult]) -> Section:
    blocks: list[Block] = [
        Text(
            "How the layers change the shape of the data. A k x k convolution with padding "
            "'valid' only visits positions where the whole kernel fits, so it trims k - 1 "
            "pixels off each dimension (28 -> 26 for k = 3); padding 'same' adds a border so "
            "the size stays; a stride of s moves the kernel s pixels at a time and divides the "
            "size by s; a 2 x 2 max pooling keeps the largest value of each 2 x 2 block and "
            "halves the size (rounding down). The channel count is the number of filters."
        ),
    ]
    for model in models:
        if model.shapes:
            blocks.append(Text(f"{model.title}: {shape_walk(model.shapes)}."))
    for model in models:
        blocks.append(
            Preformatted(
                model.summary, caption=f"{model.title}: Keras summary (output shape and parameters of every layer)"
            )
        )
    return Section("Models: layers and output shapes", blocks)


# ---------------------------------------------------------------------------- data


def provenance_section(provenance: dict) -> Section:
    """Where the data came from (sources, hashes), how much was kept and what was skipped.

    `provenance`: {"mnist": {"files": {key: {name, sha256}}, "splits": {split: n}},
    "images": {"url", "sha256", "size", "kept": {class: n}, "skipped", "skipped_by_reason",
    "skipped_examples", "splits": {split: {class: n}}}, "weights": {"source", "sha256"}};
    any part may be missing.
    """
    blocks: list[Block] = []
    mnist = provenance.get("mnist")
    if mnist:
        files = pd.DataFrame(
            [
                {"file": f["name"], "sha256 (decompressed)": f["sha256"] or "not checked"}
                for f in mnist["files"].values()
            ]
        )
        splits = ", ".join(f"{split} {count}" for split, count in mnist.get("splits", {}).items())
        blocks += [
            Text(
                "MNIST digits: each file is checked against the sha256 of its decompressed bytes, "
                f"so any mirror that serves them gives the same data. Samples per split: {splits}."
            ),
            Table(files, name="mnist-files"),
        ]
    images = provenance.get("images")
    if images:
        kept = ", ".join(f"{name} {count}" for name, count in images.get("kept", {}).items())
        reasons = ", ".join(f"{count} {why}" for why, count in images.get("skipped_by_reason", {}).items())
        blocks.append(
            Text(
                f"Photos from {images['url']} (archive sha256: {images.get('sha256') or 'not checked'}). "
                f"Decodable photos kept per class: {kept}. Skipped: {images.get('skipped', 0)}"
                f"{' (' + reasons + ')' if reasons else ''}. Resized to {images.get('size')} x "
                f"{images.get('size')} pixels."
            )
        )
        if images.get("splits"):
            blocks.append(Table(pd.DataFrame(images["splits"]).rename_axis("class").reset_index(), name="image-splits"))
        examples = images.get("skipped_examples") or []
        if examples:
            blocks.append(Bullets([f"skipped {e['file']}: {e['reason']}" for e in examples]))
    weights = provenance.get("weights")
    if weights:
        blocks.append(
            Text(
                f"VGG16 ImageNet weights (convolutional base) from {weights['source']}, "
                f"file sha256 {weights.get('sha256') or 'unknown'}."
            )
        )
    return Section("Data", blocks or [Text("No provenance recorded.")])


# ---------------------------------------------------------------------------- runs


def timings_section(timings: pd.DataFrame, visualize_seconds: dict[str, float]) -> Section:
    blocks: list[Block] = [
        Text(
            "How long each stage took: `seconds` is its MLflow run's wall time (the stage's work), "
            "`process seconds` runs from the start of the stage's process (TensorFlow's and "
            "MLflow's imports included) to the run's end. The run is the one named in the "
            "stage's metrics file, else the stage's newest finished run (a stage that DVC found "
            "up to date shows the run that last produced its outputs)."
        ),
    ]
    if timings.empty:
        blocks.append(Text("No MLflow runs found."))
    else:
        blocks.append(Table(timings, name="timings"))
        together = f"{timings['seconds'].sum():.0f} s"
        if timings["process seconds"].notna().all():
            together += f" ({timings['process seconds'].sum():.0f} s of processes)"
        blocks.append(Text(f"Together: {together} over {len(timings)} stages, before this report."))
    if visualize_seconds:
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in visualize_seconds.items())
        blocks.append(Text(f"This report's own filter pictures took: {parts}."))
    return Section("How long each stage took", blocks)


def comparison_section(earlier: pd.DataFrame) -> Section:
    blocks: list[Block] = [
        Text(
            "Each training stage's run in this report against the best run of that stage in "
            "the MLflow experiment (by test accuracy), with the params in which they differ. "
            "`pipeline compare` shows any selection of runs side by side."
        ),
    ]
    blocks.append(
        Table(earlier, name="earlier-runs") if not earlier.empty else Text("No earlier runs to compare with.")
    )
    return Section("Comparison with earlier runs", blocks)


def build_report(inputs: ReportInputs) -> Report:
    """The whole report, section by section."""
    return Report(
        title="Image classification: results",
        intro=(
            f"An MNIST convnet and VGG16 transfer learning on photos, trained, evaluated and "
            f"visualised by the pipeline. {inputs.generated}"
        ),
        sections=[
            results_section(inputs.models, inputs.paired, inputs.registry),
            training_section(inputs.figures),
            evaluation_section(inputs.figures),
            filters_section(inputs.figures),
            models_section(inputs.models),
            provenance_section(inputs.provenance),
            timings_section(inputs.timings, inputs.visualize_seconds),
            comparison_section(inputs.earlier),
        ],
    )
