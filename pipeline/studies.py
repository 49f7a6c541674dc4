"""Studies (studies.yaml): claims that need retrained models, run through DVC's experiment queue.

`pipeline study NAME` checks the study (its params must be params.yaml keys and every value
must pass params.py), queues one DVC experiment per combination of values, named
`study-NAME-<UTC time>-<n>`, up to the training stages those params shape, runs the queue and
redraws the report. The report finds a study's runs in MLflow by that name (tag
`dvc.exp_name`): the newest finished run of each combination.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.catalog import MODELS, STAGES
from pipeline.errors import UserError

STUDIES_FILE = Path("studies.yaml")
NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # no dashes: the experiment name's parts stay apart


@dataclass(frozen=True)
class Study:
    name: str
    claim: str  # what the lesson says, which the study measures
    params: dict[str, list]  # params.yaml key -> the values to try

    def combinations(self) -> list[dict[str, Any]]:
        """Every combination of the values, {key: value}, in the file's order (a grid)."""
        keys = list(self.params)
        return [dict(zip(keys, values)) for values in itertools.product(*self.params.values())]

    @property
    def stages(self) -> list[str]:
        """The training stages whose params these are (what each experiment runs up to)."""
        return [
            model.stage
            for model in MODELS.values()
            if any(_depends(STAGES[model.stage].params, key) for key in self.params)
        ]

    def experiment_pattern(self) -> re.Pattern:
        return re.compile(rf"^study-{self.name}-\d{{8}}T\d{{6}}-\d+$")


def _depends(sections: tuple[str, ...], key: str) -> bool:
    return any(key == section or key.startswith(section + ".") for section in sections if section != "train")


def load_studies(path: Path = STUDIES_FILE) -> dict[str, Study]:
    """studies.yaml as {name: Study}; a malformed file is a UserError naming the study."""
    from ruamel.yaml import YAML, YAMLError

    if not path.exists():
        return {}
    try:
        raw = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8")) or {}
    except YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: must map each study's name to its claim and params")
    studies = {}
    for name, body in raw.items():
        where = f"{path}: study {name}"
        if not isinstance(name, str) or not NAME.match(name):
            raise UserError(f"{path}: study name {name!r}: use lower-case letters, digits and _")
        if not isinstance(body, dict) or set(body) != {"claim", "params"}:
            raise UserError(f"{where}: needs exactly `claim` (text) and `params` (key: [values])")
        params = body["params"]
        if not isinstance(params, dict) or not params:
            raise UserError(f"{where}: params must map params.yaml keys to lists of values")
        for key, values in params.items():
            if not isinstance(values, list) or not values:
                raise UserError(f"{where}: {key} must be a non-empty list of values, e.g. [0.0, 0.5]")
        studies[name] = Study(name, str(body["claim"]), {str(k): list(v) for k, v in params.items()})
    return studies


def get_study(name: str, path: Path = STUDIES_FILE) -> Study:
    studies = load_studies(path)
    if name not in studies:
        known = ", ".join(studies) or "none"
        raise UserError(f"{path}: no study named {name!r} (studies: {known})")
    return studies[name]


def check_study(study: Study, params_file: Path, path: Path = STUDIES_FILE) -> None:
    """Each swept key must be a leaf of params.yaml, and every combination must be valid params
    (a UserError naming the study, the key and what is wrong); it must shape a trained model."""
    from ruamel.yaml import YAML

    from pipeline.params import load_params, parse_params

    load_params(params_file)  # the file itself first
    raw = YAML(typ="safe", pure=True).load(params_file.read_text(encoding="utf-8"))
    for key in study.params:
        node: Any = raw
        for i, part in enumerate(key.split(".")):
            if not isinstance(node, dict) or part not in node:
                known = ", ".join(node) if isinstance(node, dict) else "nothing (a value)"
                parent = ".".join(key.split(".")[:i]) or params_file.name
                raise UserError(
                    f"{path}: study {study.name} sweeps {key}, which is not a param ({parent} has: {known})"
                )
            node = node[part]
        if isinstance(node, dict):
            raise UserError(f"{path}: study {study.name} sweeps {key}, a section; name one of its keys")
    if not study.stages:
        raise UserError(f"{path}: study {study.name}: {', '.join(study.params)} shape no trained model")
    for combination in study.combinations():
        changed = json.loads(json.dumps(raw))
        for key, value in combination.items():
            *sections, leaf = key.split(".")
            node = changed
            for section in sections:
                node = node[section]
            node[leaf] = value
        try:
            parse_params(changed, f"{path}: study {study.name}")
        except UserError as exc:
            raise UserError(str(exc)) from None


def queue_commands(study: Study, stamp: str | None = None) -> list[list[str]]:
    """The `dvc exp run --queue --force` command of each combination, named study-NAME-<stamp>-<n>."""
    stamp = stamp or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    commands = []
    for index, combination in enumerate(study.combinations(), start=1):
        # --force: a value equal to the workspace's would otherwise come from DVC's run-cache,
        # with no MLflow run of this experiment for the report to find.
        command = [
            "dvc",
            "exp",
            "run",
            "--queue",
            "--force",
            *study.stages,
            "-n",
            f"study-{study.name}-{stamp}-{index}",
        ]
        for key, value in combination.items():
            command += ["-S", f"{key}={json.dumps(value)}"]  # JSON is YAML: DVC reads the value's type
        commands.append(command)
    return commands


def run_queue_command(jobs: int) -> list[str]:
    """Runs every queued experiment, `jobs` at a time, and returns when the queue is empty."""
    return ["dvc", "exp", "run", "--run-all", "-j", str(jobs)]


REPORT_COMMAND = ["dvc", "repro", "--single-item", "--force", "report"]


def run_study(name: str, params_file: Path, jobs: int, report: bool) -> None:
    """`pipeline study NAME`: check, queue, run the queue, redraw the report."""
    study = get_study(name)
    check_study(study, params_file)
    commands = [*queue_commands(study), run_queue_command(jobs)]
    if report:
        commands.append(REPORT_COMMAND)
    for command in commands:
        print("$ " + " ".join(command), flush=True)
        result = subprocess.run(command)
        if result.returncode != 0:
            raise UserError(f"`{' '.join(command)}` failed (exit {result.returncode}); see its output above")


# ---------------------------------------------------------------------------- its runs


@dataclass
class StudyRun:
    """One finished training run of a study."""

    values: dict[str, Any]  # {key: value} of the study's params
    run_id: str
    stage: str
    metrics: dict[str, float]  # test_accuracy and its _ci95_low/_high, validation_accuracy, ...
    history: dict[str, list[float]]  # per-epoch accuracy, val_accuracy, loss, val_loss


def study_runs(study: Study, experiment: str) -> list[StudyRun]:
    """The newest FINISHED run of each combination of `study` in the MLflow experiment (the
    tracking store the stages use), in the study's order; [] when none ran yet."""
    import mlflow

    from pipeline.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri())
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    pattern = study.experiment_pattern()
    newest: dict[str, Any] = {}
    for stage in study.stages:
        runs = client.search_runs(
            [found.experiment_id],
            f"tags.`pipeline.stage` = '{stage}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
        for run in runs:
            if not pattern.match(run.data.tags.get("dvc.exp_name", "")):
                continue
            values = {key: _value(run.data.params.get(key)) for key in study.params}
            newest.setdefault(json.dumps([stage, values], sort_keys=True, default=str), (stage, values, run))
    found_runs = []
    for stage, values, run in newest.values():
        history = {
            name: [m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]
            for name in ("accuracy", "val_accuracy", "loss", "val_loss")
        }
        found_runs.append(StudyRun(values, run.info.run_id, stage, dict(run.data.metrics), history))
    order = [json.dumps(c, sort_keys=True, default=str) for c in study.combinations()]

    def position(item: StudyRun) -> tuple[int, str]:
        key = json.dumps(item.values, sort_keys=True, default=str)
        return (order.index(key) if key in order else len(order), key)

    return sorted(found_runs, key=position)


def _value(text: str | None) -> Any:
    """An MLflow param (a string) back as the YAML value it was: "0.5" -> 0.5, "[32, 64]" -> list."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text
