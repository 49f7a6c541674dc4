"""report: the filter pictures, then reports/report.md and a self-contained reports/report.html.

Reads every model, the test data, the metrics and plots of the training and evaluate stages,
data/raw/images_report.json and the MLflow runs of the experiment; draws the filter pictures
(hand-made vs learned filters, gradient-ascent patterns, activation maps) for the baseline
and the fine-tuned VGG16; writes reports/ (report.md, report.html, figures/) atomically and
logs it, with the pictures' cost, as this stage's MLflow run.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline import catalog
from pipeline.catalog import (
    BLOCK_HEADS_METRICS,
    BLOCK_HEADS_PLOTS,
    EVALUATE_METRICS,
    EVALUATE_PER_CLASS,
    EVALUATE_PLOTS,
    EVALUATE_REGISTRY,
    EVALUATE_TRANSLATION,
    IMAGES,
    IMAGES_REPORT,
    MNIST,
    MODELS,
    PAIRS,
    REPORTS,
    WEIGHTS,
)
from pipeline.errors import UserError
from pipeline.params import Params, load_params
from pipeline.reporting.content import Figures, ModelResult, ReportInputs
from pipeline.reporting.render import Picture, Report

if TYPE_CHECKING:
    from pipeline.tracking import StageRun

STAGE = catalog.STAGES["report"]
# Stages whose MLflow runs the timing table lists (every one before this), in pipeline order.
TRACKED_STAGES = tuple(catalog.STAGES)[: tuple(catalog.STAGES).index(STAGE.name)]
TRAINING_STAGES = tuple(trained.stage for trained in MODELS.values())
# What a reader calls each model of catalog.MODELS, and what it is tested on.
TITLES = {
    "baseline": ("Baseline convnet", "MNIST test digits"),
    "dense": ("Dense-only network", "MNIST test digits"),
    "feature_extraction": ("VGG16 feature extraction", "test photos"),
    "fine_tuning": ("VGG16 fine-tuned", "test photos"),
    "scratch": ("Convnet from scratch", "test photos"),
}


def picture(path: Path, caption: str, file_name: str | None = None) -> Picture:
    """A PNG file as a report picture (figures/<file_name or the file's own name>)."""
    return Picture(file_name or path.name, path.read_bytes(), caption)


def key_params(name: str, params: Params) -> dict[str, object]:
    """The params that define each model, for the results table."""
    if name == "baseline":
        b = params.baseline
        return {
            "conv_filters": b.conv_filters,
            "kernel": b.kernel_size,
            "padding": b.padding,
            "strides": b.strides,
            "pool": b.pool_size,
            "dense": b.dense_units,
            "dropout": b.dropout,
            "optimizer": b.optimizer,
            "lr": b.learning_rate,
            "batch": b.batch_size,
        }
    if name == "dense":
        d = params.dense
        return {
            "units": d.units,
            "dropout": d.dropout,
            "optimizer": d.optimizer,
            "lr": d.learning_rate,
            "batch": d.batch_size,
        }
    if name == "feature_extraction":
        h = params.head
        return {
            "pooling": h.pooling,
            "units": h.units,
            "dropout": h.dropout,
            "optimizer": h.optimizer,
            "lr": h.learning_rate,
            "batch": h.batch_size,
            "kept by": h.keep_by,
            "image size": params.images.size,
        }
    if name == "scratch":
        s = params.scratch
        return {
            "conv_filters": s.conv_filters,
            "size": s.size,
            "dense": s.dense_units,
            "dropout": s.dropout,
            "optimizer": s.optimizer,
            "lr": s.learning_rate,
            "batch": s.batch_size,
            "augment": s.augment,
        }
    f = params.finetune
    return {
        "unfreeze": f.unfreeze,
        "optimizer": f.optimizer,
        "lr": f.learning_rate,
        "batch": f.batch_size,
        "kept by": f.keep_by,
        "augmented copies": params.features.augment_copies,
        "augment": f.augment,
    }


def spatial_shapes(model) -> list[tuple[str, tuple]]:
    """(layer, output shape) for the input and every conv and pooling layer."""
    from pipeline.models.graph import conv_and_pool_layer_names, layer_output

    shapes = [("input", tuple(model.inputs[0].shape[1:]))]
    layers = conv_and_pool_layer_names(model)
    return shapes + [(name, tuple(layer_output(model, name).shape[1:])) for name in layers]


def per_class_results() -> dict[str, dict[str, dict]]:
    """{model: {class: {precision, recall, f1, support}}} from evaluate's per_class.csv."""
    # keep_default_na=False: a class named "NA" or "null" stays a name, not a missing value
    frame = pd.read_csv(EVALUATE_PER_CLASS, dtype={"model": str, "class": str}, keep_default_na=False)
    results: dict[str, dict[str, dict]] = {}
    for row in frame.to_dict("records"):
        values = {key: row[key] for key in ("precision", "recall", "f1", "support")}
        results.setdefault(row["model"], {})[row["class"]] = values
    return results


def model_results(params: Params, evaluation: dict, models: dict) -> list[ModelResult]:
    per_class = per_class_results()
    results = []
    for name, trained in MODELS.items():
        results.append(
            ModelResult(
                name=name,
                title=TITLES[name][0],
                data=TITLES[name][1],
                training=json.loads(trained.metrics.read_text()),
                evaluation=evaluation[name],
                per_class=per_class[name],
                key_params=key_params(name, params),
                summary=(trained.plots / "summary.txt").read_text(encoding="utf-8"),
                shapes=spatial_shapes(models[name]),
            )
        )
    return results


def test_image(path: Path, index: int) -> np.ndarray:
    with np.load(path) as data:
        images = data["x_test"]
        if index >= len(images):
            raise UserError(f"report.image_index: {index} is past the {len(images)} test images of {path}")
        return images[index]


def first_conv_of_each_block(model) -> list[str]:
    """block1_conv1, block2_conv1, ... block5_conv1 of a VGG model (else all its conv layers):
    one layer per depth keeps the gradient ascent cheap and still shows the whole range."""
    from pipeline.models.graph import conv_layer_names

    names = conv_layer_names(model)
    return [name for name in names if name.endswith("_conv1")] or names


def draw_filters(params: Params, models: dict) -> tuple[Figures, dict[str, float]]:
    """The filter pictures of the baseline (on a test digit) and the fine-tuned VGG16 (on a
    test photo), and what each kind cost in seconds."""
    from pipeline.models.graph import conv_layer_names
    from pipeline.reporting.visualize import filter_pictures

    p = params.report
    figures = Figures()
    seconds: dict[str, float] = {}
    # model -> (layers whose patterns are drawn, pattern size, the range of its input values)
    targets = {
        "baseline": (conv_layer_names(models["baseline"]), p.patterns.baseline_size, (0.0, 1.0)),
        "fine_tuning": (first_conv_of_each_block(models["fine_tuning"]), p.patterns.vgg_size, (0.0, 255.0)),
    }
    images = {name: test_image(MODELS[name].test_data, p.image_index) for name in targets}  # a bad index: at once
    for name, (layers, size, value_range) in targets.items():
        title, image = TITLES[name][0], images[name]
        drawn = filter_pictures(
            models[name],
            image,
            layers,
            p.classic,
            p.patterns,
            size,
            value_range,
            p.activation_channels,
            params.seed,
            title,
        )
        seconds.update({f"{name}.{kind}": value for kind, value in drawn.seconds.items()})
        figures.classic.append(
            Picture(f"classic_{name}.png", drawn.classic, f"{title}: hand-made filters vs learned first-layer filters")
        )
        figures.patterns.append(
            Picture(
                f"patterns_{name}.png",
                drawn.patterns,
                f"{title}: what the first filters of {', '.join(layers)} respond to",
            )
        )
        for layer, png in drawn.activations.items():
            caption = f"{title}: activations of {layer} for test image {p.image_index}"
            figures.activations.append(Picture(f"activations_{name}_{layer}.png", png, caption))
    return figures, seconds


def block_figures(params: Params, models: dict, blocks: dict[str, dict], figures: Figures) -> None:
    """Accuracy by VGG16 block (train_block_heads' figure), then the activation maps of those
    blocks' outputs (blockN_pool of the feature-extraction model's frozen ImageNet layers) for
    the report's test photo."""
    from pipeline.reporting.content import block_keys
    from pipeline.viz.activations import activation_maps, activation_maps_figures
    from pipeline.viz.common import figure_to_png_bytes

    figures.blocks.append(
        picture(BLOCK_HEADS_PLOTS / "accuracy_by_block.png", "Test accuracy of a head on each VGG16 block's output")
    )
    layers = [f"{key}_pool" for key in block_keys(blocks)]
    photo = test_image(IMAGES, params.report.image_index).astype(np.float32)
    maps = activation_maps(models["feature_extraction"], photo, layers)
    for layer, figure in activation_maps_figures(maps, params.report.activation_channels).items():
        caption = f"{layer} (ImageNet weights): activations for test photo {params.report.image_index}"
        figures.blocks.append(Picture(f"blocks_{layer}.png", figure_to_png_bytes(figure), caption))


def pretraining_figure(evaluation: dict, figures: Figures) -> None:
    """The photo models' test accuracies with their intervals, side by side."""
    from pipeline.viz.common import figure_to_png_bytes
    from pipeline.viz.evidence import accuracy_with_intervals_figure

    names = [name for name, trained in MODELS.items() if trained.test_data == IMAGES]
    figure = accuracy_with_intervals_figure(
        [TITLES[name][0] for name in names],
        [evaluation[name]["test_accuracy"] for name in names],
        [evaluation[name]["test_accuracy_ci95"] for name in names],
        "The same test photos: pretrained VGG16 against a convnet from scratch",
        line=False,
    )
    caption = "Test accuracy with its 95% interval, the photo models side by side"
    figures.pretraining.append(Picture("pretraining.png", figure_to_png_bytes(figure), caption))


def fit_gaps() -> dict[str, tuple[float, float]]:
    """{model: (training accuracy, validation accuracy) at the epoch it kept}, from history.csv."""
    gaps = {}
    for name, trained in MODELS.items():
        history = pd.read_csv(trained.history)
        if not {"accuracy", "val_accuracy"} <= set(history.columns) or history.empty:
            continue
        kept = json.loads(trained.metrics.read_text()).get("kept_epoch")
        if kept == 0:  # it kept its starting weights: no epoch to read
            continue
        row = history.iloc[min(kept or len(history), len(history)) - 1]
        gaps[name] = (float(row["accuracy"]), float(row["val_accuracy"]))
    return gaps


def stage_figures(figures: Figures) -> None:
    """Add the pictures the training and evaluate stages already drew."""
    for name, trained in MODELS.items():
        title = TITLES[name][0]
        figures.curves.append(picture(trained.plots / "curves.png", f"{title}: training curves", f"curves_{name}.png"))
        figures.evaluation.append(picture(EVALUATE_PLOTS / f"confusion_{name}.png", f"{title}: confusion matrix"))
        figures.evaluation.append(
            picture(
                EVALUATE_PLOTS / f"misclassified_{name}.png", f"{title}: misclassified test examples (true / predicted)"
            )
        )
    for path in sorted(EVALUATE_PLOTS.glob("gradcam_*.png")):
        figures.gradcam.append(picture(path, "Grad-CAM heat maps of the fine-tuned model on test photos"))


def provenance(params: Params) -> dict:
    """Sources, hashes, counts and skipped files of the data the models saw."""
    from pipeline.files import sha256_file

    with np.load(MNIST) as data:
        mnist_splits = {split: int(data[f"x_{split}"].shape[0]) for split in ("train", "validation", "test")}
    with np.load(IMAGES) as data:
        class_names = [str(n) for n in data["class_names"]]
        image_splits = {
            split: {name: int(np.sum(data[f"y_{split}"] == i)) for i, name in enumerate(class_names)}
            for split in ("train", "validation", "test")
        }
    downloaded = json.loads(IMAGES_REPORT.read_text()) if IMAGES_REPORT.exists() else {}
    source = downloaded.get("source", {})
    return {
        "mnist": {"files": params.mnist.files.model_dump(), "splits": mnist_splits},
        "images": {
            **downloaded,
            "url": source.get("url", params.images.url),
            "sha256": source.get("sha256", params.images.sha256),
            "size": params.images.size,
            "splits": image_splits,
        },
        "weights": {"source": params.vgg16.weights, "sha256": sha256_file(WEIGHTS) if WEIGHTS.exists() else None},
    }


def mlflow_tables(experiment: str, run_ids: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(timings, comparison with the best earlier runs) from every run of the experiment."""
    import mlflow

    from pipeline.reporting.runs import best_runs_table, timings_table

    found = mlflow.get_experiment_by_name(experiment)
    runs = mlflow.search_runs(experiment_ids=[found.experiment_id]) if found else None
    if runs is None or runs.empty:
        return pd.DataFrame(), pd.DataFrame()
    return timings_table(runs, TRACKED_STAGES, run_ids), best_runs_table(runs, TRAINING_STAGES, run_ids)


def translation_results(evaluation: dict):
    """The translation test: its curve (translation.csv), headline and picture, or None when
    evaluate wrote none."""
    from pipeline.reporting.content import Translation

    if "translation" not in evaluation or not EVALUATE_TRANSLATION.exists():
        return None
    curve = pd.read_csv(EVALUATE_TRANSLATION).to_dict("records")
    figure = picture(
        EVALUATE_PLOTS / "translation.png",
        "Accuracy on test digits shifted by 0 to "
        f"{evaluation['translation']['max_shift']} pixels, convnet and Dense-only",
    )
    titles = {name: TITLES[name][0] for name in MODELS if any(row["model"] == name for row in curve)}
    return Translation(curve=curve, max_shift=evaluation["translation"]["max_shift"], titles=titles, figure=figure)


def study_results(experiment: str) -> list:
    """Every study of studies.yaml with its runs found in MLflow and its two pictures."""
    from pipeline.reporting.content import StudyResult
    from pipeline.studies import load_studies, study_runs
    from pipeline.viz.common import figure_to_png_bytes
    from pipeline.viz.studies import curves_figure, metric_figure

    results = []
    for study in load_studies().values():
        runs = study_runs(study, experiment)
        rows: list[dict[str, Any]] = []
        for run in runs:
            history = run.history
            gaps = [t - v for t, v in zip(history["accuracy"], history["val_accuracy"])]
            rows.append(
                {
                    "label": ", ".join(f"{key.split('.')[-1]}={value}" for key, value in run.values.items()),
                    "test_accuracy": run.metrics.get("test_accuracy", float("nan")),
                    "ci95_low": run.metrics.get("test_accuracy_ci95_low", float("nan")),
                    "ci95_high": run.metrics.get("test_accuracy_ci95_high", float("nan")),
                    "final_gap": gaps[-1] if gaps else float("nan"),
                    "epochs": len(history["accuracy"]),
                    "run_id": run.run_id,
                }
            )
        figures = []
        if rows:
            labels, swept = [row["label"] for row in rows], ", ".join(study.params)
            metric = metric_figure(
                labels,
                [row["test_accuracy"] for row in rows],
                [row["ci95_low"] for row in rows],
                [row["ci95_high"] for row in rows],
                swept,
                "test accuracy",
            )
            curves = curves_figure(labels, [run.history for run in runs], swept)
            figures = [
                Picture(
                    f"study_{study.name}_metric.png",
                    figure_to_png_bytes(metric),
                    f"Study {study.name}: test accuracy against {swept}, 95% intervals",
                ),
                Picture(
                    f"study_{study.name}_curves.png",
                    figure_to_png_bytes(curves),
                    f"Study {study.name}: training and validation accuracy per epoch, and their gap",
                ),
            ]
        results.append(StudyResult(study.name, study.claim, list(study.params), rows, figures))
    return results


def mlflow_run_ids(evaluation: dict) -> dict[str, str]:
    """{stage: the MLflow run whose outputs the report shows}, from the metrics files."""
    run_ids = {
        trained.stage: json.loads(trained.metrics.read_text()).get("mlflow_run_id") for trained in MODELS.values()
    }
    run_ids["evaluate"] = evaluation[next(iter(MODELS))].get("mlflow_run_id")
    return run_ids


def write_report(report: Report, folder: Path) -> None:
    """report.md, report.html and figures/ into `folder`."""
    from pipeline.reporting.render import to_html, to_markdown

    (folder / "figures").mkdir()
    for item in report.pictures():
        (folder / "figures" / item.file_name).write_bytes(item.png)
    (folder / "report.md").write_text(to_markdown(report), encoding="utf-8")
    (folder / "report.html").write_text(to_html(report), encoding="utf-8")


def make_report(params: Params, active_run: StageRun) -> tuple[Report, dict[str, float]]:
    """The whole report, and what its filter pictures cost (seconds, by kind)."""
    import keras

    import pipeline.models.vgg  # noqa: F401 - registers VGGPreprocess, which the VGG models hold
    from pipeline.reporting.content import build_report

    evaluation = json.loads(EVALUATE_METRICS.read_text())
    models = {name: keras.models.load_model(trained.model) for name, trained in MODELS.items()}
    started = time.perf_counter()
    figures, seconds = draw_filters(params, models)
    seconds["total"] = round(time.perf_counter() - started, 2)
    stage_figures(figures)
    blocks = json.loads(BLOCK_HEADS_METRICS.read_text())
    block_figures(params, models, blocks, figures)
    pretraining_figure(evaluation, figures)
    timings, earlier = mlflow_tables(params.mlflow.experiment, mlflow_run_ids(evaluation))
    commit = active_run.tags.get("mlflow.source.git.commit", "none")[:8]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = build_report(
        ReportInputs(
            models=model_results(params, evaluation, models),
            paired={key: evaluation[key] for key in PAIRS},
            translation=translation_results(evaluation),
            studies=study_results(params.mlflow.experiment),
            figures=figures,
            provenance=provenance(params),
            timings=timings,
            earlier=earlier,
            visualize_seconds=seconds,
            blocks=blocks,
            fit_gap=fit_gaps(),
            generated=f"Generated {now} from commit {commit} (MLflow run {active_run.info.run_id[:8]} of the report).",
            registry=json.loads(EVALUATE_REGISTRY.read_text()) if EVALUATE_REGISTRY.exists() else {},
        )
    )
    return report, seconds


def run(params_file: Path) -> None:
    params = load_params(params_file)  # first: a bad param is reported before TensorFlow loads
    import mlflow

    from pipeline.files import atomic_path
    from pipeline.tracking import tracked

    catalog.require_inputs(STAGE)
    with tracked(STAGE, params) as active:
        report, seconds = make_report(params, active)
        with atomic_path(REPORTS, directory=True) as folder:
            write_report(report, folder)
        mlflow.log_metrics({f"visualize_seconds.{key}": value for key, value in seconds.items()})
        mlflow.log_artifacts(str(REPORTS), artifact_path="report")
    print(
        f"wrote {REPORTS / 'report.md'} and {REPORTS / 'report.html'} "
        f"({len(report.pictures())} pictures; filter pictures took {seconds['total']:.1f} s)"
    )
