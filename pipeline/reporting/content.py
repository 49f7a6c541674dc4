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
    blocks: list[Picture] = field(default_factory=list)  # accuracy by VGG16 block, that block's activations
    pretraining: list[Picture] = field(default_factory=list)  # pretrained vs from scratch


@dataclass
class Translation:
    """The MNIST models on shifted test digits (evaluate's translation.csv)."""

    curve: list[dict]  # {model, direction, pixels, correct, samples, accuracy, ci95_low, ci95_high}
    max_shift: int
    titles: dict[str, str]  # {model: what a reader calls it}, the convnet first
    figure: Picture


@dataclass
class StudyResult:
    """One study of studies.yaml and what MLflow holds of it (no runs: not run yet)."""

    name: str
    claim: str
    params: list[str]  # the keys it sweeps
    runs: list[dict]  # per run: label, test_accuracy, ci95_low, ci95_high, final_gap, epochs, run_id
    figures: list[Picture] = field(default_factory=list)


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
    translation: Translation | None = None  # the translation test, when evaluate ran it
    studies: list[StudyResult] = field(default_factory=list)  # every study of studies.yaml
    # metrics/block_heads.json: {"block3": {test_accuracy, test_accuracy_ci95, ...}, "block4_vs_block3": {...}}
    blocks: dict[str, dict] = field(default_factory=dict)
    # {model: (training accuracy, validation accuracy) at the epoch it kept}, from its history
    fit_gap: dict[str, tuple[float, float]] = field(default_factory=dict)
    registry: dict = field(default_factory=dict)  # plots/evaluate/registry.json: {model: what the registry did}


# The level at which a paired test calls a difference measurable: that of the 95% intervals.
SIGNIFICANCE = 0.05


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def format_p(p_value: float) -> str:
    """A p-value to two significant digits ("p = 1.0", "p = 0.021"), tiny ones as a bound ("p < 0.0001")."""
    return "p < 0.0001" if p_value < 1e-4 else f"p = {p_value:.2g}" if p_value < 1 else "p = 1.0"


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
        kept, score = model.training.get("kept_epoch"), criterion(model)
        if kept == 0:
            training += f", none of which beat its starting weights on {score}, so it kept those"
        elif kept is not None and kept != epochs:
            training += f", keeping epoch {kept}'s weights (the best {score})"
    return (
        f"{model.title} got {right} of {scores['test_samples']} {model.data} right "
        f"({percent(scores['test_accuracy'])}, 95% interval {percent(low)} to {percent(high)}; "
        f"test loss {scores['test_loss']:.3f}){training}. "
        f"Its weakest class is {worst} (F1 {per_class[worst]['f1']:.3f}: it found "
        f"{percent(per_class[worst]['recall'])} of them and was right "
        f"{percent(per_class[worst]['precision'])} of the times it said {worst}); "
        f"its strongest is {best} (F1 {per_class[best]['f1']:.3f})."
    )


def criterion(model: ModelResult) -> str:
    """The validation score that picked the epoch `model` kept, in words."""
    return {"val_accuracy": "validation accuracy"}.get(str(model.key_params.get("kept by")), "validation loss")


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
    did = ""
    if after.training.get("kept_epoch") == 0:
        did = (
            f"Fine-tuning changed nothing: no epoch beat the trained head on {criterion(after)}, so it "
            "kept the head's weights and the two models are the same network. "
        )
    elif after.training.get("kept_epoch"):
        unfreeze = after.key_params.get("unfreeze", "?")
        layers = "conv layer" if str(unfreeze) == "1" else f"{unfreeze} conv layers"
        did = (
            f"Fine-tuning trained the top {layers} with the head "
            f"and kept epoch {after.training['kept_epoch']} (the best {criterion(after)}). "
        )
    return did + (
        f"Fine-tuning against feature extraction, on the same test photos: {verdict} "
        f"({format_p(test['p_value'])}, {errors(after)} vs {errors(before)} errors, "
        f"{only_after + only_before} discordant); test accuracy {percent(before.evaluation['test_accuracy'])} "
        f"-> {percent(after.evaluation['test_accuracy'])} ({change:+.1f} points). The p-value is "
        f"McNemar's exact test on the discordant photos, those only one of the two got right "
        f"({only_after} only fine-tuning, {only_before} only feature extraction). {earned(verdict)}"
    )


def earned(verdict: str) -> str:
    """Whether fine-tuning earned its place, from the paired test's verdict, plainly."""
    if verdict == "fine-tuning is better":
        return "So fine-tuning earned its place here: it beat feature extraction on the test photos."
    if verdict == "fine-tuning is worse":
        return "So fine-tuning did not earn its place here: feature extraction is better on the test photos."
    return "So fine-tuning did not earn its place here: it did not beat feature extraction on the test photos."


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
                f" (McNemar {format_p(outcome['p_value'])}; {outcome['only_new_right']} test samples only it "
                f"got right, {outcome['only_champion_right']} only the champion did)"
            )
        sentences.append(said + ".")
    return sentences


def results_section(models: Sequence[ModelResult], paired: dict[str, dict], registry: dict | None = None) -> Section:
    blocks: list[Block] = [
        Text(
            "Each model is scored once on its own held-out test split, which no training step "
            "saw: the baseline on the MNIST test digits, both VGG16 models on the test photos "
            "(from the frozen layers' cached activations; a seeded sample of raw photos also goes "
            "through each saved model, which must give the same outputs: evaluate.raw_sample)."
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


# ---------------------------------------------------------------------------- translation


def _pooled(translation: Translation, model: str, pixels: int) -> dict:
    return next(
        row
        for row in translation.curve
        if row["model"] == model and row["direction"] == "all" and row["pixels"] == pixels
    )


def translation_sentences(translation: Translation) -> list[str]:
    """What the curves show, read from the numbers: each model's accuracy unshifted and at the
    largest shift with intervals, how many points it lost, and which lost more (measurably, when
    the two intervals at the largest shift do not overlap)."""
    top = translation.max_shift
    drops, sentences = {}, []
    for model, title in translation.titles.items():
        start, end = _pooled(translation, model, 0), _pooled(translation, model, top)
        drops[model] = 100 * (start["accuracy"] - end["accuracy"])
        sentences.append(
            f"{title}: {percent(start['accuracy'])} of the {start['samples']} unshifted test digits, "
            f"{percent(end['accuracy'])} "
            f"(95% interval {percent(end['ci95_low'])} to {percent(end['ci95_high'])}) when they are moved "
            f"{top} pixel{'s' if top != 1 else ''}, a change of {-drops[model]:+.1f} points."
        )
    if len(drops) == 2 and top > 0:
        (a, drop_a), (b, drop_b) = sorted(drops.items(), key=lambda item: item[1])
        end_a, end_b = _pooled(translation, a, top), _pooled(translation, b, top)
        overlap = end_a["ci95_low"] <= end_b["ci95_high"] and end_b["ci95_low"] <= end_a["ci95_high"]
        title_a, title_b = translation.titles[a], translation.titles[b]
        if overlap:
            sentences.append(
                f"At {top} pixels the two intervals overlap: this run does not show that one model "
                f"tolerates the shift better than the other."
            )
        else:
            sentences.append(
                f"So the {title_a} tolerates the shift better: it lost {drop_a:.1f} points where the "
                f"{title_b} lost {drop_b:.1f}, and at {top} pixels their intervals do not overlap."
            )
    return sentences


def translation_section(translation: Translation | None) -> Section | None:
    if translation is None:
        return None
    return Section(
        "Translation invariance",
        [
            Text(
                "A convolution applies the same filters at every position, and pooling discards some "
                "of where a pattern was; a Dense layer gives every pixel a weight of its own, so to it "
                "a digit moved by a few pixels is a new input. Both MNIST models were scored on the "
                f"same test digits moved 0 to {translation.max_shift} pixels right, left, down and up, "
                "with black (zero) pixels filled in where the digit moved away. The thick line pools "
                "the four directions (its band: the 95% Wilson interval over every shifted copy, "
                "which counts the four copies of a digit as separate samples); the dashed lines are "
                "the directions one by one."
            ),
            translation.figure,
            *(Text(sentence) for sentence in translation_sentences(translation)),
        ],
    )


# ---------------------------------------------------------------------------- studies


def study_sentences(study: StudyResult) -> list[str]:
    """What the study's runs show: each run's test accuracy with its interval and its last
    training-validation gap; the best run, and whether its interval overlaps the others'."""
    sentences = [
        f"{run['label']}: test accuracy {percent(run['test_accuracy'])} (95% interval "
        f"{percent(run['ci95_low'])} to {percent(run['ci95_high'])}), training minus validation "
        f"accuracy {100 * run['final_gap']:+.1f} points after {run['epochs']} epoch{'s' if run['epochs'] != 1 else ''}."
        for run in study.runs
    ]
    if len(study.runs) >= 2:
        best = max(study.runs, key=lambda run: run["test_accuracy"])
        apart = [r["label"] for r in study.runs if r is not best and r["ci95_high"] < best["ci95_low"]]
        close = [r["label"] for r in study.runs if r is not best and r["ci95_high"] >= best["ci95_low"]]
        verdict = f"The best test accuracy is {best['label']}'s."
        if apart:
            verdict += f" Its interval lies above that of {', '.join(apart)}: a measurable difference."
        if close:
            verdict += f" Its interval overlaps that of {', '.join(close)}: no measurable difference there."
        smallest = min(study.runs, key=lambda run: abs(run["final_gap"]))
        verdict += f" The smallest training-validation gap is {smallest['label']}'s."
        sentences.append(verdict)
    return sentences


def studies_section(studies: Sequence[StudyResult]) -> Section | None:
    if not studies:
        return None
    blocks: list[Block] = [
        Text(
            "Claims that need a retrained model are measured by studies (studies.yaml), run "
            "through DVC's experiment queue with `pipeline study NAME`; each point is the newest "
            "finished run of that value in MLflow, with the 95% Wilson interval of its test accuracy. "
            "The curves show training (dashed) and validation (solid) accuracy per epoch and their "
            "gap: a growing gap is a model memorising its training data."
        )
    ]
    for study in studies:
        swept = ", ".join(study.params)
        if not study.runs:
            blocks.append(
                Text(f"Study {study.name} ({swept}; claim: {study.claim}): not run yet: `pipeline study {study.name}`.")
            )
            continue
        blocks.append(Text(f"Study {study.name} sweeps {swept}. The claim: {study.claim}."))
        blocks += list(study.figures)
        blocks += [Text(sentence) for sentence in study_sentences(study)]
        table = pd.DataFrame(study.runs).rename(columns={"final_gap": "last gap"})
        table["run_id"] = table["run_id"].str[:8]
        blocks.append(Table(table.round(4), name=f"study-{study.name}"))
    return Section("Studies", blocks)


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


# ---------------------------------------------------------------------------- evidence


def block_keys(blocks: dict[str, dict]) -> list[str]:
    """The block entries of block_heads.json ("block3", ...), shallow to deep (pairs left out)."""
    return sorted((key for key in blocks if "_vs_" not in key), key=lambda key: int(key.removeprefix("block")))


def blocks_table(blocks: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for key in block_keys(blocks):
        scores = blocks[key]
        rows.append(
            {
                "features": f"{key}_pool, averaged",
                "test accuracy": round(scores["test_accuracy"], 4),
                "95% interval": format_interval(scores["test_accuracy_ci95"]),
                "test samples": scores["test_samples"],
                "epochs": scores.get("epochs"),
            }
        )
    return pd.DataFrame(rows)


def depth_sentences(blocks: dict[str, dict]) -> list[str]:
    """What accuracy against depth shows: each block against the one before it (McNemar's
    exact test on the same test photos), then the verdict on the deepest block."""
    keys = block_keys(blocks)
    scores = ", ".join(
        f"{key} {percent(blocks[key]['test_accuracy'])} ({percent(blocks[key]['test_accuracy_ci95'][0])} to "
        f"{percent(blocks[key]['test_accuracy_ci95'][1])})"
        for key in keys
    )
    sentences = [f"Test accuracy of a head on each block's pooled output, with its 95% interval: {scores}."]
    verdicts = []
    for shallower, deeper in zip(keys, keys[1:]):
        test = blocks.get(f"{deeper}_vs_{shallower}")
        if test is None:
            continue
        only_deeper, only_shallower = test[f"only_{deeper}_right"], test[f"only_{shallower}_right"]
        verdict = paired_verdict(test["p_value"], only_deeper > only_shallower, deeper)
        verdicts.append((deeper, shallower, verdict))
        sentences.append(
            f"{deeper} against {shallower}: {verdict} ({format_p(test['p_value'])}; {only_deeper} test photos "
            f"only {deeper}'s head got right, {only_shallower} only {shallower}'s)."
        )
    best = max(keys, key=lambda key: blocks[key]["test_accuracy"])
    deepest = keys[-1]
    if not verdicts:
        return sentences
    last_deeper, last_shallower, last = verdicts[-1]
    if all(verdict.endswith("better") for _, _, verdict in verdicts):
        sentences.append(
            "Here each block holds measurably more of what tells the classes apart than the one below it: "
            "the deeper, more abstract features are the more task-relevant ones, as the lesson says."
        )
    elif best != deepest and any(verdict.endswith("worse") for _, _, verdict in verdicts):
        sentences.append(
            f"Here the deepest block is not the best: {best} is, and a deeper block is measurably worse than "
            "the one below it; the upper layers' features are too specific to ImageNet's task to help this "
            "one as much (the lesson's 'sometimes only its lower layers')."
        )
    elif last.endswith("better"):
        sentences.append(
            f"Here {deepest}, the deepest block, is measurably better than {last_shallower}: accuracy grows with "
            "depth where it matters most, although not measurably at every step."
        )
    else:
        sentences.append(
            f"Here {last_deeper} and {last_shallower} are not measurably different on these test photos: past "
            f"{last_shallower}, more depth did not buy a measurable gain (the best point estimate is {best}'s)."
        )
    return sentences


def blocks_section(blocks: dict[str, dict], figures: Figures) -> Section:
    """What each VGG16 block knows: accuracy against depth, beside the same blocks' activations."""
    blocks_out: list[Block] = [
        Text(
            "The lesson says a convnet learns a hierarchy: lower layers hold general features (edges, colours, "
            "textures), upper ones more abstract, task-specific ones. Measured here: the output of each VGG16 "
            "block (ImageNet weights, frozen) was averaged over its positions, cached in the same pass that "
            "cached the head's features, and a small head (standardise, dense, dropout, output) was trained "
            "on each and scored on the same test photos as the models above."
        ),
    ]
    if not blocks:
        return Section("What each VGG16 block knows", [*blocks_out, Text("No block heads were trained.")])
    blocks_out.append(Table(blocks_table(blocks), name="blocks"))
    blocks_out += [Text(sentence) for sentence in depth_sentences(blocks)]
    blocks_out.append(
        Text(
            "Below: accuracy against depth, then what those same blocks output for one test photo "
            "(the feature-extraction model's frozen ImageNet layers): the maps shrink and turn from "
            "picture-like edges and colours into sparse, abstract detectors as the head's accuracy changes."
        )
    )
    blocks_out += figures.blocks
    return Section("What each VGG16 block knows", blocks_out)


def pretraining_sentences(
    models: Sequence[ModelResult], paired: dict[str, dict], fit_gap: dict[str, tuple[float, float]]
) -> list[str]:
    """Pretrained features (the feature-extraction head) against the convnet from scratch."""
    by_name = {model.name: model for model in models}
    test = paired.get("scratch_vs_feature_extraction")
    if test is None or not {"feature_extraction", "scratch"} <= by_name.keys():
        return []
    head, scratch = by_name["feature_extraction"], by_name["scratch"]
    only_head, only_scratch = test["only_feature_extraction_right"], test["only_scratch_right"]
    verdict = paired_verdict(test["p_value"], only_head > only_scratch, "pretraining")
    change = 100 * (head.evaluation["test_accuracy"] - scratch.evaluation["test_accuracy"])
    sentences = [
        f"On the same {head.evaluation['test_samples']} test photos, the head on VGG16's ImageNet features "
        f"against the convnet trained from scratch: {verdict} ({format_p(test['p_value'])}, "
        f"{errors(head)} vs {errors(scratch)} errors, {only_head + only_scratch} discordant: {only_head} only the "
        f"pretrained model got right, {only_scratch} only the one from scratch). Test accuracy "
        f"{percent(scratch.evaluation['test_accuracy'])} from scratch -> "
        f"{percent(head.evaluation['test_accuracy'])} with pretraining ({change:+.1f} points)."
    ]
    gaps = []
    for name, model in (("scratch", scratch), ("feature_extraction", head)):
        if name in fit_gap:
            train, validation = fit_gap[name]
            gaps.append(
                f"{model.title}: {percent(train)} on its training photos, {percent(validation)} on validation "
                f"({100 * (train - validation):+.1f} points)"
            )
    if gaps:
        sentences.append(
            "Training against validation accuracy at the epoch each kept, the overfitting gauge: "
            + "; ".join(gaps)
            + "."
        )
    if verdict == "pretraining is better":
        sentences.append(
            "Here pretraining buys a measurable gain: on so few photos a convnet must learn its features from "
            "scratch, while VGG16 brings features learned on 1.2 million ImageNet images."
        )
    elif verdict == "no measurable difference":
        sentences.append(
            "Here pretraining buys no measurable gain on these test photos: the evidence does not separate the two."
        )
    else:
        sentences.append("Here the convnet from scratch is measurably better: pretraining did not pay on this data.")
    return sentences


def pretraining_section(
    models: Sequence[ModelResult], paired: dict[str, dict], fit_gap: dict[str, tuple[float, float]], figures: Figures
) -> Section:
    """What pretraining buys: feature extraction against the convnet from scratch, paired."""
    intro = Text(
        "The lesson says pretrained features make a small photo set learnable where a convnet trained from "
        "scratch overfits. Measured here: the classic four-conv-block convnet of the cats-vs-dogs lesson, "
        "trained from scratch on the same training photos, scored on the same test photos as the VGG16 models."
    )
    sentences = pretraining_sentences(models, paired, fit_gap)
    if not sentences:
        return Section("What pretraining buys", [intro, Text("No convnet from scratch was trained.")])
    return Section("What pretraining buys", [intro, *(Text(s) for s in sentences), *figures.pretraining])


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
            "MLflow's imports included) to the run's end, except for a process forked from "
            "`pipeline warm` (`warm`: yes), which starts with them loaded: `make run` loads them "
            "once for all stages. `peak RSS MiB` is the most memory "
            "that process held resident. The run is the one named in the "
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
        together += f" over {len(timings)} stages, before this report"
        if timings["peak RSS MiB"].notna().any():
            top = timings.loc[timings["peak RSS MiB"].idxmax()]
            together += f"; the most memory, {top['peak RSS MiB']:.0f} MiB, in {top['stage']}"
        blocks.append(Text(f"Together: {together}."))
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
            *([translation] if (translation := translation_section(inputs.translation)) else []),
            *([studies] if (studies := studies_section(inputs.studies)) else []),
            training_section(inputs.figures),
            evaluation_section(inputs.figures),
            filters_section(inputs.figures),
            blocks_section(inputs.blocks, inputs.figures),
            pretraining_section(inputs.models, inputs.paired, inputs.fit_gap, inputs.figures),
            models_section(inputs.models),
            provenance_section(inputs.provenance),
            timings_section(inputs.timings, inputs.visualize_seconds),
            comparison_section(inputs.earlier),
        ],
    )
