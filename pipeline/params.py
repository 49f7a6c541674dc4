"""Typed, validated params.yaml.

Every knob of the pipeline lives in params.yaml, and only there: this module is its schema,
with no defaults of its own. A missing or unknown key, a wrong type or a value out of range
stops a stage before any work, with one line that names the key and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from ruamel.yaml import YAML, YAMLError

from pipeline.errors import UserError

PARAMS_FILE = Path("params.yaml")

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]
PositiveInt = Annotated[int, Field(gt=0)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
LearningRate = Annotated[float, Field(gt=0.0, le=1.0)]
Optimizer = Literal["rmsprop", "adam", "sgd"]
# The validation score that picks the epoch whose weights a training keeps (early stopping).
KeepBy = Literal["val_loss", "val_accuracy"]


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class MlflowParams(Section):
    experiment: Annotated[str, Field(min_length=1)]
    system_metrics_seconds: Annotated[float, Field(gt=0.0, le=3600.0)]  # training runs' CPU/memory sampling


class TrainParams(Section):
    """How the training stages run (not what they learn): devices, input pipeline, threads."""

    # none: the default device; mirrored: one replica per visible GPU (else the CPU);
    # multi_worker: several machines, from TF_CONFIG (pipeline/multi_worker.py).
    distribute: Literal["none", "mirrored", "multi_worker"]
    tf_data: bool  # feed fit a tf.data pipeline (shuffle, batch, prefetch) instead of arrays
    intra_op_threads: Annotated[int, Field(ge=0)]  # 0 = TensorFlow's default
    inter_op_threads: Annotated[int, Field(ge=0)]  # 0 = TensorFlow's default


class RemoteFile(Section):
    name: Annotated[str, Field(min_length=1)]
    # sha256 of the decompressed bytes (so any faithful mirror passes); null = not checked.
    sha256: Sha256 | None


class MnistFiles(Section):
    train_images: RemoteFile
    train_labels: RemoteFile
    test_images: RemoteFile
    test_labels: RemoteFile


class MnistParams(Section):
    mirrors: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    files: MnistFiles
    validation_size: Annotated[int, Field(ge=0)]
    retries: Annotated[int, Field(ge=0, le=10)]


class BaselineParams(Section):
    conv_filters: Annotated[list[PositiveInt], Field(min_length=1, max_length=8)]
    kernel_size: PositiveInt
    padding: Literal["valid", "same"]
    strides: PositiveInt
    pool_size: Annotated[int, Field(ge=0)]  # 0 = no pooling between conv layers
    dense_units: PositiveInt
    dropout: Probability
    optimizer: Optimizer
    learning_rate: LearningRate
    lr_schedule: Literal["constant", "cosine"]
    batch_size: PositiveInt
    epochs: PositiveInt
    early_stopping_patience: Annotated[int, Field(ge=0)]  # 0 = off
    # What the first layer sees: the prepared pixels in [0, 1] times this (1 = as prepared;
    # 255 = the raw 0-255 pixel values, for the normalisation study).
    input_scale: Annotated[float, Field(gt=0.0, le=1000.0)]


class DenseParams(Section):
    """The Dense-only MNIST model: Flatten -> Dense layers -> Dropout -> softmax."""

    units: Annotated[list[PositiveInt], Field(min_length=1, max_length=8)]  # one Dense layer per entry
    dropout: Probability
    optimizer: Optimizer
    learning_rate: LearningRate
    lr_schedule: Literal["constant", "cosine"]
    batch_size: PositiveInt
    epochs: PositiveInt
    early_stopping_patience: Annotated[int, Field(ge=0)]  # 0 = off


class PerClass(Section):
    train: PositiveInt
    validation: PositiveInt
    test: PositiveInt


class ImagesParams(Section):
    url: Annotated[str, Field(min_length=1)]
    sha256: Sha256 | None
    size: Annotated[int, Field(ge=32, le=512)]
    per_class: PerClass


class Vgg16Params(Section):
    weights: Annotated[str, Field(min_length=1)]
    weights_sha256: Sha256 | None


class AugmentationParams(Section):
    """The strength of each random change (pipeline/models/augmentation.py)."""

    rotation: Annotated[float, Field(ge=0.0, le=0.5)]  # fraction of a full turn
    zoom: Annotated[float, Field(ge=0.0, lt=1.0)]
    shift: Annotated[float, Field(ge=0.0, lt=1.0)]
    brightness: Annotated[float, Field(ge=0.0, le=1.0)]
    contrast: Annotated[float, Field(ge=0.0, lt=1.0)]


def _increasing(blocks: list[int]) -> list[int]:
    if any(later <= earlier for earlier, later in zip(blocks, blocks[1:])):
        raise ValueError("must list each block once, shallow to deep (e.g. [3, 4, 5])")
    return blocks


VggBlock = Annotated[int, Field(ge=1, le=5)]  # VGG16's five conv blocks


class FeaturesParams(Section):
    batch_size: PositiveInt
    mirror_train: bool  # also cache the left-right mirror of each training photo
    # Seeded random augmentations cached per training photo (0 = none); the free disk space
    # is checked before extracting.
    augment_copies: Annotated[int, Field(ge=0)]
    augmentation: AugmentationParams
    # blocks whose output (blockN_pool) is also cached globally average-pooled, for train_block_heads
    pooled_blocks: Annotated[list[VggBlock], Field(min_length=1), AfterValidator(_increasing)]


class HeadParams(Section):
    pooling: Literal["flatten", "gap"]
    units: PositiveInt
    dropout: Probability
    optimizer: Optimizer
    learning_rate: LearningRate
    batch_size: PositiveInt
    epochs: PositiveInt  # a bound: early stopping ends the training sooner
    early_stopping_patience: Annotated[int, Field(ge=0)]
    keep_by: KeepBy


class FinetuneParams(Section):
    unfreeze: Annotated[int, Field(ge=1, le=3)]
    optimizer: Optimizer
    learning_rate: LearningRate
    batch_size: PositiveInt
    epochs: PositiveInt
    early_stopping_patience: Annotated[int, Field(ge=0)]
    keep_by: KeepBy
    augment: bool


class BlockHeadsParams(Section):
    """The small head trained on each VGG16 block's globally pooled output (train_block_heads)."""

    units: PositiveInt
    dropout: Probability
    optimizer: Optimizer
    learning_rate: LearningRate
    batch_size: PositiveInt
    epochs: PositiveInt
    early_stopping_patience: Annotated[int, Field(ge=0)]


class ScratchParams(Section):
    """The classic four-conv-block convnet trained from scratch on the photos (train_scratch)."""

    size: Annotated[int, Field(ge=16, le=512)]  # the model resizes the photos to size x size
    conv_filters: Annotated[list[PositiveInt], Field(min_length=1, max_length=8)]
    kernel_size: PositiveInt
    dense_units: PositiveInt
    dropout: Probability
    optimizer: Optimizer
    learning_rate: LearningRate
    batch_size: PositiveInt
    epochs: PositiveInt
    early_stopping_patience: Annotated[int, Field(ge=0)]
    augment: bool
    rotation: Annotated[float, Field(ge=0.0, le=0.5)]
    zoom: Annotated[float, Field(ge=0.0, lt=1.0)]


class GradcamParams(Section):
    photos: Annotated[int, Field(ge=1, le=64)]  # test photos shown, up to half misclassified
    layer: Annotated[str, Field(min_length=1)]  # conv layer of the fine-tuned model to explain


class TranslationParams(Section):
    """The MNIST models scored on test digits shifted 0..max_shift pixels right, left, down, up."""

    max_shift: Annotated[int, Field(ge=0)]  # pixels; must be smaller than the digits (checked on the data)
    samples: Annotated[int, Field(ge=0)]  # the first test digits shifted (0 = all of them)


class RegistryParams(Section):
    """MLflow Model Registry: the registered model each scored model becomes a version of."""

    names: dict[str, Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]]
    significance: Annotated[float, Field(gt=0.0, lt=1.0)]  # champion moves only below this p-value


class EvaluateParams(Section):
    batch_size: PositiveInt  # test photos per forward pass
    digits_batch_size: PositiveInt  # test digits per forward pass (the MNIST models, the translation test)
    # test photos also run through the saved VGG16 models, checked against the cached path (0: none)
    raw_sample: Annotated[int, Field(ge=0)]
    raw_rtol: Annotated[float, Field(gt=0.0, lt=1.0)]  # their largest difference, relative to the outputs' size
    misclassified: Annotated[int, Field(ge=1, le=100)]  # misclassified examples drawn per model
    gradcam: GradcamParams
    translation: TranslationParams
    registry: RegistryParams


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise ValueError("must be odd, so the kernel has a centre pixel")
    return value


class ClassicFilterParams(Section):
    gaussian_size: Annotated[int, Field(ge=1, le=31), AfterValidator(_odd)]
    gaussian_sigma: Annotated[float, Field(gt=0.0, le=10.0)]


class PatternParams(Section):
    filters_per_layer: Annotated[int, Field(ge=1, le=64)]
    steps: Annotated[int, Field(ge=1, le=1000)]
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)]  # fraction of the input range per step
    baseline_size: Annotated[int, Field(ge=8, le=256)]
    vgg_size: Annotated[int, Field(ge=32, le=512)]


class ReportParams(Section):
    image_index: Annotated[int, Field(ge=0)]  # the test digit and photo the filters are shown on
    activation_channels: Annotated[int, Field(ge=1, le=64)]
    classic: ClassicFilterParams
    patterns: PatternParams


class PredictParams(Section):
    """`pipeline predict`: not a stage, so no stage depends on it."""

    batch_size: PositiveInt  # pictures per forward pass
    digit_box: Annotated[int, Field(ge=4, le=28)]  # a digit's longer side, of MNIST's 28 pixels


class Params(Section):
    seed: Annotated[int, Field(ge=0)]
    mlflow: MlflowParams
    train: TrainParams
    mnist: MnistParams
    baseline: BaselineParams
    dense: DenseParams
    images: ImagesParams
    vgg16: Vgg16Params
    features: FeaturesParams
    head: HeadParams
    finetune: FinetuneParams
    block_heads: BlockHeadsParams
    scratch: ScratchParams
    evaluate: EvaluateParams
    report: ReportParams
    predict: PredictParams


def _describe(error: Mapping[str, Any]) -> str:
    """One readable phrase for one pydantic error, naming the dotted key."""
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check the spelling against the defaults in params.yaml)"
    if error["type"] == "missing":
        return f"{key}: missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message[:1].lower()}{message[1:]} (got {error['input']!r})"


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    """Validate an already-loaded params mapping; raise UserError naming the bad key."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(f"{source}: {_describe(errors[0])}{more}") from None


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; any problem is a UserError naming the file and key."""
    try:
        # YAML 1.2 (pure loader), as DVC reads it: `1e-5` is a float, not a string.
        with path.open(encoding="utf-8") as handle:
            raw = YAML(typ="safe", pure=True).load(handle)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run from the project root") from None
    except YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_params(raw, str(path))
