"""benchmarks/bench_pipeline.py's pure parts on tiny data: the stage spans read from
`dvc repro`'s output, the epochs read from the metrics files, the JSON and its ratios.
No timing is asserted (the timing half needs the real data: README, Benchmarks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, git_dvc_project

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_pipeline  # noqa: E402


def test_each_stage_runs_from_its_line_to_the_next_stage_line():
    events = [
        (10.0, "Running stage 'download_mnist':\n"),
        (10.5, "> pipeline download-mnist\n"),
        (12.0, "Updating lock file 'dvc.lock'\n"),
        (12.5, "Running stage 'prepare_mnist':\n"),
        (13.0, "Stage 'x' didn't change, skipping\n"),
        (20.25, "Running stage 'train_baseline':\n"),
    ]
    assert bench_pipeline.stage_spans(events, end=50.0) == {
        "download_mnist": 2.5,
        "prepare_mnist": 7.75,
        "train_baseline": 29.75,
    }
    assert bench_pipeline.stage_spans([(1.0, "nothing ran\n")], end=2.0) == {}


def test_the_spans_of_a_real_dvc_repro_cover_its_stages_in_order(tmp_path):
    dvc_yaml = {
        "stages": {
            "first": {"cmd": "echo one > one.txt", "outs": ["one.txt"]},
            "second": {"cmd": "cat one.txt > two.txt", "deps": ["one.txt"], "outs": ["two.txt"]},
        }
    }
    root = git_dvc_project(tmp_path / "project", {"seed": 1}, dvc_yaml)
    spans, wall = bench_pipeline.repro(root)
    assert list(spans) == ["first", "second"]  # -f: both ran, in the DAG's order
    assert all(seconds >= 0 for seconds in spans.values())
    assert sum(spans.values()) <= wall
    assert (root / "two.txt").read_text() == "one\n"
    spans, _ = bench_pipeline.repro(root, "second")  # -f -s: that stage alone, again
    assert list(spans) == ["second"]


def write_metrics(root: Path) -> None:
    (root / "metrics").mkdir(parents=True)
    for name, epochs in {"baseline": 5, "dense": 4, "head": 23, "finetune": 3, "scratch": 7}.items():
        (root / f"metrics/{name}.json").write_text(json.dumps({"epochs": epochs, "test_accuracy": 0.9}))
    block_heads = {
        "block3": {"epochs": 15, "test_accuracy": 0.8},
        "block4": {"epochs": 12, "test_accuracy": 0.9},
        "block4_vs_block3": {"p_value": 0.01},
    }
    (root / "metrics/block_heads.json").write_text(json.dumps(block_heads))


def test_the_epochs_come_from_each_stages_metrics_file(tmp_path):
    write_metrics(tmp_path)
    ran = {stage: bench_pipeline.epochs_run(tmp_path, stage) for stage in bench_pipeline.METRICS}
    assert ran == {
        "train_baseline": {"train_baseline": 5},
        "train_dense": {"train_dense": 4},
        "train_head": {"train_head": 23},
        "finetune": {"finetune": 3},
        "train_scratch": {"train_scratch": 7},
    }
    assert bench_pipeline.epochs_run(tmp_path, "train_block_heads") == {"block3": 15, "block4": 12}


def test_a_missing_metrics_file_is_named(tmp_path):
    write_metrics(tmp_path)
    (tmp_path / "metrics/finetune.json").unlink()
    with pytest.raises(FileNotFoundError, match="finetune.json"):
        bench_pipeline.epochs_run(tmp_path, "finetune")


def test_every_training_stage_of_the_catalog_has_its_epochs_read():
    from pipeline.catalog import STAGES

    trainings = {stage for stage in STAGES if stage.startswith("train_") or stage == "finetune"}
    assert set(bench_pipeline.METRICS) | {"train_block_heads"} == trainings


def test_the_breakdown_divides_process_by_irreducible_seconds():
    process = {"download_mnist": 4.0, "extract_features": 300.0, "train_baseline": 90.0, "report": 40.0}
    irreducible = {"extract_features": 200.0, "train_baseline": 80.0}
    result = bench_pipeline.breakdown(process, irreducible, whole_run=450.0)
    assert result == {
        "stages": {
            "download_mnist": {"process_s": 4.0, "irreducible_s": 0.0, "ratio": None},
            "extract_features": {"process_s": 300.0, "irreducible_s": 200.0, "ratio": 1.5},
            "train_baseline": {"process_s": 90.0, "irreducible_s": 80.0, "ratio": 1.125},
            "report": {"process_s": 40.0, "irreducible_s": 0.0, "ratio": None},
        },
        "whole_run_s": 450.0,
        "irreducible_s": 280.0,
        "whole_run_ratio": round(450 / 280, 3),
        "outside_stages_s": 16.0,
    }
    json.dumps(result)  # what main prints


def test_irreducible_work_of_a_stage_that_did_not_run_is_refused():
    with pytest.raises(ValueError, match="finetune"):
        bench_pipeline.breakdown({"train_head": 10.0}, {"finetune": 5.0}, whole_run=12.0)
