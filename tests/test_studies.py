"""Studies (studies.yaml): checked, queued as DVC experiments, found again in MLflow and drawn
by the report; a study without runs is reported as not run. No real queue runs here: the
commands are checked as built, and the runs are logged to a temporary store as a queued
experiment's training stage logs them (tag dvc.exp_name)."""

from __future__ import annotations

import shutil

import pytest

from conftest import REPO, run_command, shipped_params, write_yaml
from pipeline.errors import UserError
from pipeline.studies import check_study, get_study, load_studies, queue_commands, run_queue_command, study_runs


@pytest.fixture
def project(workdir):
    write_yaml(workdir / "params.yaml", shipped_params())
    shutil.copy(REPO / "studies.yaml", workdir / "studies.yaml")
    return workdir


def test_the_shipped_studies_are_valid_and_queue_one_experiment_per_value(project):
    studies = load_studies()
    assert set(studies) == {"dropout", "normalisation"}
    for study in studies.values():
        check_study(study, project / "params.yaml")
    dropout = studies["dropout"]
    assert dropout.stages == ["train_baseline"]
    assert queue_commands(dropout, stamp="20261202T170000") == [
        ["dvc", "exp", "run", "--queue", "--force", "train_baseline", "-n", "study-dropout-20261202T170000-1",
         "-S", "baseline.dropout=0.0"],
        ["dvc", "exp", "run", "--queue", "--force", "train_baseline", "-n", "study-dropout-20261202T170000-2",
         "-S", "baseline.dropout=0.5"],
    ]
    assert queue_commands(studies["normalisation"], stamp="x")[1][-1] == "baseline.input_scale=255.0"
    assert run_queue_command(2) == ["dvc", "exp", "run", "--run-all", "-j", "2"]
    assert all(dropout.experiment_pattern().match(command[7]) for command in queue_commands(dropout))


def test_several_params_make_a_grid(project):
    write_yaml(project / "studies.yaml", {"grid": {"claim": "c", "params": {
        "baseline.dropout": [0.0, 0.5], "baseline.learning_rate": [0.001, 0.01]}}})
    study = get_study("grid")
    check_study(study, project / "params.yaml")
    assert [command[-3:] for command in queue_commands(study, "t")][1] == [
        "baseline.dropout=0.0", "-S", "baseline.learning_rate=0.01"]
    assert len(study.combinations()) == 4


@pytest.mark.parametrize("studies, message", [
    ({"dropout": {"claim": "c", "params": {"baseline.dropuot": [0.1]}}},
     r"^studies.yaml: study dropout sweeps baseline.dropuot, which is not a param \(baseline has: conv_filters, "),
    ({"dropout": {"claim": "c", "params": {"nosuch.key": [1]}}}, r"sweeps nosuch.key, which is not a param"),
    ({"dropout": {"claim": "c", "params": {"baseline": [1]}}}, r"sweeps baseline, a section"),
    ({"dropout": {"claim": "c", "params": {"baseline.dropout": [1.5]}}},
     r"^studies.yaml: study dropout: baseline.dropout: input should be less than 1"),
    ({"dropout": {"claim": "c", "params": {"report.image_index": [1]}}}, r"shape no trained model"),
])
def test_a_study_param_that_is_not_a_param_or_a_bad_value_is_one_line(project, studies, message):
    write_yaml(project / "studies.yaml", studies)
    with pytest.raises(UserError, match=message):
        check_study(get_study("dropout"), project / "params.yaml")


def test_an_unknown_study_and_a_bad_param_exit_2_with_one_line(project):
    result = run_command(["pipeline", "study", "nosuch"], cwd=project, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: studies.yaml: no study named 'nosuch' (studies: dropout, normalisation)"
    write_yaml(project / "studies.yaml", {"dropout": {"claim": "c", "params": {"baseline.dropuot": [0.1]}}})
    result = run_command(["pipeline", "study", "dropout"], cwd=project, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "baseline.dropuot, which is not a param" in result.stderr


def log_study_run(experiment, exp_name, dropout, accuracy, history):
    """A train_baseline run as a queued study experiment logs it."""
    import mlflow

    from pipeline.tracking import stage_run

    params = {**shipped_params()["baseline"], "dropout": dropout}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DVC_EXP_NAME", exp_name)
        with stage_run("train_baseline", {"baseline": params}, [], experiment) as run:
            for step, (train, validation) in enumerate(history):
                mlflow.log_metrics({"accuracy": train, "val_accuracy": validation}, step=step)
            mlflow.log_metrics({"test_accuracy": accuracy, "test_accuracy_ci95_low": accuracy - 0.05,
                                "test_accuracy_ci95_high": accuracy + 0.05})
    return run.info.run_id


def test_the_report_draws_a_study_with_runs_and_says_not_run_for_one_without(project, monkeypatch):
    from pipeline.reporting.content import studies_section
    from pipeline.reporting.render import Picture, Text
    from pipeline.stages.report import study_results

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    log_study_run("tiny", "study-dropout-20261202T170000-1", 0.0, 0.90, [(0.9, 0.8), (0.99, 0.8)])
    older = log_study_run("tiny", "study-dropout-20261202T160000-2", 0.5, 0.10, [(0.5, 0.5)])
    newer = log_study_run("tiny", "study-dropout-20261202T170000-2", 0.5, 0.95, [(0.9, 0.88), (0.93, 0.9)])
    log_study_run("tiny", "my-exp", 0.25, 0.5, [(0.5, 0.5)])  # not a study's experiment
    runs = study_runs(get_study("dropout"), "tiny")
    assert [(run.values, run.metrics["test_accuracy"]) for run in runs] == [
        ({"baseline.dropout": 0.0}, 0.90), ({"baseline.dropout": 0.5}, 0.95)]  # the newest of each value
    assert runs[1].run_id == newer != older and runs[0].history["accuracy"] == [0.9, 0.99]

    results = {result.name: result for result in study_results("tiny")}
    assert results["normalisation"].runs == [] and results["normalisation"].figures == []
    dropout = results["dropout"]
    assert [row["label"] for row in dropout.runs] == ["dropout=0.0", "dropout=0.5"]
    assert dropout.runs[0]["final_gap"] == pytest.approx(0.19)
    assert [picture.file_name for picture in dropout.figures] == ["study_dropout_metric.png", "study_dropout_curves.png"]
    assert all(isinstance(p, Picture) and p.png.startswith(b"\x89PNG") for p in dropout.figures)
    section = studies_section(list(results.values()))
    texts = [block.text for block in section.blocks if isinstance(block, Text)]
    assert any(text.endswith("not run yet: `pipeline study normalisation`.") for text in texts)
    assert any("The best test accuracy is dropout=0.5's." in text and "overlaps that of dropout=0.0" in text
               for text in texts)
