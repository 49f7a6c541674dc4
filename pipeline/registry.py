"""The MLflow Model Registry after evaluate: every scored model a version, and one champion.

Each model evaluate scores becomes a version of its registered model
(`evaluate.registry.names`, e.g. both VGG16 models versions of `cats-vs-dogs`): the model its
training run logged, or, when that run logged none, the model file logged in the evaluate
run. A model already registered (the same file, by sha256) is not registered again. The
alias `champion` moves to the new version only when it beats the champion on the same test
data (the same sha256 of the test arrays): more test samples that only it got right than
only the champion did, and McNemar's exact test on those (pipeline/evaluation.py) below
`evaluate.registry.significance`. Else the new version is the `challenger`. The first version
of a name is its champion. The champion's per-sample correctness is the correct_<set>.csv
its evaluate run logged (or this run's, when it was scored here).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.catalog import MODELS, evaluate_correct
from pipeline.errors import UserError
from pipeline.params import RegistryParams

CHAMPION = "champion"
CHALLENGER = "challenger"
# Tags of each model version: what it is, what it was scored on, by which evaluate run.
MODEL_SHA256 = "model.sha256"
TEST_SHA256 = "test_data.sha256"
EVALUATE_RUN = "evaluate.run_id"
MODEL_KEY = "pipeline.model"
CLASS_NAMES = "class_names"


@dataclass
class Registered:
    """What the registry did with one scored model (registry.json; the report words it)."""

    model: str  # key in evaluate.json
    name: str  # the registered model
    version: str
    alias: str | None  # champion, challenger, or None (an earlier version kept its alias)
    new: bool  # a new version (False: this model file was registered before)
    reason: str  # one sentence
    champion_before: str | None = None  # the champion's version before this model was registered
    p_value: float | None = None  # McNemar's, against that champion
    only_new_right: int | None = None
    only_champion_right: int | None = None


@dataclass
class Scored:
    """One model as evaluate scored it: what the registry needs to know of it."""

    model: str  # key in catalog.MODELS
    keras_model: Any
    correct: np.ndarray  # (N,) bool, per test sample
    test_sha256: str
    class_names: list[str]
    test_accuracy: float
    example: np.ndarray  # a test input, for a model logged here


def check_names(p: RegistryParams) -> None:
    """A UserError unless every scored model has a registered model name."""
    missing = [key for key in MODELS if key not in p.names]
    unknown = [key for key in p.names if key not in MODELS]
    if missing or unknown:
        raise UserError(
            f"evaluate.registry.names: needs a name for each of {', '.join(MODELS)} "
            f"({'missing ' + ', '.join(missing) if missing else 'unknown ' + ', '.join(unknown)})"
        )


def register_all(scored: Mapping[str, Scored], p: RegistryParams, run_id: str) -> dict[str, Registered]:
    """Register every scored model in MODELS' order and move the aliases (see the module);
    `run_id` is the active evaluate run's."""
    import mlflow

    client = mlflow.MlflowClient()
    outcomes = {}
    for key, model in scored.items():
        outcomes[key] = register(client, model, p.names[key], p.significance, run_id, scored)
    return outcomes


def register(
    client: Any,
    model: Scored,
    name: str,
    significance: float,
    run_id: str,
    scored: Mapping[str, Scored],
) -> Registered:
    from pipeline.files import sha256_file

    _ensure_registered_model(client, name)
    sha256 = sha256_file(MODELS[model.model].model)
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get(MODEL_SHA256) == sha256:
            aliases = client.get_registered_model(name).aliases
            alias = next((a for a, v in aliases.items() if str(v) == str(version.version)), None)
            return Registered(model.model, name, str(version.version), alias, False,
                              f"already registered as version {version.version}: nothing changed")  # fmt: skip
    champion = _version_by_alias(client, name, CHAMPION)
    version = _new_version(model, name, sha256, run_id)
    if champion is None:
        reason = f"the first version of {name}: champion"
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, "registry.decision", reason)
        return Registered(model.model, name, version, CHAMPION, True, reason)
    verdict = _against_champion(client, model, champion, significance, run_id, scored)
    alias = CHAMPION if verdict.pop("promote") else CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "registry.decision", verdict["reason"])
    return Registered(model.model, name, version, alias, True, champion_before=str(champion.version), **verdict)


def _against_champion(
    client: Any, model: Scored, champion: Any, significance: float, run_id: str, scored: Mapping[str, Scored]
) -> dict:
    """{promote, reason, p_value, only_new_right, only_champion_right} of `model` against the
    champion version, from their per-sample correctness on the same test data."""
    from pipeline.evaluation import paired_test

    was = f"version {champion.version}"
    if champion.tags.get(TEST_SHA256) != model.test_sha256:
        return {"promote": False, "reason": f"not compared: the champion ({was}) was scored on other test data"}
    champion_correct = _champion_correct(client, champion, run_id, scored)
    if champion_correct is None or len(champion_correct) != len(model.correct):
        return {"promote": False, "reason": f"not compared: the champion's ({was}) per-sample results are missing"}
    test = paired_test("new", model.correct, "champion", champion_correct)
    only_new, only_champion, p_value = test["only_new_right"], test["only_champion_right"], test["p_value"]
    better, significant = only_new > only_champion, p_value < significance
    promote = better and significant
    if promote:
        reason = f"better than the champion ({was}) and significantly so: champion"
    elif better:
        reason = f"better than the champion ({was}) but not significantly (p >= {significance:g}): challenger"
    else:
        reason = f"not better than the champion ({was}): challenger"
    return {"promote": promote, "reason": reason, "p_value": p_value, "only_new_right": only_new,
            "only_champion_right": only_champion}  # fmt: skip


def _champion_correct(client: Any, champion: Any, run_id: str, scored: Mapping[str, Scored]) -> np.ndarray | None:
    """The champion's 0/1 per test sample: from this run when it was scored here, else from
    the correct_<set>.csv its evaluate run logged."""
    import pandas as pd

    key, champion_run = champion.tags.get(MODEL_KEY), champion.tags.get(EVALUATE_RUN)
    if key not in MODELS or not champion_run:
        return None
    if champion_run == run_id and key in scored:
        return scored[key].correct
    artifact = f"plots/{evaluate_correct(MODELS[key].test_data).name}"
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(champion_run, artifact, folder)
        except Exception:  # the run or its artifact is gone: nothing to compare with
            return None
        frame = pd.read_csv(path)
    return frame[key].to_numpy().astype(bool) if key in frame else None


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Registered by the pipeline's evaluate stage.")


def _version_by_alias(client: Any, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _new_version(model: Scored, name: str, sha256: str, run_id: str) -> str:
    """A new version of `name` from the model the training run logged (else logged here)."""
    import mlflow

    training_run = json.loads(MODELS[model.model].metrics.read_text()).get("mlflow_run_id")
    source = _logged_model(training_run) if training_run else None
    if source is None:
        from pipeline.tracking import log_model

        source = log_model(model.keras_model, model.example, model.model)
    tags = {
        MODEL_SHA256: sha256,
        TEST_SHA256: model.test_sha256,
        EVALUATE_RUN: run_id,
        MODEL_KEY: model.model,
        CLASS_NAMES: json.dumps(model.class_names),
        "test_accuracy": f"{model.test_accuracy:.6f}",
    }
    version = mlflow.register_model(source, name, tags=tags)
    return str(version.version)


def _logged_model(run_id: str) -> str | None:
    """models:/<id> of the model `run_id` logged, or None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:  # a run of another store, or deleted
        return None
    found = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'", output_format="list"
    )
    return f"models:/{found[0].model_id}" if found else None


def as_json(outcomes: Mapping[str, Registered]) -> dict:
    return {key: asdict(outcome) for key, outcome in outcomes.items()}


def summary(outcome: Registered) -> str:
    """One line: "fine_tuning: cats-vs-dogs version 2, challenger (not better than ...)"."""
    alias = f", {outcome.alias}" if outcome.alias else ""
    return f"{outcome.model}: {outcome.name} version {outcome.version}{alias} ({outcome.reason})"
