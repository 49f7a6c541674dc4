"""The stages of the pipeline, declared once: name, command, inputs, outputs, params.

In the spirit of Kedro's data catalog: every path a stage reads or writes and every params
section it depends on is named here, and everything else reads it - the stage modules (their
paths and upstream checks), the CLI (one command per stage), evaluate and report (which
models exist, which stages ran), and MLflow tracking (the params a run logs and the inputs
whose hash it records). tests/test_catalog.py holds dvc.yaml to this file, so the DAG that
DVC runs and the one the code believes in cannot drift apart.

Wiring only, nothing that shapes an output's content (so it is not a code dep of the stages
in dvc.yaml: a path changed here is a change of dvc.yaml too). Free of imports beyond the
standard library: the CLI reads it before anything loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# -- data -----------------------------------------------------------------------------
MNIST_RAW = Path("data/raw/mnist")
IMAGES_RAW = Path("data/raw/images")
IMAGES_REPORT = Path("data/raw/images_report.json")
WEIGHTS = Path("data/raw/weights/vgg16_notop.h5")
MNIST = Path("data/prepared/mnist.npz")
IMAGES = Path("data/prepared/images.npz")
FEATURES = Path("data/features")
EVALUATE_METRICS = Path("metrics/evaluate.json")
EVALUATE_PLOTS = Path("plots/evaluate")
# Inside evaluate's plots folder (so dvc.yaml's out covers them), not DVC metrics:
EVALUATE_PER_CLASS = EVALUATE_PLOTS / "per_class.csv"  # model, class, precision, recall, f1, support
# model, direction, pixels, correct, samples, accuracy, ci95_low, ci95_high: the MNIST models on shifted digits
EVALUATE_TRANSLATION = EVALUATE_PLOTS / "translation.csv"
EVALUATE_REGISTRY = EVALUATE_PLOTS / "registry.json"  # per model: its registered version and alias, and why
REPORTS = Path("reports")
# train_block_heads: a small head on each VGG16 block's pooled output (features.pooled_blocks)
BLOCK_HEADS_METRICS = Path("metrics/block_heads.json")
BLOCK_HEADS_PLOTS = Path("plots/block_heads")
BLOCK_HEADS_ACCURACY = BLOCK_HEADS_PLOTS / "accuracy_by_block.csv"  # block, test accuracy, interval


@dataclass(frozen=True)
class TrainedModel:
    """One of the trained classifiers, keyed as in metrics/evaluate.json."""

    stage: str  # the training stage that writes it
    model: Path
    metrics: Path
    plots: Path  # folder: history.csv, summary.txt, curves.png, figures
    test_data: Path  # what evaluate scores it on

    @property
    def history(self) -> Path:
        return self.plots / "history.csv"


MODELS: dict[str, TrainedModel] = {
    "baseline": TrainedModel(
        "train_baseline", Path("models/baseline.keras"), Path("metrics/baseline.json"), Path("plots/baseline"), MNIST
    ),
    "dense": TrainedModel(
        "train_dense", Path("models/dense.keras"), Path("metrics/dense.json"), Path("plots/dense"), MNIST
    ),
    "feature_extraction": TrainedModel(
        "train_head", Path("models/head.keras"), Path("metrics/head.json"), Path("plots/head"), IMAGES
    ),
    "fine_tuning": TrainedModel(
        "finetune", Path("models/finetuned.keras"), Path("metrics/finetune.json"), Path("plots/finetune"), IMAGES
    ),
    # What pretraining buys: the same photos, no ImageNet (paired with the two above by evaluate)
    "scratch": TrainedModel(
        "train_scratch", Path("models/scratch.keras"), Path("metrics/scratch.json"), Path("plots/scratch"), IMAGES
    ),
}


def evaluate_correct(test_data: Path) -> Path:
    """plots/evaluate/correct_<mnist|images>.csv: one row per sample of the test set
    `test_data`, a 0/1 column per model scored on it (1: it was right), for paired tests."""
    return EVALUATE_PLOTS / f"correct_{test_data.stem}.csv"


def _pairs() -> dict[str, tuple[str, str]]:
    names = list(MODELS)
    return {
        f"{later}_vs_{earlier}": (later, earlier)
        for i, earlier in enumerate(names)
        for later in names[i + 1 :]
        if MODELS[later].test_data == MODELS[earlier].test_data
    }


# {key in evaluate.json: (later, earlier)} for every two models scored on the same test data,
# the later one in MODELS' order first: {"fine_tuning_vs_feature_extraction": (...)}.
PAIRS: dict[str, tuple[str, str]] = _pairs()


def model_of(stage: str) -> TrainedModel:
    """The model that training stage `stage` writes."""
    return next(model for model in MODELS.values() if model.stage == stage)


@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml, as the code sees it (code deps are derived from the imports)."""

    name: str
    summary: str  # the command's help
    inputs: tuple[Path, ...] = ()  # other stages' outputs it reads (its data deps)
    optional: tuple[Path, ...] = ()  # data deps it reads when they exist, which it can do without
    outputs: tuple[Path, ...] = ()  # its outs (cached by DVC)
    metrics: tuple[Path, ...] = ()  # its metrics files (in git, not cached)
    plots: tuple[Path, ...] = ()  # files of its outputs that dvc.yaml's plots draw
    params: tuple[str, ...] = ()  # params.yaml keys it depends on (a section or section.key)
    provenance: tuple[str, ...] = ()  # params logged to MLflow that are not deps (where to fetch from)

    @property
    def subcommand(self) -> str:
        """`pipeline SUBCOMMAND` runs the stage: its name with dashes."""
        return self.name.replace("_", "-")

    @property
    def command(self) -> str:
        """dvc.yaml's cmd."""
        return f"pipeline {self.subcommand}"

    @property
    def data_deps(self) -> tuple[Path, ...]:
        """What dvc.yaml lists as its data deps, and what its MLflow run hashes."""
        return self.inputs + self.optional

    def params_of(self, params: Any) -> dict[str, Any]:
        """The stage's params deps, nested as in params.yaml, from a `Params` (or a mapping)."""
        return select(_as_dict(params), self.params)

    def provenance_of(self, params: Any) -> dict[str, Any]:
        return select(_as_dict(params), self.provenance)


def _training(name: str, summary: str, section: str, inputs: tuple[Path, ...]) -> Stage:
    model = model_of(name)
    return Stage(
        name,
        summary,
        inputs,
        outputs=(model.model, model.plots),
        metrics=(model.metrics,),
        plots=(model.history,),
        params=("seed", section, "train"),
    )


# In pipeline order: `dvc repro` may run them in another order that respects the inputs.
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "download_mnist",
            "Download the four MNIST IDX files from the first good mirror, checked.",
            outputs=(MNIST_RAW,),
            params=("mnist.files",),
            provenance=("mnist.mirrors", "mnist.retries"),
        ),
        Stage(
            "prepare_mnist",
            "Normalise MNIST to float32 in [0, 1], one-hot labels, stratified split.",
            inputs=(MNIST_RAW,),
            outputs=(MNIST,),
            params=("seed", "mnist.validation_size"),
        ),
        _training("train_baseline", "Train the baseline convnet on MNIST; log it to MLflow.", "baseline", (MNIST,)),
        _training(
            "train_dense", "Train the Dense-only MNIST model (no convolution); log it to MLflow.", "dense", (MNIST,)
        ),
        Stage(
            "download_images",
            "Download and safely extract the photos; keep the ones that decode.",
            outputs=(IMAGES_RAW, IMAGES_REPORT),
            params=("images.url", "images.sha256"),
        ),
        Stage(
            "download_weights",
            "Download VGG16's notop ImageNet weights (or take a file), checked.",
            outputs=(WEIGHTS,),
            params=("vgg16",),
        ),
        Stage(
            "prepare_images",
            "Decode, resize and split the photos per class.",
            inputs=(IMAGES_RAW,),
            outputs=(IMAGES,),
            params=("seed", "images.size", "images.per_class"),
        ),
        Stage(
            "extract_features",
            "Cache VGG16's frozen activations for every photo, once.",
            inputs=(IMAGES, WEIGHTS),
            outputs=(FEATURES,),
            params=("seed", "features", "finetune.unfreeze"),  # seed: the augmented copies
        ),
        _training(
            "train_head",
            "Train a new classifier on the cached VGG16 features; log it to MLflow.",
            "head",
            (FEATURES, IMAGES, WEIGHTS),  # the photos: the classifier's input size, figures, examples
        ),
        _training(
            "finetune",
            "Fine-tune VGG16's top conv layers with the classifier; log it to MLflow.",
            "finetune",
            # VGG16 comes with the feature-extraction classifier (its weights: WEIGHTS, frozen)
            (FEATURES, IMAGES, MODELS["feature_extraction"].model),
        ),
        Stage(
            "train_block_heads",
            "Train a small head on each VGG16 block's pooled features: accuracy by depth.",
            inputs=(FEATURES,),
            outputs=(BLOCK_HEADS_PLOTS,),
            metrics=(BLOCK_HEADS_METRICS,),
            plots=(BLOCK_HEADS_ACCURACY,),
            params=("seed", "block_heads", "train"),
        ),
        _training(
            "train_scratch",
            "Train the classic four-block convnet from scratch on the photos; log it to MLflow.",
            "scratch",
            (IMAGES,),
        ),
        Stage(
            "evaluate",
            "Score every model on its test split: metrics, confusion, Grad-CAM; log to MLflow.",
            # FEATURES: the VGG16 models are scored on the cached test activations
            inputs=(MNIST, IMAGES, FEATURES, *(model.model for model in MODELS.values())),
            outputs=(EVALUATE_PLOTS,),
            metrics=(EVALUATE_METRICS,),
            plots=tuple(EVALUATE_PLOTS / f"confusion_{key}.csv" for key in MODELS),
            # seed: the raw photos checked; finetune.unfreeze: the layer the cache holds
            params=("seed", "evaluate", "finetune.unfreeze"),
        ),
        Stage(
            "report",
            "Filter pictures and reports/report.md + a self-contained report.html.",
            inputs=(
                EVALUATE_METRICS,
                EVALUATE_PLOTS,
                *(path for model in MODELS.values() for path in (model.metrics, model.plots)),
                *(model.model for model in MODELS.values()),
                MNIST,
                IMAGES,
                BLOCK_HEADS_METRICS,
                BLOCK_HEADS_PLOTS,
            ),
            optional=(IMAGES_REPORT, WEIGHTS),  # provenance: what was skipped, the weights' sha256
            outputs=(REPORTS,),
            # shown in the report: the key params of each model and the data's provenance
            params=(
                "seed",
                "report",
                "baseline",
                "dense",
                "head",
                "finetune",
                "features.augment_copies",
                "scratch",
                "block_heads",
                "images.size",
                "mnist.files",
                "vgg16.weights",
            ),
        ),
    )
}


def producer(path: Path) -> Stage:
    """The stage that writes `path` (one of the outputs or metrics above)."""
    for stage in STAGES.values():
        if path in stage.outputs or path in stage.metrics:
            return stage
    raise KeyError(f"no stage writes {path}")


def upstream(stage: Stage) -> list[tuple[Path, str]]:
    """(input, the stage that writes it) for each input of `stage` (the optional ones aside)."""
    return [(path, producer(path).name) for path in stage.inputs]


def require_inputs(stage: Stage) -> None:
    """Stop with one line naming the stage to run when an input of `stage` is missing."""
    from pipeline.errors import require

    for path, writer in upstream(stage):
        require(path, stage=writer)


def select(params: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The parts of nested `params` that dotted `keys` name, nested the same way.

    select(p, ("seed", "images.size")) -> {"seed": 42, "images": {"size": 150}}
    """
    selected: dict[str, Any] = {}
    for key in keys:
        *sections, leaf = key.split(".")
        source, target = params, selected
        for section in sections:
            source, target = source[section], target.setdefault(section, {})
        target[leaf] = source[leaf]
    return selected


def _as_dict(params: Any) -> Mapping[str, Any]:
    return params if isinstance(params, Mapping) else params.model_dump()
