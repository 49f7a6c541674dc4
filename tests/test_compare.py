"""`pipeline compare`: MLflow runs filtered by stage, DVC experiment and tags, as tables."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from pipeline.compare import RunFilter, compare, parse_tags, runs_table
from pipeline.errors import UserError

DROPOUTS = (0.1, 0.3, 0.5)
ACCURACIES = (0.91, 0.9700000286102295, 0.94)  # a float32 accuracy: 17 digits to round-trip


def log_run(stage: str, params: dict, metrics: dict, tags: dict | None = None) -> str:
    import mlflow

    with mlflow.start_run(tags={"pipeline.stage": stage, **(tags or {})}) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A temp sqlite store: three train_baseline runs that differ only in dropout (one per DVC
    experiment), a train_head run, and an empty experiment."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.create_experiment("empty", artifact_location=(root / "empty").as_uri())
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("tiny", (root / "art").as_uri()))
        for i, (dropout, accuracy) in enumerate(zip(DROPOUTS, ACCURACIES)):
            params = {"baseline.dropout": dropout, "baseline.epochs": 5, "seed": 42}
            metrics = {"test_accuracy": accuracy, "test_loss": 1 - accuracy, "seconds_per_epoch": 2.0}
            log_run("train_baseline", params, metrics, {"dvc.exp_name": f"exp-{i}", "owner": "ana" if i else "bo"})
        log_run("train_head", {"head.units": 256, "seed": 42}, {"test_accuracy": 0.8})
    yield uri


@pytest.fixture
def tracking(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)


def as_frame(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), float_precision="round_trip")


def test_three_runs_that_differ_in_dropout_give_three_rows_with_dropout_and_accuracy(tracking):
    table = as_frame(compare("tiny", RunFilter(stage="train_baseline"), fmt="csv"))
    assert len(table) == 3
    # Only the param that differs is shown by default; the shared ones (epochs, seed) are not.
    assert "baseline.dropout" in table.columns
    assert "baseline.epochs" not in table.columns and "seed" not in table.columns
    rows = dict(zip(table["baseline.dropout"], table["test_accuracy"]))
    assert rows == dict(zip(DROPOUTS, ACCURACIES))
    assert {"run_id", "stage", "dvc_exp", "test_loss", "seconds_per_epoch"} <= set(table.columns)


def test_filter_by_stage(tracking):
    table = as_frame(compare("tiny", RunFilter(stage="train_head"), fmt="csv"))
    assert list(table["stage"]) == ["train_head"] and table["test_accuracy"].tolist() == [0.8]


def test_filter_by_dvc_experiment_and_by_tag(tracking):
    table = as_frame(compare("tiny", RunFilter(dvc_exp="exp-1"), params=["baseline.dropout"], fmt="csv"))
    assert table["dvc_exp"].tolist() == ["exp-1"] and table["baseline.dropout"].tolist() == [0.3]
    table = as_frame(compare("tiny", RunFilter(tags=parse_tags(["owner=ana"])), fmt="csv"))
    assert sorted(table["dvc_exp"]) == ["exp-1", "exp-2"]


def test_all_stages_together_differ_only_where_both_have_the_param(tracking):
    table = as_frame(compare("tiny", RunFilter(), fmt="csv"))
    assert len(table) == 4
    # head.units exists in one run only: not a difference. seed is the same everywhere.
    assert "head.units" not in table.columns and "seed" not in table.columns


def test_chosen_columns_and_sort(tracking):
    text = compare("tiny", RunFilter(stage="train_baseline"), metrics=["test_loss"],
                   params=["baseline.epochs"], sort="test_loss", ascending=True, fmt="csv")
    table = as_frame(text)
    assert "test_accuracy" not in table.columns and "baseline.dropout" not in table.columns
    assert table["test_loss"].tolist() == sorted(table["test_loss"])
    assert set(table["baseline.epochs"]) == {5}
    best_first = as_frame(compare("tiny", RunFilter(stage="train_baseline"), sort="test_accuracy", fmt="csv"))
    assert best_first["test_accuracy"].tolist() == sorted(ACCURACIES, reverse=True)


def test_an_accuracy_is_shown_beside_its_interval_where_the_run_logged_one():
    runs = pd.DataFrame({
        "run_id": ["evaluate-new", "evaluate-old"],
        "tags.pipeline.stage": ["evaluate", "evaluate"],
        "metrics.fine_tuning.test_accuracy": [0.9, 0.8],
        "metrics.fine_tuning.test_accuracy_ci95_low": [0.85, None],  # the old run predates intervals
        "metrics.fine_tuning.test_accuracy_ci95_high": [0.93251, None],
        "metrics.fine_tuning.test_loss": [0.3, 0.4],
    })
    table = runs_table(runs, metrics=["fine_tuning.test_accuracy", "fine_tuning.test_loss"])
    columns = list(table.columns)
    assert columns[columns.index("fine_tuning.test_accuracy") + 1] == "fine_tuning.test_accuracy 95% interval"
    assert table["fine_tuning.test_accuracy 95% interval"].tolist()[0] == "0.8500 - 0.9325"
    assert pd.isna(table["fine_tuning.test_accuracy 95% interval"].tolist()[1])
    assert "fine_tuning.test_loss 95% interval" not in columns  # no run logs one


def test_formats(tracking):
    run_filter = RunFilter(stage="train_baseline")
    markdown = compare("tiny", run_filter, fmt="markdown")
    assert markdown.splitlines()[0].startswith("| run_id") and "baseline.dropout" in markdown.splitlines()[0]
    assert len(markdown.splitlines()) == 2 + 3
    records = json.loads(compare("tiny", run_filter, fmt="json"))
    assert len(records) == 3 and len(records[0]["run_id"]) == 32  # machine formats keep whole ids
    assert sorted(record["test_accuracy"] for record in records) == sorted(ACCURACIES), "every digit"
    table = compare("tiny", run_filter, fmt="table")
    assert "baseline.dropout" in table.splitlines()[0] and len(table.splitlines()) == 4


@pytest.mark.parametrize(
    ("experiment", "run_filter", "message"),
    [
        ("nope", RunFilter(), "no MLflow experiment named 'nope'.*experiments: .*tiny"),
        ("empty", RunFilter(), "no runs in experiment 'empty' match no filter"),
        ("tiny", RunFilter(stage="train_baseline", dvc_exp="exp-9"), "match pipeline.stage=train_baseline, dvc.exp_name=exp-9"),
    ],
)
def test_unknown_experiment_or_no_runs_is_one_clear_line(tracking, experiment, run_filter, message):
    with pytest.raises(UserError, match=message) as error:
        compare(experiment, run_filter)
    assert "\n" not in str(error.value)


def test_unknown_columns_and_bad_tags_are_user_errors(tracking):
    with pytest.raises(UserError, match="--metric f1: no matching run has it .*test_accuracy"):
        compare("tiny", RunFilter(), metrics=["f1"])
    with pytest.raises(UserError, match="--sort nope: not a column"):
        compare("tiny", RunFilter(), sort="nope")
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_tags(["owner"])


def test_a_missing_embedded_store_is_not_created(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no MLflow store at"):
        compare("tiny", RunFilter())
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_options(tracking, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.chdir(tmp_path)
    args = ["compare", "-e", "tiny", "--stage", "train_baseline", "--tag", "owner=ana",
            "--metric", "test_accuracy", "--param", "baseline.dropout", "--sort", "baseline.dropout",
            "--ascending", "--format", "csv"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = as_frame(result.output)
    assert table["baseline.dropout"].tolist() == [0.3, 0.5]
    assert table["test_accuracy"].tolist() == [ACCURACIES[1], 0.94]
    help_text = CliRunner().invoke(app, ["compare", "--help"]).output
    for option in ("--experiment", "--stage", "--tag", "--dvc-exp", "--metric", "--param", "--sort", "--format"):
        assert option in help_text


@pytest.mark.parametrize("inside", ["", ".dvc/tmp/exps/run1/project"])
def test_store_location_matches_the_stages(tmp_path, monkeypatch, inside):
    from pipeline.tracking import tracking_uri  # compare and the stages both use this one

    folder = tmp_path / inside
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    assert tracking_uri() == "sqlite:////elsewhere/mlflow.db"


def log_evaluate_run(hashes: dict[str, str], correct: dict[str, list[int]], folder) -> str:
    """An evaluate run as the stage logs it: test_data.<set>.sha256 tags, plots/correct_mnist.csv."""
    import mlflow

    tags = {f"test_data.{name}.sha256": digest for name, digest in hashes.items()}
    path = folder / "correct_mnist.csv"
    pd.DataFrame({"sample": range(len(correct["baseline"])), **correct}).to_csv(path, index=False)
    with mlflow.start_run(tags={"pipeline.stage": "evaluate", **tags}) as run:
        mlflow.log_artifact(str(path), artifact_path="plots")
    return run.info.run_id


@pytest.fixture(scope="module")
def paired_runs(tmp_path_factory):
    """Two evaluate runs on the same digits (one of them twice as good), one on other digits."""
    import mlflow

    root = tmp_path_factory.mktemp("paired")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    same, other = {"mnist": "a" * 64, "images": "b" * 64}, {"mnist": "c" * 64, "images": "d" * 64}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("paired", (root / "art").as_uri()))
        # 12 digits: A right on 0-5, B right on 0-3 and 6-11 -> only A right 2, only B right 6
        first = log_evaluate_run(same, {"baseline": [1] * 6 + [0] * 6, "dense": [1] * 12}, root)
        second = log_evaluate_run(same, {"baseline": [1] * 4 + [0] * 2 + [1] * 6, "dense": [1] * 12}, root)
        third = log_evaluate_run(other, {"baseline": [1] * 12, "dense": [1] * 12}, root)
    yield uri, first, second, third


def test_paired_runs_on_the_same_test_data_give_the_discordant_counts_and_mcnemars_p(paired_runs, monkeypatch):
    from pipeline.compare import compare_paired
    from pipeline.evaluation import mcnemar_exact

    uri, first, second, _ = paired_runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    lines = compare_paired("paired", first[:8], second).splitlines()
    a, b = first[:8], second[:8]
    assert lines == [
        f"baseline on the mnist test data (sha256 aaaaaaaaaaaa, 12 samples): {a} 6 right, {b} 10 right; "
        f"only {a} right 2, only {b} right 6; exact McNemar p = {mcnemar_exact(2, 6):.4g}",
        f"dense on the mnist test data (sha256 aaaaaaaaaaaa, 12 samples): {a} 12 right, {b} 12 right; "
        f"only {a} right 0, only {b} right 0; exact McNemar p = 1",
        "not paired: images: no correct_images.csv in both runs",
    ]
    assert mcnemar_exact(2, 6) == pytest.approx(0.2890625)


def test_paired_runs_on_different_test_data_say_so(paired_runs, monkeypatch):
    from pipeline.compare import compare_paired

    uri, first, _, third = paired_runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(UserError, match=(
            rf"^runs {first[:8]} and {third[:8]} did not score the same test data, so no paired test: "
            r"images: bbbbbbbbbbbb vs dddddddddddd; mnist: aaaaaaaaaaaa vs cccccccccccc$")):
        compare_paired("paired", first, third)
    with pytest.raises(UserError, match="no evaluate run of experiment 'paired' has that id"):
        compare_paired("paired", "ffff", third)


def test_paired_on_the_command_line(paired_runs, tmp_path):
    from conftest import run_command

    uri, first, second, third = paired_runs
    result = run_command(["pipeline", "compare", "-e", "paired", "--paired", first, second], cwd=tmp_path,
                         tracking_uri=uri)
    assert result.stdout.startswith("baseline on the mnist test data") and "exact McNemar p" in result.stdout
    result = run_command(["pipeline", "compare", "-e", "paired", "--paired", first, third], cwd=tmp_path,
                         tracking_uri=uri, check=False)
    assert result.returncode == 2 and "did not score the same test data" in result.stderr
