"""Studies (studies.yaml): checked, queued as DVC experiments, found again in MLflow and drawn
by the report; a study without runs is reported as not run. No real queue runs here: the
commands are checked as built, and the runs are logged to a temporary store as a queued
experiment's training stage logs them (tag dvc.exp_name)."""

from __future__ import annotations

import shutil
import sys

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


# ------------------------------------------------------------ benchmarks/ft_study.py (issue 15's grid)


@pytest.fixture(scope="module")
def ft_study():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ft_study", REPO / "benchmarks" / "ft_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ft_study"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_grid_queues_one_finetune_experiment_per_point_without_force(project, ft_study):
    result = run_command([sys.executable, str(REPO / "benchmarks" / "ft_study.py"), "queue", "--dry-run"], cwd=project)
    commands = [line[2:].split() for line in result.stdout.splitlines()]
    assert len(commands) == 3 * 3 * 2 * 2
    stamp = commands[0][6].split("-")[1]
    assert commands[0] == ["dvc", "exp", "run", "--queue", "finetune", "-n", f"ftgrid-{stamp}-1",
                           "-S", "features.augment_copies=0", "-S", "finetune.unfreeze=3",
                           "-S", "finetune.learning_rate=2e-06", "-S", 'finetune.keep_by="val_loss"']
    assert commands[-1][6:] == [f"ftgrid-{stamp}-36", "-S", "features.augment_copies=4", "-S", "finetune.unfreeze=1",
                                "-S", "finetune.learning_rate=1e-05", "-S", 'finetune.keep_by="val_accuracy"']
    # a value params.py refuses is one line, exit 2, nothing queued
    result = run_command([sys.executable, str(REPO / "benchmarks" / "ft_study.py"), "queue", "--dry-run",
                          "--keep-by", "val_f1"], cwd=project, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: benchmarks/ft_study.py: study ftgrid: finetune.keep_by")
    assert len(result.stderr.strip().splitlines()) == 1


def fake_experiment(name, copies, unfreeze, rate, validation, test, kept, head_run, finetune_run, samples=500):
    """One experiment as `dvc exp show --json` nests it: params.yaml and the metrics files'
    numbers (DVC leaves their lists, the intervals, out)."""
    params = {"seed": 42, "features": {"augment_copies": copies, "mirror_train": True},
              "finetune": {"unfreeze": unfreeze, "learning_rate": rate, "keep_by": "val_loss"}}
    finetune = {"validation_accuracy": validation, "validation_samples": samples, "test_accuracy": test,
                "test_samples": 502, "kept_epoch": kept, "epochs": 3, "mlflow_run_id": finetune_run}  # no lists
    return {"rev": f"rev-{name}", "name": name, "error": None, "experiments": None, "data": {
        "params": {"params.yaml": {"data": params}},
        "metrics": {"metrics/finetune.json": {"data": finetune}, "metrics/head.json": {"data": {"mlflow_run_id": head_run, "test_accuracy": 0.97}}}}}


def extraction_run(ft_study, run_id, copies, unfreeze, seconds):
    from pipeline.tracking import flatten

    params = flatten({"seed": 42, "features": {"augment_copies": copies, "mirror_train": True},
                      "finetune.unfreeze": unfreeze})
    return ft_study.StageRun("extract_features", run_id, params, seconds)


def test_the_table_reads_the_grid_points_and_picks_the_best_by_validation_the_cheaper_on_a_tie(ft_study):
    from pipeline.evaluation import wilson_interval

    keys = ["features.augment_copies", "finetune.unfreeze", "finetune.learning_rate", "finetune.keep_by"]
    experiments = [
        fake_experiment("ftgrid-20261203T090000-3", 0, 2, 1e-5, 0.972, 0.990, 2, "h0", "f3"),
        fake_experiment("ftgrid-20261203T090000-1", 0, 3, 2e-6, 0.970, 0.974, 0, "h0", "f1"),
        fake_experiment("ftgrid-20261203T090000-2", 0, 3, 1e-5, 0.972, 0.960, 1, "h0", "f2"),
        fake_experiment("ftgrid-20261203T090000-10", 2, 3, 2e-6, 0.964, 0.974, 0, "h2", "f10"),
        fake_experiment("ftgrid-20261203T080000-1", 0, 3, 2e-6, 0.5, 0.5, 0, "h0", "f0"),  # queued again later
        fake_experiment("my-exp", 0, 3, 1e-3, 0.999, 0.999, 1, "h0", "fx"),  # not a grid point
    ]
    failed = {"rev": "r", "name": "ftgrid-20261203T090000-4", "data": {"params": {}, "metrics": {}}}
    shown = [{"rev": "workspace", "name": None, "data": {"params": {}}, "experiments": None},
             {"rev": "abc", "name": "main", "data": {"params": {}}, "experiments": [
                 {"name": e["name"], "executor": None, "revs": [e]} for e in [*experiments, failed]]}]
    runs = [extraction_run(ft_study, "old", 0, 3, 999.0), extraction_run(ft_study, "e03", 0, 3, 500.0),
            extraction_run(ft_study, "e02", 0, 2, 450.0), extraction_run(ft_study, "e23", 2, 3, 700.0),
            *(ft_study.StageRun(stage, run_id, {}, seconds) for stage, run_id, seconds in [
                ("train_head", "h0", 100.0), ("train_head", "h2", 120.0), ("finetune", "f1", 300.0),
                ("finetune", "f2", 250.0), ("finetune", "f3", 240.0)])]  # f10's run is not in the store
    points = ft_study.points(shown, keys, runs)
    assert [p.name.split("-", 1)[1] for p in points] == [f"20261203T090000-{n}" for n in (1, 2, 3, 10)]
    assert points[0].values == {"features.augment_copies": 0, "finetune.unfreeze": 3,
                                "finetune.learning_rate": 2e-6, "finetune.keep_by": "val_loss"}
    # the newest extraction with the point's params, its head, its fine-tuning
    assert [p.seconds for p in points] == [500 + 100 + 300, 500 + 100 + 250, 450 + 100 + 240, None]
    best = ft_study.best_by_validation(points)
    assert best.name.endswith("-3")  # 486 of 500 right as -2, and cheaper: test accuracy plays no part
    table = ft_study.markdown_table(points).splitlines()
    assert table[0] == ("| augment_copies | unfreeze | learning_rate | keep_by | validation accuracy (500) | "
                        "test accuracy | head's test accuracy | kept epoch / epochs | seconds | best by validation |")
    validation, test = wilson_interval(485, 500), wilson_interval(489, 502)  # as the stage computes them
    assert points[0].validation_ci95 == pytest.approx(validation) and points[0].test_ci95 == pytest.approx(test)
    assert table[2] == (f"| 0 | 3 | 2e-06 | val_loss | 0.970 [{validation[0]:.3f}, {validation[1]:.3f}] | "
                        f"0.974 [{test[0]:.3f}, {test[1]:.3f}] | 0.970 | 0 / 3 | 900 |  |")
    assert table[4].endswith("| 790 | **best** |") and table[5].endswith("| ? |  |")
    assert table[-1].startswith("4 points. Best by validation: augment_copies=0, unfreeze=2, learning_rate=1e-05")
    assert "a tie goes to the cheaper point" in table[-1]

    # Within a budget of 800 s only -3 (790 s) counts: -1 (900 s), -2 (850 s) and -10 (seconds
    # unknown) are marked over it. Within 700 s none counts, and the table says so.
    within = ft_study.markdown_table(points, budget=800).splitlines()
    assert within[4].endswith("| 790 | **best** |") and within[2].endswith("| 900 | over budget |")
    assert within[3].endswith("| 850 | over budget |") and within[5].endswith("| ? | over budget |")
    assert within[-1].endswith("only points within the budget of 800 s count.")
    assert ft_study.markdown_table(points, budget=700).splitlines()[-1] == "4 points. No point is within the budget of 700 s."


def test_the_table_of_no_finished_point_is_one_line(ft_study):
    with pytest.raises(UserError, match=r"^no finished ftgrid-\* experiment: "):
        ft_study.markdown_table(ft_study.points([], ["finetune.unfreeze"], []))
