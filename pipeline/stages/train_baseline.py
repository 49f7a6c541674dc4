"""train_baseline: the MNIST convnet, trained, tested, visualised and logged to MLflow.

Writes models/baseline.keras, metrics/baseline.json and plots/baseline/ (history.csv, the
first layer's kernels, activation maps of one test digit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.files import atomic_path, write_json
from pipeline.params import Params, load_params
from pipeline.stages.common import FitResult, fit, log_model, model_summary, require, save_model, seed_everything

STAGE = "train_baseline"
DATA = Path("data/prepared/mnist.npz")
MODEL = Path("models/baseline.keras")
METRICS = Path("metrics/baseline.json")
PLOTS = Path("plots/baseline")


@dataclass
class Trained:
    model: object
    fit: FitResult
    test_loss: float
    test_accuracy: float


def train_baseline(arrays: dict[str, np.ndarray], params: Params) -> Trained:
    """Build, fit (logging each epoch to the active MLflow run) and test the baseline."""
    from pipeline.models.baseline import build_baseline, make_optimizer

    p = params.baseline
    model = build_baseline(arrays["x_train"].shape[1:], arrays["y_train"].shape[1], p)
    model.compile(
        optimizer=make_optimizer(p.optimizer, p.learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    result = fit(
        model,
        (arrays["x_train"], arrays["y_train"]),
        (arrays["x_validation"], arrays["y_validation"]),
        epochs=p.epochs,
        batch_size=p.batch_size,
        early_stopping_patience=p.early_stopping_patience,
    )
    test_loss, test_accuracy = model.evaluate(
        arrays["x_test"], arrays["y_test"], batch_size=256, verbose=0
    )
    return Trained(model, result, float(test_loss), float(test_accuracy))


def write_figures(model, arrays: dict[str, np.ndarray], history, out: Path) -> None:
    """Kernels of the first conv layer, activation maps of one test digit, training curves."""
    from pipeline.viz import save_figures
    from pipeline.viz.activations import activation_figures
    from pipeline.viz.curves import training_curves_figure
    from pipeline.viz.kernels import kernel_grid

    first_conv = next(layer for layer in model.layers if layer.name.startswith("conv"))
    figures = {
        "kernels.png": kernel_grid(first_conv.get_weights()[0], f"{first_conv.name}: learned kernels"),
        "curves.png": training_curves_figure(history),
    }
    digit = arrays["x_test"][:1]
    for name, figure in activation_figures(model, digit).items():
        figures[f"activations_{name}.png"] = figure
    save_figures(figures, out)


def run(params_file: Path) -> None:
    import mlflow

    from pipeline.tracking import stage_run

    params = load_params(params_file)
    require(DATA, stage="prepare_mnist")
    seed_everything(params.seed)
    with np.load(DATA) as data:
        arrays = {key: data[key] for key in data.files}
    stage_params = {"seed": params.seed, "baseline": params.baseline.model_dump()}
    with stage_run(STAGE, stage_params, [DATA], params.mlflow.experiment) as run:
        trained = train_baseline(arrays, params)
        history = trained.fit.history
        metrics = {
            "test_accuracy": trained.test_accuracy,
            "test_loss": trained.test_loss,
            "epochs": int(len(history)),
            "seconds_per_epoch": round(trained.fit.seconds_per_epoch, 3),
            "mlflow_run_id": run.info.run_id,
        }
        with atomic_path(PLOTS, directory=True) as plots:
            history.to_csv(plots / "history.csv", index=False)
            (plots / "summary.txt").write_text(model_summary(trained.model) + "\n")
            write_figures(trained.model, arrays, history, plots)
        save_model(trained.model, MODEL)
        write_json(METRICS, metrics)
        mlflow.log_metrics({k: v for k, v in metrics.items() if k != "mlflow_run_id"})
        mlflow.log_artifacts(str(PLOTS), artifact_path="plots")
        log_model(trained.model)
