"""Would XLA (`jit_compile=True`) make the trainings faster on this CPU? Issue 13's candidate.

Two questions, each model in fresh processes (TensorFlow's determinism switch is process-wide):
1. With the stages' deterministic kernels on (`seed_everything`), does Keras compile with XLA at
   all? It reads `model.jit_compile` back after `compile(jit_compile=True)`.
2. Without determinism, where XLA can run: seconds per epoch with and without it, for the
   default baseline (its first `--digits` training digits) and the convnet from scratch (random
   photos of the prepared size: speed does not depend on pixel values). Three epochs each; the
   first includes tracing and compiling, so the median of the last two counts.

Prints JSON. Needs data/prepared/mnist.npz (`dvc repro prepare_mnist`).
Run: `.venv/bin/python benchmarks/bench_xla.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

EPOCHS = 3


def train(model_name: str, jit: bool, deterministic: bool, digits: int, photos: int) -> dict:
    """In this process: compile one model with `jit_compile=jit` and time EPOCHS epochs."""
    import keras
    import numpy as np
    import tensorflow as tf

    from pipeline.models.baseline import build_baseline
    from pipeline.models.optimizer import make_optimizer
    from pipeline.models.scratch import build_scratch_convnet, loss_for
    from pipeline.params import load_params
    from pipeline.stages import train_baseline

    params = load_params(Path("params.yaml"))
    keras.utils.set_random_seed(params.seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    if model_name == "baseline":
        p = params.baseline
        with np.load(train_baseline.DATA) as data:
            x, y = data["x_train"][:digits], data["y_train"][:digits]
        model = build_baseline(x.shape[1:], y.shape[1], p)
        loss, schedule = "categorical_crossentropy", p.lr_schedule
    else:
        p = params.scratch
        rng = np.random.default_rng(params.seed)
        size = params.images.size
        x = rng.integers(0, 256, (photos, size, size, 3)).astype(np.float32)
        y = rng.integers(0, 2, photos)
        model = build_scratch_convnet(x.shape[1:], 2, p, params.seed)
        loss, schedule = loss_for(2), "constant"
    steps = EPOCHS * -(-len(x) // p.batch_size)
    model.compile(
        optimizer=make_optimizer(p.optimizer, p.learning_rate, schedule, steps),
        loss=loss,
        metrics=["accuracy"],
        jit_compile=jit,
    )
    seconds = []
    for _ in range(EPOCHS):
        started = time.perf_counter()
        model.fit(x, y, batch_size=p.batch_size, epochs=1, shuffle=False, verbose=0)
        seconds.append(time.perf_counter() - started)
    return {"xla": bool(model.jit_compile), "epoch_seconds": [round(s, 2) for s in seconds]}


def in_subprocess(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, default=20000)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "JIT", "DETERMINISTIC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        model_name, jit, deterministic = args.one
        result = train(model_name, jit == "1", deterministic == "1", args.digits, args.photos)
        print(json.dumps(result))
        return
    sizes = ["--digits", str(args.digits), "--photos", str(args.photos)]
    report: dict = {}
    for model_name in ("baseline", "scratch"):
        deterministic = in_subprocess(model_name, "1", "1", *sizes)
        plain, xla = (in_subprocess(model_name, jit, "0", *sizes) for jit in ("0", "1"))
        plain_s, xla_s = (statistics.median(r["epoch_seconds"][1:]) for r in (plain, xla))
        report[model_name] = {
            "xla_with_determinism": deterministic["xla"],
            "plain_epoch_seconds": plain["epoch_seconds"],
            "xla_epoch_seconds": xla["epoch_seconds"],
            "xla_over_plain": round(xla_s / plain_s, 2),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
