"""dvc.yaml and pipeline/catalog.py say the same thing about every stage: command, data deps,
outs, metrics, plots and params. And a stage's MLflow run logs and hashes what dvc.yaml says
the stage depends on (the report's used to leave most of it out)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import REPO
from pipeline import catalog

DVC = YAML(typ="safe", pure=True).load((REPO / "dvc.yaml").read_text())
PARAMS = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())


def data_deps(stage: str) -> list[Path]:
    """dvc.yaml's deps of `stage` that are other stages' outputs (not code)."""
    return [Path(dep) for dep in DVC["stages"][stage]["deps"] if not dep.startswith("pipeline/")]


def metrics(stage: str) -> list[Path]:
    entries = DVC["stages"][stage].get("metrics", [])
    assert all(options == {"cache": False} for entry in entries for options in entry.values()), "metrics in git"
    return [Path(name) for entry in entries for name in entry]


def plotted_files() -> set[Path]:
    """Every file dvc.yaml's top-level plots draw."""
    files = set()
    for entry in DVC["plots"]:
        ((name, spec),) = entry.items()
        if isinstance(spec.get("y"), dict):  # a named plot: y names the files
            files.update(Path(file) for file in spec["y"])
        else:  # the entry is the file
            files.add(Path(name))
    return files


def test_the_catalog_has_dvc_yamls_stages_in_order():
    assert list(catalog.STAGES) == list(DVC["stages"])


@pytest.mark.parametrize("name", list(catalog.STAGES))
def test_dvc_yaml_declares_what_the_catalog_declares(name):
    stage, declared = catalog.STAGES[name], DVC["stages"][name]
    assert declared["cmd"] == stage.command
    assert sorted(data_deps(name)) == sorted(stage.data_deps), "data deps"
    assert sorted(Path(out) for out in declared.get("outs", [])) == sorted(stage.outputs), "outs"
    assert sorted(metrics(name)) == sorted(stage.metrics), "metrics"
    assert sorted(declared.get("params", [])) == sorted(stage.params), "params"
    for plot in stage.plots:
        assert any(out in plot.parents for out in stage.outputs), f"{plot} is not inside an output of {name}"


def test_dvc_yaml_plots_draw_the_catalogs_plot_files():
    assert plotted_files() == {plot for stage in catalog.STAGES.values() for plot in stage.plots}


def test_every_input_is_written_by_an_earlier_stage():
    order = list(catalog.STAGES)
    for stage in catalog.STAGES.values():
        for path in stage.data_deps:
            writer = catalog.producer(path).name
            assert order.index(writer) < order.index(stage.name), f"{stage.name} reads {path} of {writer}"


def test_the_cli_has_one_command_per_stage():
    from typer.main import get_command

    from pipeline.cli import app

    commands = set(get_command(app).commands)
    assert {stage.subcommand for stage in catalog.STAGES.values()} <= commands
    assert commands - {stage.subcommand for stage in catalog.STAGES.values()} == {"compare", "study", "predict", "ui", "warm"}


def make_inputs(root: Path, paths: list[Path]) -> None:
    """Small stand-ins for a stage's inputs: files (with a suffix) and folders holding one."""
    for path in paths:
        target = root / path if path.suffix else root / path / "part.bin"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(str(path).encode())


# Stages whose run() opens its MLflow run before reading its inputs' contents.
OPEN_RUN_FIRST = ["download_mnist", "download_images", "download_weights", "prepare_mnist", "prepare_images",
                  "report"]


@pytest.mark.parametrize("name", OPEN_RUN_FIRST)
def test_a_stage_run_logs_and_hashes_what_dvc_yaml_says_it_depends_on(name, tmp_path, monkeypatch):
    """The stage's own run(), stopped as its MLflow run starts: the run's params are the
    params dvc.yaml lists (plus, for downloads, where to fetch from), its params.sha256 is
    their hash, and its data.sha256 the hash of dvc.yaml's data deps (for the report: every
    model, metrics file, plots folder, images_report.json and the weights)."""
    import importlib

    import mlflow

    from pipeline import tracking
    from pipeline.files import sha256_tree

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    make_inputs(tmp_path, data_deps(name))

    class Started(Exception):
        pass

    real_stage_run = tracking.stage_run

    def stage_run_then_stop(*args, **kwargs):
        with real_stage_run(*args, **kwargs) as run:
            raise Started(run.info.run_id)

    monkeypatch.setattr(tracking, "stage_run", stage_run_then_stop)
    with pytest.raises(Started) as started:
        importlib.import_module(f"pipeline.stages.{name}").run(Path("params.yaml"))

    run = mlflow.MlflowClient().get_run(str(started.value))
    depends_on = catalog.select(PARAMS, tuple(DVC["stages"][name].get("params", [])))
    assert run.data.tags["pipeline.stage"] == name
    assert run.data.tags["params.sha256"] == hashlib.sha256(
        json.dumps(depends_on, sort_keys=True, default=str).encode()).hexdigest()
    assert run.data.tags["data.sha256"] == sha256_tree(data_deps(name))
    logged = set(run.data.params)
    assert set(tracking.flatten(depends_on)) <= logged
    extra = {key.split(".")[0] + "." + key.split(".")[1] for key in logged - set(tracking.flatten(depends_on))}
    assert extra <= set(catalog.STAGES[name].provenance), "only provenance besides the deps"


def test_dvc_yaml_declares_every_trained_model_as_a_model_artifact():
    """dvc.yaml's `artifacts:` (DVC's model registry reads them: `Repo().artifacts.read()`)."""
    artifacts = DVC["artifacts"]
    assert sorted(Path(a["path"]) for a in artifacts.values()) == sorted(m.model for m in catalog.MODELS.values())
    assert {a["type"] for a in artifacts.values()} == {"model"}
