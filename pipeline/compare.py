"""`pipeline compare`: MLflow runs side by side, as a table, Markdown, CSV or JSON.

The runs come from `mlflow.search_runs` (a pandas DataFrame), filtered in the store by
experiment, stage (tag `pipeline.stage`), DVC experiment (tag `dvc.exp_name`) and any other
tags. The table shows who each run is, the chosen metrics and the params: by default the
params whose values differ between the rows, which are the ones that explain the metrics.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from pipeline.errors import UserError
from pipeline.tracking import tracking_uri

DEFAULT_METRICS = ("test_accuracy", "test_loss", "seconds_per_epoch")
Format = Literal["table", "markdown", "csv", "json"]
# Columns that say which run a row is, before the metrics and params.
ID_COLUMNS = ("run_id", "stage", "dvc_exp", "status", "started", "seconds")
SHORT_ID = 8  # a run id prefix long enough to find the run in the MLflow UI
# A metric's 95% interval, where a run logs one (evaluate: `fine_tuning.test_accuracy_ci95_low`).
INTERVAL_ENDS = ("_ci95_low", "_ci95_high")


@dataclass(frozen=True)
class RunFilter:
    """Which runs of an experiment to show; None / empty = no condition."""

    stage: str | None = None
    dvc_exp: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    def all_tags(self) -> dict[str, str]:
        """Every tag condition, the named ones included."""
        tags = dict(self.tags)
        if self.stage:
            tags["pipeline.stage"] = self.stage
        if self.dvc_exp:
            tags["dvc.exp_name"] = self.dvc_exp
        return tags

    def describe(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.all_tags().items()) or "no filter"


def parse_tags(pairs: Sequence[str]) -> dict[str, str]:
    """["KEY=VALUE", ...] -> {KEY: VALUE}; a pair without '=' or with an empty key is a UserError."""
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--tag {pair!r}: expected KEY=VALUE, e.g. --tag dvc.exp_name=my-exp")
        tags[key.strip()] = value
    return tags


def filter_string(tags: Mapping[str, str]) -> str:
    """MLflow's search filter for runs carrying all `tags` (keys quoted: they contain dots)."""
    clauses = []
    for key, value in tags.items():
        if "'" in value or "`" in key:
            raise UserError(f"tag {key}={value}: quotes are not supported in tag filters")
        clauses.append(f"tags.`{key}` = '{value}'")
    return " and ".join(clauses)


def tracking_store() -> str:
    """The tracking URI the stages use; a missing embedded store is a UserError, not a new file."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise UserError(
            f"no MLflow store at {uri.removeprefix('sqlite:///')}: run a stage first, "
            "run from the project root, or set MLFLOW_TRACKING_URI"
        )
    return uri


def find_runs(experiment: str, run_filter: RunFilter) -> pd.DataFrame:
    """The matching runs of `experiment`, newest first, as `mlflow.search_runs` returns them.

    An unknown experiment or no matching run is a UserError saying what was searched.
    """
    import mlflow

    uri = tracking_store()
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in mlflow.search_experiments())
        known = ", ".join(names) if names else "none"
        raise UserError(f"no MLflow experiment named {experiment!r} in {uri} (experiments: {known})")
    runs = mlflow.search_runs(
        experiment_ids=[found.experiment_id],
        filter_string=filter_string(run_filter.all_tags()),
        order_by=["attributes.start_time DESC"],
    )
    if runs.empty:
        raise UserError(f"no runs in experiment {experiment!r} match {run_filter.describe()}")
    return runs.reset_index(drop=True)


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs[name] if name in runs.columns else pd.Series([None] * len(runs), index=runs.index)


def _numeric_if_possible(values: pd.Series) -> pd.Series:
    """Params are stored as strings; "0.5" and "64" compare and sort as numbers."""
    converted = pd.to_numeric(values, errors="coerce")
    return converted if converted.notna().sum() == values.notna().sum() else values


def names_with_prefix(runs: pd.DataFrame, prefix: str) -> list[str]:
    """The metric or param names (`prefix` "metrics." or "params.") some run has a value for."""
    return sorted(
        column.removeprefix(prefix)
        for column in runs.columns
        if column.startswith(prefix) and runs[column].notna().any()
    )


def differing_params(runs: pd.DataFrame) -> list[str]:
    """Params with at least two different values among the runs (missing ones don't count).

    A param only some runs have (another stage's) is not a difference between them.
    """
    differing = []
    for name in names_with_prefix(runs, "params."):
        values = runs[f"params.{name}"].dropna()
        if values.nunique() > 1:
            differing.append(name)
    return differing


def identity_columns(runs: pd.DataFrame) -> pd.DataFrame:
    """run_id, stage, dvc_exp, status, started (UTC, to the second), seconds (wall time)."""
    start = pd.to_datetime(_column(runs, "start_time"), utc=True)
    end = pd.to_datetime(_column(runs, "end_time"), utc=True)
    return pd.DataFrame(
        {
            "run_id": _column(runs, "run_id"),
            "stage": _column(runs, "tags.pipeline.stage"),
            "dvc_exp": _column(runs, "tags.dvc.exp_name"),
            "status": _column(runs, "status"),
            "started": start.dt.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": (end - start).dt.total_seconds().round(1),
        }
    )


def interval_column(runs: pd.DataFrame, metric: str) -> pd.Series | None:
    """Each run's 95% interval of `metric` as "low - high" (missing where the run logs none),
    or None when no run logs one."""
    low, high = (_column(runs, f"metrics.{metric}{end}") for end in INTERVAL_ENDS)
    if not (low.notna() & high.notna()).any():
        return None
    shown = low.map("{:.4f}".format) + " - " + high.map("{:.4f}".format)
    return shown.where(low.notna() & high.notna())


def _check_known(requested: Sequence[str], known: Sequence[str], kind: str) -> None:
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise UserError(f"--{kind} {unknown[0]}: no matching run has it (available: {', '.join(known) or 'none'})")


def runs_table(
    runs: pd.DataFrame,
    metrics: Sequence[str] = (),
    params: Sequence[str] = (),
    sort: str | None = None,
    ascending: bool = False,
) -> pd.DataFrame:
    """The comparison table: identity columns, then metrics (each beside its 95% interval
    where a run logs one), then params, one row per run.

    In: `search_runs` output; metric and param names (empty = the defaults: DEFAULT_METRICS
    that some run has, and the params that differ between the runs); the column to sort by
    (None = newest first). A requested name no run has is a UserError listing what exists.
    """
    known_metrics, known_params = names_with_prefix(runs, "metrics."), names_with_prefix(runs, "params.")
    _check_known(metrics, known_metrics, "metric")
    _check_known(params, known_params, "param")
    metrics = list(metrics) or [name for name in DEFAULT_METRICS if name in known_metrics]
    params = list(params) or differing_params(runs)
    table = identity_columns(runs)
    for name in metrics:
        table[name] = runs[f"metrics.{name}"]
        interval = interval_column(runs, name)
        if interval is not None:
            table[f"{name} 95% interval"] = interval
    for name in params:
        table[name] = _numeric_if_possible(runs[f"params.{name}"])
    table = table.dropna(axis="columns", how="all").reset_index(drop=True)
    if sort is not None:
        if sort not in table.columns:
            raise UserError(f"--sort {sort}: not a column of the table (columns: {', '.join(table.columns)})")
        table = table.sort_values(sort, ascending=ascending, na_position="last", kind="stable")
    return table.reset_index(drop=True)


def render(table: pd.DataFrame, fmt: Format) -> str:
    """The table as text: aligned `table`, GitHub `markdown`, `csv`, or `json` records.

    Human formats show the first SHORT_ID characters of the run id; csv and json keep it whole.
    """
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        # Not DataFrame.to_json: it rounds floats to 10 digits, and a metric read back must
        # equal the one MLflow holds.
        records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
        return json.dumps(records, indent=2, default=str) + "\n"
    shown = table.assign(run_id=table["run_id"].str[:SHORT_ID]) if "run_id" in table else table
    shown = shown.astype(object).where(shown.notna(), "")
    if fmt == "markdown":
        return shown.to_markdown(index=False) + "\n"
    if fmt == "table":
        return shown.to_string(index=False) + "\n"
    raise ValueError(f"unknown format {fmt!r}")


def compare(
    experiment: str,
    run_filter: RunFilter,
    metrics: Sequence[str] = (),
    params: Sequence[str] = (),
    sort: str | None = None,
    ascending: bool = False,
    fmt: Format = "table",
) -> str:
    """The whole command: find the runs, build the table, render it."""
    table = runs_table(find_runs(experiment, run_filter), metrics, params, sort, ascending)
    return render(table, fmt)


def default_experiment(params_file: Path) -> str:
    """`mlflow.experiment` from the params file, for when --experiment is not given."""
    from pipeline.params import load_params

    if not params_file.exists():
        raise UserError(f"{params_file}: not found; pass --experiment or run from the project root")
    return load_params(params_file).mlflow.experiment


# ---------------------------------------------------------------------------- paired


def resolve_run(experiment: str, run_id: str) -> pd.Series:
    """The evaluate run of `experiment` whose id is or starts with `run_id` (as the table shows it)."""
    runs = find_runs(experiment, RunFilter(stage="evaluate"))
    matches = runs[runs["run_id"].str.startswith(run_id)]
    if len(matches) != 1:
        found = "no evaluate run" if matches.empty else f"{len(matches)} evaluate runs"
        raise UserError(
            f"--paired {run_id}: {found} of experiment {experiment!r} has that id; "
            "pass an evaluate run's id (pipeline compare --stage evaluate lists them)"
        )
    return matches.iloc[0]


def test_data_hashes(run: pd.Series) -> dict[str, str]:
    """{test set: sha256} from an evaluate run's `test_data.<set>.sha256` tags."""
    prefix, suffix = "tags.test_data.", ".sha256"
    return {
        column.removeprefix(prefix).removesuffix(suffix): value
        for column, value in run.items()
        if isinstance(column, str) and column.startswith(prefix) and column.endswith(suffix) and isinstance(value, str)
    }


def correct_table(run_id: str, test_set: str) -> pd.DataFrame | None:
    """The run's plots/correct_<set>.csv: a `sample` column and a 0/1 column per model (None
    when the run has no such artifact)."""
    import os
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file
    with tempfile.TemporaryDirectory() as scratch:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"plots/correct_{test_set}.csv", dst_path=scratch
            )
        except MlflowException:  # e.g. a run that failed before writing its plots
            return None
        return pd.read_csv(path)


def paired_lines(a: pd.Series, b: pd.Series) -> list[str]:
    """Per test set both runs scored with the same data hash, per model both scored: the
    discordant counts and the exact McNemar p-value; a line per test set they did not share."""
    from pipeline.evaluation import paired_test

    names = {"a": str(a["run_id"])[:SHORT_ID], "b": str(b["run_id"])[:SHORT_ID]}
    hashes_a, hashes_b = test_data_hashes(a), test_data_hashes(b)
    for run, hashes in ((a, hashes_a), (b, hashes_b)):
        if not hashes:
            raise UserError(
                f"run {str(run['run_id'])[:SHORT_ID]} logs no test-data hash (an evaluate run from before "
                "they were logged): run evaluate again to pair it"
            )
    lines: list[str] = []
    unpaired: list[str] = []
    for test_set in sorted(hashes_a.keys() | hashes_b.keys()):
        ha, hb = hashes_a.get(test_set, ""), hashes_b.get(test_set, "")
        if ha != hb:
            unpaired.append(f"{test_set}: {(ha or 'not scored')[:12]} vs {(hb or 'not scored')[:12]}")
            continue
        first, second = correct_table(str(a["run_id"]), test_set), correct_table(str(b["run_id"]), test_set)
        if first is None or second is None:
            unpaired.append(f"{test_set}: no correct_{test_set}.csv in {'both runs' if first is second else 'one run'}")
            continue
        if len(first) != len(second):
            unpaired.append(f"{test_set}: {len(first)} vs {len(second)} samples")
            continue
        models = [column for column in first.columns if column != "sample" and column in second.columns]
        for model in models:
            test = paired_test("a", first[model].to_numpy(), "b", second[model].to_numpy())
            lines.append(
                f"{model} on the {test_set} test data (sha256 {ha[:12]}, {len(first)} samples): "
                f"{names['a']} {int(first[model].sum())} right, {names['b']} {int(second[model].sum())} right; "
                f"only {names['a']} right {test['only_a_right']}, only {names['b']} right {test['only_b_right']}; "
                f"exact McNemar p = {test['p_value']:.4g}"
            )
    if not lines:
        raise UserError(
            f"runs {names['a']} and {names['b']} did not score the same test data, so no paired test: "
            + "; ".join(unpaired)
        )
    lines += [f"not paired: {entry}" for entry in unpaired]
    return lines


def compare_paired(experiment: str, run_a: str, run_b: str) -> str:
    """`pipeline compare --paired RUN_A RUN_B`: the paired test of two evaluate runs."""
    a, b = resolve_run(experiment, run_a), resolve_run(experiment, run_b)
    return "\n".join(paired_lines(a, b)) + "\n"
