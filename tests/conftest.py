"""Shared fixtures: tiny IDX data made here, served from a loopback HTTP server."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `pipeline`, `dvc` and `mlflow`

MNIST_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


# Two different float32 computations of the same numbers (other batch shapes, a split model
# against the whole, a cache against a forward pass) agree only to rounding: oneDNN picks
# other kernels for other shapes, thread splits and CPUs, so the order of float32 sums
# changes. A relative 1e-5, measured against the magnitude of the values (elements near zero
# come out of sums of large terms), holds on any CPU. Bit-identity is asserted only for the
# same computation on the same machine (determinism, resume, a saved and reloaded model).
FLOAT32_RTOL = 1e-5


def assert_float32_close(actual, desired, rtol: float = FLOAT32_RTOL, err_msg: str = "") -> None:
    """actual == desired to `rtol` of desired's largest magnitude (see FLOAT32_RTOL)."""
    desired = np.asarray(desired)
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale, err_msg=err_msg)


def idx_bytes(array: np.ndarray) -> bytes:
    """uint8 array -> IDX bytes (type 0x08)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def tiny_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 'digits': class k lights a bar at row 2k+4, plus noise.

    Each image also carries its own label in pixel (0, 0) (value 10*label), so a test can
    check that every image kept its label through the pipeline.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(count, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 * label + 4 : 2 * label + 6, 4:24] = 255
        images[i, 0, 0] = 10 * label
    return images, labels.astype(np.uint8)


def write_mnist_mirror(folder: Path, train: int = 200, test: int = 50) -> dict[str, dict]:
    """Write the four gzipped IDX files; return mnist.files params (names, sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = tiny_digits(train, seed=1)
    test_images, test_labels = tiny_digits(test, seed=2)
    arrays = {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }
    files = {}
    for key, array in arrays.items():
        raw = idx_bytes(array)
        (folder / MNIST_NAMES[key]).write_bytes(gzip.compress(raw, mtime=0))
        files[key] = {"name": MNIST_NAMES[key], "sha256": hashlib.sha256(raw).hexdigest()}
    return files


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served on http://127.0.0.1:PORT/ for the duration of a test."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """Run the test inside an empty project folder (stages use paths relative to it)."""
    project = tmp_path / "project"
    project.mkdir()
    old = Path.cwd()
    os.chdir(project)
    try:
        yield project
    finally:
        os.chdir(old)


def dead_url() -> str:
    """A loopback URL where nothing listens (the port was just free)."""
    return f"http://127.0.0.1:{free_port()}/"


def write_photo_zip(path: Path, per_class: int = 6, size: int = 40, corrupt: int = 1) -> None:
    """A zip laid out like Microsoft's archive: PetImages/Cat/N.jpg, PetImages/Dog/N.jpg.

    Cats are reddish, dogs bluish (so a model can learn them), and `corrupt` truncated
    JPEGs per class stand in for the broken files of the real archive.
    """
    import io
    import zipfile

    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for name, channel in (("Cat", 0), ("Dog", 2)):
            for i in range(per_class + corrupt):
                pixels = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
                pixels[..., channel] += 150
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                data = buffer.getvalue()
                if i >= per_class:
                    data = data[: len(data) // 2]
                archive.writestr(f"PetImages/{name}/{i}.jpg", data)


def write_vgg16_weights(path: Path) -> str:
    """Random VGG16 notop weights in Keras' h5 layout; returns their sha256."""
    import keras

    keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3)).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------
# Subprocesses on tiny git+DVC projects (test_pipeline, test_kills, test_scaling)
# --------------------------------------------------------------------------------------


def command_env(tracking_uri: str | None = None) -> dict[str, str]:
    """This environment with the venv first on PATH, and MLFLOW_TRACKING_URI only if given."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def run_command(args: list[str], cwd: Path, check: bool = True, tracking_uri: str | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `args` in `cwd` (see command_env); with `check`, a failure shows its output."""
    result = subprocess.run(args, cwd=cwd, env=command_env(tracking_uri), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def wait_for(condition, what: str, timeout: float = 120, process: subprocess.Popen | None = None,
             interval: float = 0.02, log=None) -> None:
    """Poll `condition` until it holds; fail when `process` ends first (showing its output,
    or the open `log` file it writes to) or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            if log is not None:
                log.seek(0)
                out, err = log.read(), ""
            raise AssertionError(f"the process ended ({process.returncode}) before {what}:\n{out}\n{(err or '')[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_yaml(path: Path, data: dict) -> None:
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.default_flow_style = False
    with path.open("w") as handle:
        yaml.dump(data, handle)


def shipped_params() -> dict:
    """The repository's params.yaml, as a dict to change for a tiny project."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())


def serve_folder(folder: Path, request) -> str:
    """http://127.0.0.1:PORT serving `folder` until the requesting fixture's scope ends."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    request.addfinalizer(server.shutdown)
    return f"http://127.0.0.1:{server.server_address[1]}"


def git_dvc_project(root: Path, params: dict, dvc_yaml: dict | None = None, with_venv: bool = False) -> Path:
    """A committed git+DVC copy of the project in `root`: pipeline/, dvc.yaml (or `dvc_yaml`),
    .gitignore and `params`; DVC's analytics off. `with_venv` adds what a user's clone has
    after `make setup`: the Makefile, README, pyproject.toml and lock file, and .venv (a link
    to the venv these tests run in, older than its sources, so `make` installs nothing)."""
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".gitignore", root)
    if with_venv:
        for name in ("Makefile", "README.md", "pyproject.toml", "requirements.lock"):
            shutil.copy(REPO / name, root)
            os.utime(root / name, (0, 0))
        (root / ".venv").symlink_to(Path(sys.prefix))
        with (root / ".gitignore").open("a") as ignore:
            ignore.write("/.venv\n")  # a link, which "/.venv/" does not match
    if dvc_yaml is None:
        shutil.copy(REPO / "dvc.yaml", root)
    else:
        write_yaml(root / "dvc.yaml", dvc_yaml)
    write_yaml(root / "params.yaml", params)
    run_command(["git", "init", "-q"], root)
    for key, value in (("user.name", "t"), ("user.email", "t@t")):
        run_command(["git", "config", key, value], root)
    run_command(["dvc", "init", "-q"], root)
    with (root / ".dvc/config").open("a") as config:  # `dvc config core.analytics false`, minus a start-up
        config.write("[core]\n    analytics = false\n")
    run_command(["git", "add", "-A"], root)
    run_command(["git", "commit", "-q", "-m", "project"], root)
    return root


def client_for(root: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def runs_in(root: Path, experiment: str, stage: str | None = None) -> list:
    """The runs of `experiment` (of one `stage`, if given) in root/mlflow.db, oldest first."""
    client = client_for(root)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"]) if found else []
    return [run for run in runs if stage is None or run.data.tags.get("pipeline.stage") == stage]


def temp_leftovers(root: Path) -> list[Path]:
    """Temporary outputs (pipeline/files.py) left anywhere in a project."""
    return [p for p in root.rglob(".tmp-*") if ".dvc" not in p.parts and ".git" not in p.parts]
