"""dvc.yaml lists, for each stage, the code that shapes its outputs: a change to that code
makes `dvc repro` run the stage again. Derived here from the imports, so a module a stage
starts to use cannot be forgotten."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import REPO

# Modules that change how a stage runs or reports, never what its outputs hold: tracking
# (MLflow), errors (one-line messages), params (the values are params deps of their own),
# files (atomic writes and hashes), catalog (the paths, held to dvc.yaml by test_catalog.py).
NOT_OUTPUT_SHAPING = {"pipeline.tracking", "pipeline.errors", "pipeline.params", "pipeline.files",
                      "pipeline.catalog"}


def module_file(module: str) -> Path | None:
    path = REPO / Path(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported(source: Path) -> set[str]:
    """The pipeline modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:  # `from pipeline import multi_worker` imports a module
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if module_file(submodule) else node.module)
    return {module for module in found if module.split(".")[0] == "pipeline"}


def output_shaping_code(stage: str) -> set[Path]:
    """Every module the stage's code reaches, except NOT_OUTPUT_SHAPING and package inits."""
    seen, todo = set(), [f"pipeline.stages.{stage}"]
    while todo:
        module = todo.pop()
        if module in seen or module in NOT_OUTPUT_SHAPING:
            continue
        seen.add(module)
        todo.extend(imported(module_file(module)))
    files = {module_file(module) for module in seen}
    return {path.relative_to(REPO) for path in files if path.name != "__init__.py"}


STAGES = YAML(typ="safe", pure=True).load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_depends_on_the_code_that_shapes_its_outputs(stage):
    deps = [Path(dep) for dep in STAGES[stage]["deps"]]
    missing = sorted(str(path) for path in output_shaping_code(stage)
                     if not any(path == dep or dep in path.parents for dep in deps))
    assert missing == [], f"dvc.yaml: {stage} runs code that is not in its deps"
