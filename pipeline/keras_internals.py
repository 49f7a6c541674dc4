"""The one room where the pipeline reaches into Keras' private API, behind a version check.

Three things need it, for want of a public API:
- `layer_node`: which call of a layer belongs to a given model's graph (a layer re-applied
  in several graphs has one call per graph, and `layer.output` is the first one's);
- `fix_multi_worker_fit`: two reductions of Keras' TensorFlow trainer that fail under
  `MultiWorkerMirroredStrategy` (keras-team/keras#20585), corrected for that strategy only;
- `save_weights_through_disk`: a .keras file's weights written through a temporary file, not
  a second copy of them in memory (the peak of a VGG16 stage).

Every private name used here is listed in PRIVATE_SYMBOLS (module-level names) or
PRIVATE_ATTRIBUTES (attributes of layers, models and nodes); tests/test_keras_internals.py
checks that each exists in the installed Keras. When one is missing (a Keras release renamed
it) the stage stops with one line naming the Keras version, not a traceback. pyproject.toml
pins Keras to the releases that requirements.lock and the tests cover (TESTED_KERAS).
"""

from __future__ import annotations

import importlib
from typing import Any

import keras

from pipeline.errors import UserError

TESTED_KERAS = ">=3.15.1,<3.16"  # as in pyproject.toml

# (module, attribute path) of every private module-level name we use.
PRIVATE_SYMBOLS = (
    ("keras.src.ops.function", "make_node_key"),
    ("keras.src.backend.tensorflow.trainer", "TensorFlowTrainer._maybe_symbolic_build"),
    ("keras.src.backend.tensorflow.trainer", "reduce_per_replica"),
    ("keras.src.backend.tensorflow.trainer", "_collective_all_reduce_multi_worker"),
    ("keras.src.saving.saving_lib", "is_memory_sufficient"),
)
# Private attributes of objects: a layer's calls, a functional model's node keys, the graph
# a Sequential keeps, a call's outputs and inputs, the strategy a trainer holds.
PRIVATE_ATTRIBUTES = (
    ("Layer", "_inbound_nodes"),
    ("Functional", "_nodes"),
    ("Sequential", "_functional"),
    ("Node", "outputs"),
    ("Node", "input_tensors"),
    ("TensorFlowTrainer", "_distribute_strategy"),
)


def unsupported(what: str) -> UserError:
    """The one-line error for a private Keras name that this Keras does not have."""
    return UserError(
        f"Keras {keras.__version__} has no {what}, which this pipeline relies on; "
        f"install a tested Keras ({TESTED_KERAS}, as requirements.lock pins it)"
    )


def symbol(module: str, path: str) -> Any:
    """The private name `module`:`path` (dotted attributes), or `unsupported`."""
    try:
        found: Any = importlib.import_module(module)
        for name in path.split("."):
            found = getattr(found, name)
    except (ImportError, AttributeError):
        raise unsupported(f"{module}.{path}") from None
    return found


def private(obj: object, name: str) -> Any:
    """`obj.name` for a private attribute, or `unsupported` naming the class."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise unsupported(f"{type(obj).__name__}.{name}") from None


def check() -> None:
    """Resolve every private module-level name (`unsupported` for the first one missing)."""
    for module, path in PRIVATE_SYMBOLS:
        symbol(module, path)


def layer_node(model: keras.Model, layer_name: str) -> Any:
    """The call (Keras `Node`) of `layer_name` that belongs to `model`'s graph.

    Usually a layer has one call. But a layer called in several graphs (e.g. keras.applications
    VGG16's layers re-applied to a new Input to make one flat classifier) has one per graph,
    and `layer.output` is the first one's, which is not connected to `model`'s input. Keras
    has no public API for "this layer's output in this model", so the node is found by key.
    """
    layer = model.get_layer(layer_name)
    calls = private(layer, "_inbound_nodes")
    if len(calls) == 1:
        return calls[0]
    graph = getattr(model, "_functional", None) or model  # a Sequential keeps its graph there
    make_node_key = symbol("keras.src.ops.function", "make_node_key")
    for index, node in enumerate(calls):
        if make_node_key(layer, index) in private(graph, "_nodes"):
            return node
    raise ValueError(f"layer {layer_name!r} is not connected to the input of model {model.name!r}")


def node_output(node: Any) -> Any:
    """The (first) symbolic output of a layer call."""
    return private(node, "outputs")[0]


def node_input(node: Any) -> Any:
    """The (first) symbolic input of a layer call."""
    return private(node, "input_tensors")[0]


def save_weights_through_disk() -> None:
    """Make `model.save(".keras")` write the weights through a temporary file beside it.

    Keras builds a .keras file's weights in memory first (an h5 file in a BytesIO) whenever
    they take less than half the free RAM (`saving_lib.is_memory_sufficient`), and through a
    temporary file otherwise: the same .keras file, without a second copy of every weight.
    In memory, saving a VGG16 classifier added 107 MB to the peak of the finetune stage (and
    MLflow's log_model saves it again). Idempotent.
    """
    check()
    saving_lib: Any = importlib.import_module("keras.src.saving.saving_lib")
    saving_lib.is_memory_sufficient = lambda model: False


def fix_multi_worker_fit() -> None:
    """Correct the two reductions of Keras' TensorFlow trainer that fail multi-worker.

    1. Before the first epoch, fit builds the model from one batch, which it reduces across
       replicas with `strategy.reduce(MEAN, batch, axis=None)`; the collective reduction of a
       multi-worker strategy does not take a nested batch ("Attempt to convert a value
       (PerReplica...)"). Only the batch's shapes matter here, so we take this worker's
       first replica's part, as the single-worker path does in effect.
    2. Each step's logs (scalars: the loss and metric results) are averaged across workers
       with `axis=0`, which a scalar has not ("Invalid reduction dimension 0"). The average
       across replicas is `axis=None`, what the single-machine path computes with
       `reduce_mean(per_replica_values, axis=0)`.
    Both only change what a multi-worker strategy does. Idempotent.
    """
    import tensorflow as tf

    check()
    trainer: Any = importlib.import_module("keras.src.backend.tensorflow.trainer")
    if getattr(trainer, "_pipeline_multi_worker_fixed", False):
        return
    is_multi_worker = trainer._collective_all_reduce_multi_worker
    build, reduce_per_replica = trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica

    def local_part(strategy, value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = private(self, "_distribute_strategy")
        if strategy is None or iterator is None or not is_multi_worker(strategy):
            return build(self, iterator=iterator, data_batch=data_batch)
        for _, _, batches in iterator:
            data_batch = tf.nest.map_structure(lambda value: local_part(strategy, value), next(batches))
            break
        return build(self, data_batch=data_batch)

    def reduce_logs(values, strategy, reduction="auto"):
        if reduction in ("auto", "mean") and is_multi_worker(strategy):
            return tf.nest.map_structure(lambda value: strategy.reduce("MEAN", value, axis=None), values)
        return reduce_per_replica(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer.reduce_per_replica = reduce_logs
    trainer._pipeline_multi_worker_fixed = True
