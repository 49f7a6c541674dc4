"""TensorFlow only where a stage computes with it (ARCHITECTURE.md, Invariants).

Importing TensorFlow costs a process seconds and hundreds of MB; a stage that only moves
files and numpy arrays, and the CLI's help, must not pay it. Each stage runs as a user runs
it (`pipeline STAGE`, its own process) on tiny data, in DAG order, and reports what it loaded.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from conftest import command_env, serve_folder, shipped_params, write_mnist_mirror, write_photo_zip, write_yaml

# Every stage that reads and writes only files and numpy arrays, in the order they can run.
WITHOUT_TENSORFLOW = ["download_mnist", "prepare_mnist", "download_images", "prepare_images"]
PHOTOS = "pets.zip"

# `pipeline ARGS` in this process, then which of the heavy modules it imported, as JSON.
PROBE = """
import json, sys
from pipeline import cli
sys.argv = ["pipeline", *sys.argv[1:]]
try:
    cli.main()
    code = 0
except SystemExit as exc:
    code = exc.code or 0
print(json.dumps({"code": code, "loaded": sorted({"tensorflow", "keras"} & set(sys.modules))}))
"""


def probe(args: list[str], cwd) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=command_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, f"{args}: {result.stdout}\n{result.stderr[-3000:]}"
    return report


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, request) -> dict[str, list[str]]:
    """{stage: the heavy modules its process imported}, each stage run once on tiny data."""
    base = tmp_path_factory.mktemp("no_tf")
    served = base / "served"
    files = write_mnist_mirror(served / "mnist")
    write_photo_zip(served / PHOTOS)
    url = serve_folder(served, request)
    params = shipped_params()
    params["mnist"].update(mirrors=[url + "/mnist/"], files=files, validation_size=20, retries=0)
    photos_sha256 = hashlib.sha256((served / PHOTOS).read_bytes()).hexdigest()
    params["images"].update(url=f"{url}/{PHOTOS}", sha256=photos_sha256, size=32,
                            per_class={"train": 2, "validation": 2, "test": 2})
    params["mlflow"].update(experiment="tiny")
    project = base / "project"
    project.mkdir()
    write_yaml(project / "params.yaml", params)
    found = {"--help": probe(["--help"], project)["loaded"]}
    for stage in WITHOUT_TENSORFLOW:
        found[stage] = probe([stage.replace("_", "-")], project)["loaded"]
    assert (project / "data/prepared/mnist.npz").exists() and (project / "data/prepared/images.npz").exists()
    return found


@pytest.mark.parametrize("command", ["--help", *WITHOUT_TENSORFLOW])
def test_no_tensorflow_where_nothing_is_computed_with_it(loaded, command):
    assert loaded[command] == [], f"`pipeline {command}` imported {loaded[command]}"
