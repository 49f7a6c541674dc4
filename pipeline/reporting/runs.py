"""The report's views of the MLflow store: each stage's wall time, and this run vs the best.

Pure: a `mlflow.search_runs` DataFrame (all runs of the experiment) in, small tables out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from pipeline.compare import SHORT_ID, identity_columns, names_with_prefix

STAGE_TAG = "tags.pipeline.stage"


def _stage_runs(runs: pd.DataFrame, stage: str) -> pd.DataFrame:
    if runs.empty or STAGE_TAG not in runs.columns:
        return runs.iloc[0:0]
    return runs[runs[STAGE_TAG] == stage]


def current_run(runs: pd.DataFrame, stage: str, run_id: str | None) -> pd.Series | None:
    """The run `run_id` when the store has it, else the stage's newest finished run, else None."""
    stage_runs = _stage_runs(runs, stage)
    if run_id is not None:
        match = stage_runs[stage_runs["run_id"] == run_id]
        if not match.empty:
            return match.iloc[0]
    finished = stage_runs[stage_runs["status"] == "FINISHED"]
    if finished.empty:
        return None
    return finished.sort_values("start_time", ascending=False).iloc[0]


def timings_table(runs: pd.DataFrame, stages: Sequence[str], run_ids: Mapping[str, str]) -> pd.DataFrame:
    """One row per stage that has a run: stage, run (short id), status, started (UTC), seconds
    (the MLflow run's wall time), process seconds (from the stage's process start to the
    run's end, TensorFlow's and MLflow's imports included), whether the process was forked
    from `pipeline warm` (its imports then paid once, before: not in its process seconds) and
    the process's peak resident memory in MiB (empty for runs that lack them).

    `run_ids` names the run of a stage whose outputs the report shows (from its metrics file).
    """
    rows = [row for stage in stages if (row := current_run(runs, stage, run_ids.get(stage))) is not None]
    if not rows:
        return pd.DataFrame(
            columns=["stage", "run", "status", "started", "seconds", "process seconds", "warm", "peak RSS MiB"]
        )
    frame = pd.DataFrame(rows)
    identity = identity_columns(frame)
    missing = pd.Series(float("nan"), index=frame.index)
    process = frame.get("metrics.process_seconds", missing)
    memory = frame.get("metrics.peak_rss_mib", missing)
    warm = frame.get("tags.pipeline.warm", missing).map({"true": "yes", "false": "no"}).fillna("")
    return pd.DataFrame(
        {
            "stage": identity["stage"].to_numpy(),
            "run": identity["run_id"].str[:SHORT_ID].to_numpy(),
            "status": identity["status"].to_numpy(),
            "started": identity["started"].to_numpy(),
            "seconds": identity["seconds"].to_numpy(),
            "process seconds": pd.to_numeric(process, errors="coerce").round(1).to_numpy(),
            "warm": warm.to_numpy(),
            "peak RSS MiB": pd.to_numeric(memory, errors="coerce").round(0).to_numpy(),
        }
    )


def param_differences(this: pd.Series, other: pd.Series) -> list[str]:
    """ "name: this value -> other value" for each param the two runs set differently."""
    names = sorted({name for name in names_with_prefix(pd.DataFrame([this, other]), "params.")})
    differences = []
    for name in names:
        mine, theirs = this.get(f"params.{name}"), other.get(f"params.{name}")
        mine = None if pd.isna(mine) else mine
        theirs = None if pd.isna(theirs) else theirs
        if mine != theirs:
            differences.append(f"{name}: {mine} -> {theirs}")
    return differences


def best_runs_table(
    runs: pd.DataFrame, stages: Sequence[str], run_ids: Mapping[str, str], metric: str = "test_accuracy"
) -> pd.DataFrame:
    """Per stage: this run's `metric`, the best finished run's, and the params that differ.

    Stages with no finished run carrying `metric` are left out.
    """
    column = f"metrics.{metric}"
    rows = []
    for stage in stages:
        stage_runs = _stage_runs(runs, stage)
        if column not in stage_runs.columns:
            continue
        scored = stage_runs[(stage_runs["status"] == "FINISHED") & stage_runs[column].notna()]
        this = current_run(runs, stage, run_ids.get(stage))
        if scored.empty or this is None:
            continue
        best = scored.sort_values([column, "start_time"], ascending=[False, True]).iloc[0]
        same = best["run_id"] == this["run_id"]
        differences = param_differences(this, best)
        best_exp = best.get("tags.dvc.exp_name")
        rows.append(
            {
                "stage": stage,
                "runs": len(scored),
                "this run": this["run_id"][:SHORT_ID],
                f"this {metric}": round(float(this.get(column)), 4) if pd.notna(this.get(column)) else None,
                "best run": "this run" if same else best["run_id"][:SHORT_ID],
                f"best {metric}": round(float(best[column]), 4),
                "best run's DVC experiment": "" if pd.isna(best_exp) else best_exp,
                "params that differ (this -> best)": "" if same else ("; ".join(differences) or "none"),
            }
        )
    return pd.DataFrame(rows)
