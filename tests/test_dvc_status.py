"""Which stages a code change makes stale, as `dvc status` sees it: a project with dvc.yaml,
params.yaml and pipeline/, stand-ins for every stage's data, recorded by `dvc commit`
(no stage runs), then one source file edited."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import REPO, run_command
from pipeline import catalog

def dvc(root: Path, *args: str) -> str:
    return run_command(["dvc", *args], root, timeout=300).stdout


def committed_project(root: Path) -> Path:
    """dvc.yaml, params.yaml and pipeline/ in `root`, every stage's data a stand-in, all
    of it recorded in dvc.lock: `dvc status` finds everything up to date."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for stage in catalog.STAGES.values():
        for path in stage.outputs + stage.metrics:
            target = root / path if path.suffix else root / path / "part.bin"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(str(path))
    dvc(root, "init", "--no-scm", "-q")
    dvc(root, "commit", "-f", "-q")
    assert json.loads(dvc(root, "status", "--json")) == {}
    return root


def stale_after_editing(root: Path, source: str) -> set[str]:
    with (root / source).open("a") as handle:
        handle.write("\n# an edit\n")
    return set(json.loads(dvc(root, "status", "--json")))


def test_editing_the_baseline_convnet_leaves_the_vgg16_trainings_up_to_date(tmp_path):
    root = committed_project(tmp_path)
    stale = stale_after_editing(root, "pipeline/models/baseline.py")
    assert "train_baseline" in stale
    assert not stale & {"train_head", "finetune", "extract_features"}
