"""Throughput knobs of the `train` params: arrays vs a tf.data pipeline, and op threads.

Times epochs of the baseline (the params.yaml architecture) under a few settings, each in a
fresh process because TensorFlow takes thread settings only before it starts. Prints JSON:
median seconds per epoch of each setting (the first epoch, which traces the graph, is left
out) and ratios against the default (arrays, TensorFlow's thread defaults).

Uses data/prepared/mnist.npz when present, else random digits of the same shape; `--samples`
and `--epochs` shrink the run for a busy machine.
Run: `.venv/bin/python benchmarks/bench_throughput.py [--samples 55000] [--epochs 4]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path("data/prepared/mnist.npz")
SETTINGS = {  # name -> train params that differ from params.yaml's
    "arrays": {"tf_data": False, "intra_op_threads": 0, "inter_op_threads": 0},
    "tf_data_prefetch": {"tf_data": True, "intra_op_threads": 0, "inter_op_threads": 0},
    "arrays_threads_1": {"tf_data": False, "intra_op_threads": 1, "inter_op_threads": 1},
    "arrays_threads_2": {"tf_data": False, "intra_op_threads": 2, "inter_op_threads": 2},
}


def digits(samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `samples` training digits, or random ones when MNIST is not prepared here."""
    if DATA.exists():
        with np.load(DATA) as data:
            return data["x_train"][:samples], data["y_train"][:samples]
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (samples, 28, 28, 1)).astype(np.float32)
    return x, np.eye(10, dtype=np.float32)[rng.integers(0, 10, samples)]


def time_epochs(settings: dict, samples: int, epochs: int) -> list[float]:
    """Seconds of each epoch of the baseline trained with `settings` (in this process)."""
    from pipeline.params import load_params
    from pipeline.stages.common import distribution_scope, fit_inputs, seed_everything, set_threads

    params = load_params()
    train = params.train.model_copy(update=settings)
    set_threads(train)
    scope, replicas = distribution_scope(train)
    seed_everything(params.seed)

    import keras

    from pipeline.models.baseline import build_baseline
    from pipeline.models.optimizer import make_optimizer

    p = params.baseline
    x, y = digits(samples)
    with scope:
        model = build_baseline(x.shape[1:], y.shape[1], p)
        model.compile(
            optimizer=make_optimizer(p.optimizer, p.learning_rate),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
        )
    seconds: list[float] = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: seconds.append(-time.perf_counter()),
        on_epoch_end=lambda epoch, logs: seconds.__setitem__(-1, seconds[-1] + time.perf_counter()),
    )
    model.fit(
        **fit_inputs((x, y), None, p.batch_size * replicas, train.tf_data, epochs),
        epochs=epochs,
        callbacks=[timer],
        verbose=0,
    )
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=55000, help="training digits per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per setting (the first is not counted)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one setting, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(time_epochs(json.loads(args.one), args.samples, args.epochs)))
        return
    medians = {}
    for name, settings in SETTINGS.items():
        result = subprocess.run(
            [
                sys.executable,
                __file__,
                "--samples",
                str(args.samples),
                "--epochs",
                str(args.epochs),
                "--one",
                json.dumps(settings),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        medians[name] = statistics.median(json.loads(result.stdout.strip().splitlines()[-1])[1:])
    json.dump(
        {
            "samples": args.samples,
            "epochs_timed": args.epochs - 1,
            "seconds_per_epoch_median": {name: round(value, 3) for name, value in medians.items()},
            "ratio_to_arrays": {name: round(value / medians["arrays"], 3) for name, value in medians.items()},
            "ratio_threads_2_to_1": round(medians["arrays_threads_2"] / medians["arrays_threads_1"], 3),
        },
        sys.stdout,
        indent=2,
    )
    print()


if __name__ == "__main__":
    main()
