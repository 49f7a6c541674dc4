"""Every private Keras name the pipeline relies on exists in the installed Keras, and one that
does not is a one-line error naming the Keras version; nothing else in pipeline/ reaches in."""

from __future__ import annotations

import ast
import re
import subprocess

import pytest

from conftest import REPO


def test_every_private_module_symbol_exists():
    from pipeline import keras_internals

    keras_internals.check()
    for module, path in keras_internals.PRIVATE_SYMBOLS:
        assert keras_internals.symbol(module, path) is not None


def test_every_private_attribute_exists_on_a_tiny_model():
    import keras

    from pipeline import keras_internals
    from pipeline.models.graph import layer_input, layer_output

    dense = keras.layers.Dense(2, name="shared")
    first = keras.Sequential([keras.Input((3,)), dense])
    image = keras.Input((3,))
    second = keras.Model(image, dense(image))  # `dense` now has two calls, one per graph
    objects = {"Layer": dense, "Functional": second, "Sequential": first,
               "Node": keras_internals.layer_node(second, "shared"), "TensorFlowTrainer": second}
    for owner, name in keras_internals.PRIVATE_ATTRIBUTES:
        assert hasattr(objects[owner], name), f"{owner}.{name}"
    assert layer_input(second, "shared") is image
    assert layer_output(second, "shared") is second.outputs[0]


def test_a_missing_private_symbol_is_one_line_naming_the_keras_version(monkeypatch):
    import keras

    from pipeline import keras_internals
    from pipeline.errors import UserError

    monkeypatch.setattr(keras_internals, "PRIVATE_SYMBOLS",
                        (*keras_internals.PRIVATE_SYMBOLS, ("keras.src.ops.function", "renamed_in_a_later_keras")))
    with pytest.raises(UserError) as caught:
        keras_internals.check()
    message = str(caught.value)
    assert f"Keras {keras.__version__}" in message and "renamed_in_a_later_keras" in message
    assert "\n" not in message
    with pytest.raises(UserError, match=re.escape(f"Keras {keras.__version__} has no Dense._gone")):
        keras_internals.private(keras.layers.Dense(1), "_gone")


def test_a_saved_model_s_weights_go_through_a_file_beside_it_not_a_copy_in_memory(tmp_path, monkeypatch):
    import keras
    import keras.src.saving.saving_lib as saving_lib
    import numpy as np

    from pipeline import keras_internals

    monkeypatch.setattr(saving_lib, "is_memory_sufficient", saving_lib.is_memory_sufficient)  # undone afterwards
    stores = []

    class RecordingStore(saving_lib.H5IOStore):
        def __init__(self, path_or_io, archive=None, mode="r"):
            stores.append((str(path_or_io), archive))
            super().__init__(path_or_io, archive=archive, mode=mode)

    monkeypatch.setattr(saving_lib, "H5IOStore", RecordingStore)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
    keras_internals.save_weights_through_disk()
    keras_internals.save_weights_through_disk()  # idempotent
    model.save(tmp_path / "model.keras")
    ((path, archive),) = stores
    assert archive is None and path.startswith(str(tmp_path)), "a temporary file beside the model, not memory"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"], "and it is gone"
    loaded = keras.models.load_model(tmp_path / "model.keras")
    for saved, read in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(saved, read)


def test_pyproject_pins_keras_to_the_locked_release():
    from pipeline.keras_internals import TESTED_KERAS

    pyproject = (REPO / "pyproject.toml").read_text()
    locked = re.search(r"^keras==(\S+)$", (REPO / "requirements.lock").read_text(), re.M).group(1)
    assert f'"keras{TESTED_KERAS}"' in pyproject
    low, high = re.fullmatch(r">=(\S+),<(\S+)", TESTED_KERAS).groups()
    as_tuple = lambda version: tuple(int(part) for part in version.split("."))  # noqa: E731
    assert as_tuple(low) <= as_tuple(locked) < as_tuple(high)


def test_only_keras_internals_reaches_into_keras():
    found = subprocess.run(["grep", "-rln", "--include=*.py", r"keras.src\|\._inbound_nodes\|\._functional", "pipeline/"],
                           cwd=REPO, capture_output=True, text=True).stdout.split()
    assert found == ["pipeline/keras_internals.py"]


def test_models_never_import_figures():
    for source in (REPO / "pipeline/models").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(name.startswith("pipeline.viz") for name in names), source.name
