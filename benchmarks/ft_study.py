"""The fine-tuning grid of issue 15: queue it through DVC, then read it back as a table.

`queue` checks the grid as a study (pipeline/studies.py: every key a param, every value
valid) and puts one `dvc exp run --queue finetune -n ftgrid-<UTC time>-<n> -S KEY=VALUE ...`
per point into DVC's queue (run it with `dvc queue start -j 1`). No `--force`: points that
share `features.augment_copies` and `finetune.unfreeze` share one extraction and one head,
which DVC takes from its run-cache instead of computing them again.

`table` reads the finished `ftgrid-*` experiments from `dvc exp show --json` (their params
and metrics/head.json, metrics/finetune.json, so a point that DVC restored from its cache
still has its scores) and the wall time of the MLflow runs that computed each stage, and
prints a Markdown table: validation and test accuracy of the fine-tuned model with 95%
Wilson intervals, the kept epoch (0: the head's weights were kept) and the seconds of
extract_features + train_head + finetune, beside the test accuracy of the head it started
from. The best point is picked BY VALIDATION only, among the points within `--budget`
seconds: the most validation photos right; a tie goes to the cheaper point (fewer
seconds), then to the earlier one in the grid.

Run: `.venv/bin/python benchmarks/ft_study.py queue [--dry-run]`, then
`.venv/bin/python benchmarks/ft_study.py table`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.studies import Study, check_study

PREFIX = "ftgrid"
STAGES = ("extract_features", "train_head", "finetune")


def grid(args: argparse.Namespace) -> Study:
    params: dict[str, list] = {
        "features.augment_copies": args.augment_copies,
        "finetune.unfreeze": args.unfreeze,
        "finetune.learning_rate": args.learning_rate,
        "finetune.keep_by": args.keep_by,
    }
    return Study(PREFIX, "fine-tuning beats feature extraction (issue 15)", params)


def queue_commands(study: Study, stamp: str) -> list[list[str]]:
    """One `dvc exp run --queue finetune` per point of the grid, named ftgrid-<stamp>-<n>."""
    commands = []
    for index, point in enumerate(study.combinations(), start=1):
        command = ["dvc", "exp", "run", "--queue", "finetune", "-n", f"{PREFIX}-{stamp}-{index}"]
        for key, value in point.items():
            command += ["-S", f"{key}={json.dumps(value)}"]  # JSON is YAML: DVC keeps the type
        commands.append(command)
    return commands


# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Point:
    """One finished experiment of the grid: its swept values and what it scored."""

    name: str
    values: dict[str, Any]
    validation_accuracy: float
    validation_ci95: tuple[float, float]
    validation_samples: int
    test_accuracy: float
    test_ci95: tuple[float, float]
    kept_epoch: int | None
    epochs: int
    head_test_accuracy: float | None  # the head it started from (feature extraction)
    seconds: float | None  # extract_features + train_head + finetune; None if a run is missing

    @property
    def validation_correct(self) -> int:
        return round(self.validation_accuracy * self.validation_samples)


def experiments(shown: Any) -> list[tuple[str, dict]]:
    """(name, data) of every experiment in `dvc exp show --json`'s output, however nested."""
    found: list[tuple[str, dict]] = []

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            data = node.get("data")
            if isinstance(node.get("name"), str) and isinstance(data, dict) and "params" in data:
                found.append((node["name"], data))
            for key in ("experiments", "revs"):
                walk(node.get(key))

    walk(shown)
    return found


def _file_data(data: dict, kind: str, file: str) -> dict:
    return ((data.get(kind) or {}).get(file) or {}).get("data") or {}


def _leaf(params: dict, key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


@dataclass(frozen=True)
class StageRun:
    """A finished MLflow run of one of the three stages: its params as logged, its wall time."""

    stage: str
    run_id: str
    params: dict[str, str]
    seconds: float


def points(shown: Any, keys: list[str], runs: list[StageRun], prefix: str = PREFIX) -> list[Point]:
    """The finished grid points in `dvc exp show --json`'s output (`shown`), one per
    experiment named `<prefix>-...` that wrote metrics/finetune.json (the newest of a point
    queued twice), in the order they were queued (`in_grid_order` sorts them by the grid).
    A point's seconds are those of the MLflow runs (`runs`, oldest first) that made its
    features (the newest extract_features run with its params), head and fine-tuned model
    (the run ids in their metrics files); None when one of them is not in `runs`."""
    from pipeline.tracking import flatten

    by_id = {run.run_id: run for run in runs}
    found = []
    for name, data in experiments(shown):
        finetune = _file_data(data, "metrics", "metrics/finetune.json")
        if not name.startswith(prefix + "-") or "validation_accuracy" not in finetune:
            continue
        params = _file_data(data, "params", "params.yaml")
        made_features = flatten(
            {
                "seed": params.get("seed"),
                "features": params.get("features"),
                "finetune.unfreeze": _leaf(params, "finetune.unfreeze"),
            }
        )
        extraction = [
            run
            for run in runs
            if run.stage == "extract_features" and all(run.params.get(k) == v for k, v in made_features.items())
        ]
        head_metrics = _file_data(data, "metrics", "metrics/head.json")
        head = by_id.get(head_metrics.get("mlflow_run_id", ""))
        tuned = by_id.get(finetune.get("mlflow_run_id", ""))
        made = [extraction[-1] if extraction else None, head, tuned]
        found.append(
            Point(
                name=name,
                values={key: _leaf(params, key) for key in keys},
                validation_accuracy=float(finetune["validation_accuracy"]),
                validation_ci95=_wilson(finetune, "validation"),
                validation_samples=int(finetune["validation_samples"]),
                test_accuracy=float(finetune["test_accuracy"]),
                test_ci95=_wilson(finetune, "test"),
                kept_epoch=finetune.get("kept_epoch"),
                epochs=int(finetune.get("epochs", 0)),
                head_test_accuracy=head_metrics.get("test_accuracy"),
                seconds=None if None in made else round(sum(run.seconds for run in made if run), 1),
            )
        )
    newest = {}  # a point queued again: its newest experiment
    for point in sorted(found, key=lambda point: _index(point.name)):
        newest[json.dumps(point.values, sort_keys=True)] = point
    return sorted(newest.values(), key=lambda point: _index(point.name))


def in_grid_order(found: list[Point], grid_values: dict[str, list]) -> list[Point]:
    """The points in the grid's order (its first key slowest), whatever order their slices were
    queued in; a value outside the grid sorts last."""

    def position(point: Point) -> tuple[int, ...]:
        return tuple(
            values.index(point.values[key]) if point.values[key] in values else len(values)
            for key, values in grid_values.items()
        )

    return sorted(found, key=position)


def _wilson(metrics: dict, split: str) -> tuple[float, float]:
    """The 95% Wilson interval of `<split>_accuracy`, as the stage computed it (`dvc exp show`
    leaves the metrics files' lists out, so the interval is computed again from the counts)."""
    from pipeline.evaluation import wilson_interval

    samples = int(metrics[f"{split}_samples"])
    return tuple(wilson_interval(round(float(metrics[f"{split}_accuracy"]) * samples), samples))


def _index(name: str) -> tuple[str, int]:
    stamp, _, index = name.rpartition("-")
    return (stamp, int(index)) if index.isdigit() else (name, 0)


def within(point: Point, budget: float | None) -> bool:
    """Whether the point's seconds are known and within `budget` (None: no budget)."""
    return budget is None or (point.seconds is not None and point.seconds <= budget)


def best_by_validation(found: list[Point], budget: float | None = None) -> Point | None:
    """Among the points within the budget: the most validation photos right; a tie to the
    cheaper point, then the earlier one. None when no point is within the budget."""
    candidates = [point for point in found if within(point, budget)]
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda p: (-p.validation_correct, p.seconds if p.seconds is not None else float("inf"), _index(p.name)),
    )


def markdown_table(found: list[Point], budget: float | None = None) -> str:
    """The grid as a Markdown table, the best point by validation within the budget (seconds
    of extract_features + train_head + finetune) marked, points over it marked, and the rule."""
    if not found:
        raise UserError(f"no finished {PREFIX}-* experiment: `benchmarks/ft_study.py queue`, then `dvc queue start`")
    keys = list(found[0].values)
    best = best_by_validation(found, budget)

    def mark(point: Point) -> str:
        if point is best:
            return "**best**"
        return "" if within(point, budget) else "over budget"

    def interval(accuracy: float, ci95: tuple[float, float]) -> str:
        return f"{accuracy:.3f} [{ci95[0]:.3f}, {ci95[1]:.3f}]"

    header = [
        *(key.split(".")[-1] for key in keys),
        f"validation accuracy ({found[0].validation_samples})",
        "test accuracy",
        "head's test accuracy",
        "kept epoch / epochs",
        "seconds",
        "best by validation",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for point in found:
        cells = [
            *(str(point.values[key]) for key in keys),
            interval(point.validation_accuracy, point.validation_ci95),
            interval(point.test_accuracy, point.test_ci95),
            "?" if point.head_test_accuracy is None else f"{point.head_test_accuracy:.3f}",
            f"{point.kept_epoch} / {point.epochs}",
            "?" if point.seconds is None else f"{point.seconds:.0f}",
            mark(point),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    rule = "a tie goes to the cheaper point, then the earlier one"
    if budget is not None:
        rule += f"; only points within the budget of {budget:.0f} s count"
    if best is None:
        lines += ["", f"{len(found)} points. No point is within the budget of {budget:.0f} s."]
        return "\n".join(lines)
    label = ", ".join(f"{key.split('.')[-1]}={best.values[key]}" for key in keys)
    lines += [
        "",
        f"{len(found)} points. Best by validation: {label} ({best.validation_correct} of "
        f"{best.validation_samples} validation photos right); {rule}.",
    ]
    return "\n".join(lines)


def stage_runs() -> list[StageRun]:
    """Every finished MLflow run of the three stages in the project's experiment, oldest first."""
    import mlflow

    from pipeline.params import load_params
    from pipeline.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri())
    experiment = client.get_experiment_by_name(load_params().mlflow.experiment)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
        max_results=50000,
    )
    return [
        StageRun(stage, run.info.run_id, dict(run.data.params), (run.info.end_time - run.info.start_time) / 1000)
        for run in runs
        if (stage := run.data.tags.get("pipeline.stage", "")) in STAGES
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    queue = commands.add_parser("queue", help="queue every point of the grid as a DVC experiment")
    queue.add_argument("--augment-copies", type=int, nargs="+", default=[0, 2, 4])
    queue.add_argument("--unfreeze", type=int, nargs="+", default=[3, 2, 1])
    queue.add_argument("--learning-rate", type=float, nargs="+", default=[2e-6, 1e-5])
    queue.add_argument("--keep-by", nargs="+", default=["val_loss", "val_accuracy"])
    queue.add_argument("--dry-run", action="store_true", help="print the commands, queue nothing")
    table = commands.add_parser("table", help="the finished points as a Markdown table")
    table.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="extract_features + train_head + finetune seconds a point may take to be chosen",
    )
    args = parser.parse_args()
    try:
        if args.command == "queue":
            study = grid(args)
            check_study(study, Path("params.yaml"), path=Path("benchmarks/ft_study.py"))
            for command in queue_commands(study, datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")):
                print("$ " + " ".join(command), flush=True)
                if not args.dry_run:
                    subprocess.run(command, check=True)
        else:
            shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], check=True, capture_output=True).stdout)
            full = grid(parser.parse_args(["queue"])).params
            found = in_grid_order(points(shown, list(full), stage_runs()), full)
            print(markdown_table(found, args.budget))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
