"""What train_head and finetune share: cached features, loss choice, VGG figures."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.catalog import FEATURES
from pipeline.stages.common import Trained, fit

if TYPE_CHECKING:
    from pipeline.params import FinetuneParams, HeadParams, Params
    from pipeline.tracking import StageRun

Splits = Mapping[str, tuple[np.ndarray, np.ndarray]]

HEAD_LAYERS = ("head_pool", "head_dense", "head_dropout", "head_output")
SPLITS = ("train", "validation", "test")


def load_features(kind: str, tensors: bool = False) -> tuple[Splits, list[str]]:
    """{split: (features, labels)} for `kind` "frozen" or "pooled", and the class names;
    with `tensors`, the features as TensorFlow tensors (`read_tensor`)."""
    read = read_tensor if tensors else np.load
    splits = {
        split: (read(FEATURES / f"{split}_{kind}.npy"), np.load(FEATURES / f"{split}_labels.npy")) for split in SPLITS
    }
    return splits, cached_class_names()


def cached_class_names() -> list[str]:
    """The class names extract_features wrote beside the features, in label order."""
    return json.loads((FEATURES / "class_names.json").read_text())


class CachedSplits(Mapping):
    """The feature cache's {split: (features, labels)} for `kind` ("frozen" or "pooled"),
    each split read (as a tensor, `read_tensor`) when first used. `forget(split)` drops one:
    TensorFlow's CPU allocator keeps the memory it frees and hands it to the next tensor, so
    a split read after another is forgotten fits in the memory the first held, instead of
    adding to the process's peak (fine-tuning: the test rows in the training rows' place)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._read: dict[str, tuple[Any, np.ndarray]] = {}

    def __getitem__(self, split: str) -> tuple[Any, np.ndarray]:
        if split not in SPLITS:
            raise KeyError(split)
        if split not in self._read:
            features = read_tensor(FEATURES / f"{split}_{self.kind}.npy")
            self._read[split] = (features, np.load(FEATURES / f"{split}_labels.npy"))
        return self._read[split]

    def __iter__(self) -> Iterator[str]:
        return iter(SPLITS)

    def __len__(self) -> int:
        return len(SPLITS)

    def forget(self, split: str) -> None:
        import gc

        self._read.pop(split, None)
        gc.collect()  # what model.fit built around a split's tensor holds it in reference cycles


def read_tensor(path: Path) -> Any:
    """A C-ordered .npy file as a TensorFlow tensor, its bytes read by TensorFlow itself.

    model.fit and evaluate convert a numpy array into a tensor of their own, which took
    twice the array's size on top of it (measured: 316 MB of features, peak RSS +950 MB
    with np.load, and the same with mmap_mode="r", whose pages count once read); given this
    tensor, Keras uses it as it is, with the same batches and order (the same numbers),
    and the peak is the array twice, while it is decoded.
    """
    import tensorflow as tf

    header = np.load(path, mmap_mode="r")  # shape, dtype and where the data starts; reads no rows
    if not header.flags.c_contiguous:
        raise ValueError(f"{path}: not a C-ordered array")
    start, shape, dtype = header.offset // header.dtype.itemsize, header.shape, header.dtype
    del header
    flat = tf.io.decode_raw(tf.io.read_file(str(path)), tf.as_dtype(dtype))  # the header is a multiple of 64 bytes
    return tf.reshape(flat[start:], shape)


def loss_for(num_classes: int) -> str:
    """One sigmoid unit for two classes, softmax over integer labels for more."""
    return "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"


def compile_classifier(model: Any, num_classes: int, p: HeadParams | FinetuneParams) -> None:
    """Compile `model` with the section's optimizer and the loss for `num_classes`; call it
    inside the strategy's scope, where the model was built."""
    from pipeline.models.optimizer import make_optimizer

    model.compile(
        optimizer=make_optimizer(p.optimizer, p.learning_rate), loss=loss_for(num_classes), metrics=["accuracy"]
    )


def fit_and_test(
    model: Any,
    splits: Splits,
    p: HeadParams | FinetuneParams,
    params: Params,
    replicas: int,
    run: StageRun | None,
    test_batch_size: int,
    saved_model: Any = None,
) -> Trained:
    """Fit the compiled `model` on `splits` ({split: (inputs, labels)}) and test it;
    `saved_model` is what the stage saves. `CachedSplits` forget the training split once
    the model is fitted, and read the test split then."""
    result = fit(
        model,
        splits["train"],
        splits["validation"],
        p.epochs,
        p.batch_size * replicas,
        p.early_stopping_patience,
        params.train.tf_data,
        params.seed,
        run=run,
        keep_by=p.keep_by,
    )
    if isinstance(splits, CachedSplits):
        splits.forget("train")
    test_loss, test_accuracy = model.evaluate(*splits["test"], batch_size=test_batch_size, verbose=0)
    return Trained(
        model=model,
        fit=result,
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        test_samples=len(splits["test"][0]),
        validation_samples=len(splits["validation"][0]),
        saved_model=saved_model,
    )


def head_of(classifier, features_shape: tuple[int, ...]):
    """The head of a saved classifier as a model of its own, sharing its layers' weights."""
    import keras

    features = keras.Input(shape=features_shape, name="features")
    x = features
    for name in HEAD_LAYERS:
        x = classifier.get_layer(name)(x)
    return keras.Model(features, x, name="head")


def vgg_figures(classifier, photo: np.ndarray, layers: tuple[str, ...]) -> dict:
    """block1_conv1's RGB kernels and the activation maps of `layers` for one photo."""
    from pipeline.models.vgg import standalone_copy
    from pipeline.viz.activations import activation_maps, activation_maps_figures
    from pipeline.viz.kernels import kernel_grid

    # A copy has one use per layer, so intermediate outputs are reachable from its input.
    model = standalone_copy(classifier)
    kernels = model.get_layer("block1_conv1").get_weights()[0]
    figures = {"kernels_block1_conv1.png": kernel_grid(kernels, "block1_conv1: 64 RGB kernels", bgr=True)}
    maps = activation_maps(model, photo.astype(np.float32), list(layers))
    for name, figure in activation_maps_figures(maps, max_channels=16).items():
        figures[f"activations_{name}.png"] = figure
    return figures
