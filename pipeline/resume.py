"""Resume a killed training from its last finished epoch, exactly.

After each epoch, `EpochBackup` saves the whole training state in one folder,
`.resume/<stage>/<key>/epoch-NNNN/`: every model variable (weights, and the seed-generator
states that drive dropout), every optimizer variable (moments and the iteration count that
learning-rate schedules read), the early-stopping state and the history rows so far. The
folder is written under a temporary name and renamed into place, so a kill at any moment
leaves the last complete epoch. The next run of the stage restores it and trains the
remaining epochs only; with the same seed, data and machine it ends with the same numbers
as an uninterrupted run (with `train.tf_data: true` too: each epoch's order is drawn from
the seed and the epoch alone, see `stages.common.fit_inputs`).

`<key>` hashes the stage's params, its input data and the model's architecture (layer
classes and variable shapes): a backup made with other params or data is never restored
(and is deleted). A code change that keeps the params and shapes is not seen: delete
`.resume/` after editing a model's code mid-training. The training stage
deletes `.resume/<stage>/` once its outputs are written.

Why not `keras.callbacks.BackupAndRestore`: it does not save the seed-generator states
(a resumed run draws other dropout masks, so its numbers differ), writes its checkpoint in
place (a kill while saving leaves a torn file, or weights of one epoch with the epoch
number of another), and keeps neither the history nor the early-stopping state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from pipeline.files import TEMP_PREFIX, atomic_path

if TYPE_CHECKING:
    from pipeline.tracking import StageRun

RESUME_ROOT = Path(".resume")
EPOCH_PREFIX = "epoch-"
EARLY_STOPPING_FIELDS = ("wait", "stopped_epoch", "best", "best_epoch")


@dataclass
class Restored:
    """What a backup gave back: epochs already trained and their history rows."""

    epochs: int = 0
    rows: list[dict] = field(default_factory=list)
    stopped: bool = False  # early stopping had already ended the training


def backup_key(params_sha256: str, data_sha256: str, model) -> str:
    """A short hash of what decides the training: params, data and architecture.

    The architecture is the layers' classes and the shapes of the variables, not the names:
    Keras numbers unnamed layers per process (`input_layer_3`), which would change the key.
    """
    layers = [type(layer).__name__ for layer in model.layers]
    shapes = [[list(v.shape), str(v.dtype)] for v in model.variables]
    text = json.dumps([params_sha256, data_sha256, layers, shapes, keras.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def training_state(model) -> list:
    """Every variable whose value a resumed training needs, in a stable order."""
    return list(model.variables) + list(model.optimizer.variables)


class EpochBackup(keras.callbacks.Callback):
    """Save the training state after each epoch into `folder`; `restore` it before fit.

    `rows` is the list of history rows (one dict per finished epoch) kept by the caller;
    `early_stopping` the EarlyStopping callback whose state must survive, if any. `of_run`
    makes the one of a stage run: .resume/<stage>/<key>/.
    """

    def __init__(self, folder: Path, rows: list[dict], early_stopping=None) -> None:
        super().__init__()
        self.folder = folder
        self.stage = folder.parent.name
        self.rows = rows
        self.early_stopping = early_stopping
        self._restored_rows: list[dict] = []  # kept in every later backup: a second kill loses nothing
        self._restored_early_stopping: dict | None = None
        self._restored_best_weights: list | None = None

    @classmethod
    def of_run(
        cls, run: StageRun, model, rows: list[dict], early_stopping=None, root: Path = RESUME_ROOT
    ) -> EpochBackup:
        """The backup of `run`'s training of `model`: its folder is keyed by the run's params
        and data hashes and the model's architecture (`backup_key`)."""
        key = backup_key(run.params_sha256, run.data_sha256, model)
        return cls(root / run.stage / key, rows, early_stopping)

    # -- restoring -------------------------------------------------------------------
    def restore(self, model) -> Restored:
        """Load the newest complete epoch into `model` (compiled, built); drop stale backups."""
        self._remove_stale()
        epochs = self._epoch_folders()
        if not epochs:
            return Restored()
        # A model built under a tf.distribute strategy (train.distribute) has its variables,
        # and must get its optimizer's, in that strategy's scope.
        strategy = getattr(model, "distribute_strategy", None)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            return self._restore(model, epochs[-1])

    def _restore(self, model, latest: Path) -> Restored:
        try:
            with np.load(latest / "state.npz") as saved:
                values = [saved[f"v{i}"] for i in range(len(saved.files))]
            meta = json.loads((latest / "meta.json").read_text())
            variables = self._built_state(model)
            if [tuple(v.shape) for v in variables] != [value.shape for value in values]:
                raise ValueError("the saved variables do not fit this model")
            best = latest / "best_weights.npz"
            if best.exists():
                with np.load(best) as saved:
                    self._restored_best_weights = [saved[f"w{i}"] for i in range(len(saved.files))]
        except Exception as exc:  # unreadable or from another model: start afresh, never crash
            print(f"resume: ignoring the backup in {latest} ({exc}); training from the start")
            shutil.rmtree(self.folder, ignore_errors=True)
            return Restored()
        for variable, value in zip(variables, values):
            variable.assign(value)
        self._restored_early_stopping = meta.get("early_stopping")
        self._restored_rows = meta["rows"]
        return Restored(int(meta["epochs"]), meta["rows"], bool(meta.get("stopped")))

    def _built_state(self, model) -> list:
        if model.optimizer is not None and not model.optimizer.built:
            # Make the optimizer's variables exist, as fit would, so they can be assigned.
            model.optimizer.build(model.trainable_variables)
        return training_state(model)

    def on_train_begin(self, logs: dict | None = None) -> None:
        # EarlyStopping resets itself in its own on_train_begin, which runs before this one.
        es = self.early_stopping
        if es is not None and self._restored_early_stopping is not None:
            for name in EARLY_STOPPING_FIELDS:
                setattr(es, name, self._restored_early_stopping[name])
            es.best_weights = self._restored_best_weights

    # -- saving ----------------------------------------------------------------------
    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.save(epoch + 1)

    def save(self, epochs_done: int) -> None:
        """One folder per epoch, renamed into place when complete; older ones removed."""
        es = self.early_stopping
        meta = {
            "epochs": epochs_done,
            "rows": self._restored_rows + self.rows,
            "stopped": bool(self.model.stop_training),
            "early_stopping": None
            if es is None
            else {name: _plain(getattr(es, name)) for name in EARLY_STOPPING_FIELDS},
        }
        target = self.folder / f"{EPOCH_PREFIX}{epochs_done:04d}"
        with atomic_path(target, directory=True) as staging:
            state: dict[str, Any] = {f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(training_state(self.model))}
            np.savez(staging / "state.npz", **state)
            if es is not None and es.best_weights is not None:
                np.savez(staging / "best_weights.npz", **{f"w{i}": w for i, w in enumerate(es.best_weights)})
            (staging / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        for older in self._epoch_folders()[:-1]:
            shutil.rmtree(older, ignore_errors=True)

    # -- housekeeping ----------------------------------------------------------------
    def _epoch_folders(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.name.startswith(EPOCH_PREFIX) and p.is_dir())

    def _remove_stale(self) -> None:
        """Backups made with other params, data or architecture, and half-written epochs."""
        stage_folder = self.folder.parent
        if stage_folder.is_dir():
            for other in stage_folder.iterdir():
                if other == self.folder:
                    continue
                if other.is_dir():
                    shutil.rmtree(other, ignore_errors=True)
                else:
                    other.unlink()
        if self.folder.is_dir():
            for partial in self.folder.glob(TEMP_PREFIX + "*"):
                shutil.rmtree(partial, ignore_errors=True)


def discard(stage: str, root: Path = RESUME_ROOT) -> None:
    """Delete a stage's backups (its outputs are complete), and `.resume/` once empty."""
    shutil.rmtree(root / stage, ignore_errors=True)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def _plain(value):
    """numpy scalars -> JSON numbers; inf (EarlyStopping's initial best) as a float."""
    if value is None:
        return None
    if isinstance(value, (np.generic, np.ndarray)):
        return value.item()
    return value
