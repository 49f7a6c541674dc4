"""The whole run against its limit: each stage run by DVC, then the work it cannot avoid
timed alone, in the same process tree on the same machine.

Stage by stage, in pipeline order:
1. `dvc repro -f -s STAGE` in the project folder (the real-data run folder, say); the
   stage's process seconds run from its "Running stage" line to the end of DVC (the stage's
   process, imports included, and DVC caching its outputs);
2. right after it, so that both see the same load on a shared machine, its irreducible work
   with plain Keras on the outputs it just wrote: extract_features' forward passes as a bare
   `conv_base.predict` or a `predict_on_batch` loop, whichever is faster (same weights,
   photos, views and batch), a training's epochs as a
   plain `model.fit` (same model, data, validation data, batch), as many epochs as the stage
   ran (its metrics file: early stopping decides).

Prints JSON: per stage {process_s, irreducible_s, ratio} (ratio null for a stage with no
irreducible work counted: downloads, preparation, evaluate, report), whole_run_s (the walls
of the 14 `dvc repro` calls), irreducible_s, whole_run_ratio and outside_stages_s (the 14
DVC starts: one `dvc repro` of the whole pipeline pays one).
The stages run under one `pipeline warm` process, as `make run` runs them (`--cold`: each
stage imports its libraries itself, as a bare `dvc repro` does).
Run: `.venv/bin/python benchmarks/bench_pipeline.py [--project DIR] [--stages STAGE...] [--cold]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import catalog
from pipeline.warm import warm_process

RUNNING = re.compile(r"Running stage '([^']+)'")
METRICS = {model.stage: model.metrics for model in catalog.MODELS.values()}  # the trainings that save a model
BLOCK_HEADS_METRICS = catalog.BLOCK_HEADS_METRICS


def stage_spans(events: Iterable[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds of each stage from (time, line) of `dvc repro`'s output: from its "Running
    stage" line to the next stage's, the last one to `end`."""
    starts = [(at, match[1]) for at, line in events if (match := RUNNING.search(line))]
    ends = [at for at, _ in starts[1:]] + [end] if starts else []
    return {stage: round(stop - start, 2) for (start, stage), stop in zip(starts, ends, strict=True)}


def epochs_run(root: Path, stage: str) -> dict[str, int]:
    """Epochs the training `stage` ran, from its metrics file: {stage: epochs}, or for
    train_block_heads {"block<N>": epochs} per block."""
    if stage != "train_block_heads":
        return {stage: int(json.loads((root / METRICS[stage]).read_text())["epochs"])}
    blocks = json.loads((root / BLOCK_HEADS_METRICS).read_text())
    # blockN holds its head's numbers, blockM_vs_blockN the paired test
    return {key: int(values["epochs"]) for key, values in blocks.items() if "epochs" in values}


def ratio(process: float, irreducible: float) -> float | None:
    return round(process / irreducible, 3) if irreducible > 0 else None


def breakdown(process: dict[str, float], irreducible: dict[str, float], whole_run: float) -> dict:
    """The JSON: per stage of `process` its seconds, the irreducible seconds counted for it
    (0 when none) and their ratio; the whole run against the sum of the irreducible work."""
    unknown = set(irreducible) - set(process)
    if unknown:
        raise ValueError(f"irreducible work timed for stages that did not run: {sorted(unknown)}")
    stages = {
        stage: {
            "process_s": round(seconds, 2),
            "irreducible_s": round(irreducible.get(stage, 0.0), 2),
            "ratio": ratio(seconds, irreducible.get(stage, 0.0)),
        }
        for stage, seconds in process.items()
    }
    total = sum(irreducible.values())
    return {
        "stages": stages,
        "whole_run_s": round(whole_run, 2),
        "irreducible_s": round(total, 2),
        "whole_run_ratio": ratio(whole_run, total),
        "outside_stages_s": round(whole_run - sum(process.values()), 2),  # DVC's start and end
    }


def repro(project: Path, *stages: str, env: dict[str, str] | None = None) -> tuple[dict[str, float], float]:
    """`dvc repro -f -s STAGE...` in `project` (every stage if none is given) with `env`
    (default: this one), its output passed on to stderr: (seconds of each stage that ran,
    wall seconds)."""
    venv = Path(sys.executable).parent  # its `dvc` and `pipeline`, first on PATH as `make run` puts them
    env = dict(os.environ if env is None else env)
    # PYTHONUNBUFFERED: each line as it is printed, for its time
    env.update(PATH=f"{venv}{os.pathsep}{env['PATH']}", PYTHONUNBUFFERED="1")
    events: list[tuple[float, str]] = []
    started = time.perf_counter()
    with subprocess.Popen(
        [str(venv / "dvc"), "repro", "-f", *(["-s", *stages] if stages else [])],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            events.append((time.perf_counter(), line))
            sys.stderr.write(line)
    end = time.perf_counter()
    if process.returncode != 0:
        raise SystemExit(f"dvc repro -f {' '.join(stages)} failed in {project} (exit {process.returncode})")
    return stage_spans(events, end), end - started


def timed_fit(
    build: Callable[[], Any], train: tuple, validation: tuple, epochs: int, batch_size: int, seed: int
) -> float:
    """Wall seconds of a plain `model.fit` of `build()`'s compiled model (seeded first)."""
    import keras

    keras.utils.set_random_seed(seed)
    model = build()
    started = time.perf_counter()
    model.fit(*train, validation_data=validation, epochs=epochs, batch_size=batch_size, verbose=0)
    return time.perf_counter() - started


def extraction_seconds(params) -> float:
    """Every view extract_features cached, through VGG16's convolutional base with plain Keras
    at its batch size, two ways: a bare `conv_base.predict` of each split, and a loop of
    `predict_on_batch` over the same batches. The faster is the limit. (`predict` builds a
    tf.data pipeline whose threads compete with the convolutions for two cores: on one quiet
    machine it took 120, 167 and 230 s for the same 3,002 passes in three runs.)"""
    import keras

    from pipeline.models.vgg import build_conv_base
    from pipeline.stages.extract_features import augmented_of, views_per_photo

    with np.load(catalog.IMAGES) as data:
        splits = {split: data[f"x_{split}"] for split in ("train", "validation", "test")}
    conv_base = build_conv_base(str(catalog.WEIGHTS), splits["train"].shape[1:])
    views = views_per_photo(params.features.mirror_train, augmented_of(params.features, params.seed))
    batch = params.features.batch_size
    predict = on_batches = 0.0
    for split, photos in splits.items():
        x = keras.applications.vgg16.preprocess_input(photos.astype("float32"))
        for _ in range(views if split == "train" else 1):  # a mirror or an augmented copy costs one pass
            started = time.perf_counter()
            conv_base.predict(x, batch_size=batch, verbose=0)
            predict += time.perf_counter() - started
            started = time.perf_counter()
            for first in range(0, len(x), batch):
                conv_base.predict_on_batch(x[first : first + batch])
            on_batches += time.perf_counter() - started
    print(
        json.dumps({"extraction_predict_s": round(predict, 2), "extraction_predict_on_batch_s": round(on_batches, 2)}),
        file=sys.stderr,
        flush=True,
    )
    return min(predict, on_batches)


def digits_seconds(stage: str, epochs: int, params) -> float:
    """train_baseline or train_dense: plain fit of the same model, optimizer and schedule."""
    from pipeline.models.baseline import build_baseline
    from pipeline.models.dense import build_dense
    from pipeline.models.optimizer import make_optimizer

    p, builder = (params.baseline, build_baseline) if stage == "train_baseline" else (params.dense, build_dense)
    with np.load(catalog.MNIST) as data:
        arrays = {key: data[key] for key in data.files}
    steps = math.ceil(len(arrays["x_train"]) / p.batch_size) * p.epochs  # the schedule spans p.epochs, as in the stage

    def build():
        model = builder(arrays["x_train"].shape[1:], arrays["y_train"].shape[1], p)
        optimizer = make_optimizer(p.optimizer, p.learning_rate, p.lr_schedule, steps)
        model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"])
        return model

    train, validation = (arrays["x_train"], arrays["y_train"]), (arrays["x_validation"], arrays["y_validation"])
    return timed_fit(build, train, validation, epochs, p.batch_size, params.seed)


def head_seconds(epochs: int, params) -> float:
    from pipeline.models.vgg import build_head
    from pipeline.stages.vgg_common import compile_classifier, load_features

    splits, class_names = load_features("pooled")
    p = params.head

    def build():
        head = build_head(splits["train"][0].shape[1:], len(class_names), p.pooling, p.units, p.dropout)
        compile_classifier(head, len(class_names), p)
        return head

    return timed_fit(build, splits["train"], splits["validation"], epochs, p.batch_size, params.seed)


def finetune_seconds(epochs: int, params) -> float:
    """The unfrozen block5 layers and the trained head on the cached block4_pool activations."""
    import keras

    from pipeline.models.vgg import build_conv_base, build_finetune_model, split_at_last_frozen_layer
    from pipeline.stages.vgg_common import compile_classifier, head_of, load_features

    splits, class_names = load_features("frozen")
    p = params.finetune

    def build():
        trained_head = keras.models.load_model(catalog.MODELS["feature_extraction"].model)
        conv_base = build_conv_base(str(catalog.WEIGHTS), trained_head.input_shape[1:])
        _, top = split_at_last_frozen_layer(conv_base, p.unfreeze)
        model = build_finetune_model(top, head_of(trained_head, top.output_shape[1:]))
        compile_classifier(model, len(class_names), p)
        return model

    return timed_fit(build, splits["train"], splits["validation"], epochs, p.batch_size, params.seed)


def block_heads_seconds(epochs: dict[int, int], params) -> float:
    from pipeline.stages.train_block_heads import build_block_head_model, load_block_features

    seconds = 0.0
    for block, count in epochs.items():
        splits = load_block_features(block)
        classes = len(np.unique(splits["train"][1]))
        build = lambda splits=splits, block=block, classes=classes: build_block_head_model(  # noqa: E731
            block, splits["train"][0], classes, params
        )
        seconds += timed_fit(
            build, splits["train"], splits["validation"], count, params.block_heads.batch_size, params.seed
        )
    return seconds


def scratch_seconds(epochs: int, params) -> float:
    from pipeline.models.optimizer import make_optimizer
    from pipeline.models.scratch import build_scratch_convnet, loss_for

    with np.load(catalog.IMAGES) as data:
        photos = {split: (data[f"x_{split}"], data[f"y_{split}"]) for split in ("train", "validation")}
        classes = len(data["class_names"])
    p = params.scratch

    def build():
        model = build_scratch_convnet(photos["train"][0].shape[1:], classes, p, params.seed)
        optimizer = make_optimizer(p.optimizer, p.learning_rate)
        model.compile(optimizer=optimizer, loss=loss_for(classes), metrics=["accuracy"])
        return model

    return timed_fit(build, photos["train"], photos["validation"], epochs, p.batch_size, params.seed)


def irreducible_seconds(stage: str, root: Path, params) -> float | None:
    """Seconds of `stage`'s irreducible work, timed in this process on the outputs it wrote
    in `root` (the working folder); None for a stage with none counted."""
    import keras

    keras.backend.clear_session()  # the previous stage's models and graphs
    if stage == "extract_features":
        return extraction_seconds(params)
    if stage not in METRICS and stage != "train_block_heads":
        return None
    epochs = epochs_run(root, stage)
    if stage == "train_block_heads":
        return block_heads_seconds({int(key.removeprefix("block")): n for key, n in epochs.items()}, params)
    if stage in ("train_baseline", "train_dense"):
        return digits_seconds(stage, epochs[stage], params)
    functions = {"train_head": head_seconds, "finetune": finetune_seconds, "train_scratch": scratch_seconds}
    return functions[stage](epochs[stage], params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="the DVC project to run (default: here)")
    parser.add_argument(
        "--stages", nargs="+", choices=list(catalog.STAGES), help="only these (their inputs must exist)"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="each stage imports its own libraries (default: `pipeline warm`, as make run)",
    )
    args = parser.parse_args()
    root = args.project.resolve()
    os.chdir(root)  # the catalog's paths are relative to the project
    from pipeline.params import load_params

    params = load_params(root / "params.yaml")
    process: dict[str, float] = {}
    irreducible: dict[str, float] = {}
    whole_run = 0.0
    with contextlib.ExitStack() as stack:
        env = None if args.cold else stack.enter_context(warm_process())
        for stage in [stage for stage in catalog.STAGES if stage in (args.stages or catalog.STAGES)]:  # pipeline order
            spans, wall = repro(root, stage, env=env)
            process.update(spans)
            whole_run += wall
            seconds = irreducible_seconds(stage, root, params)
            if seconds is not None:
                irreducible[stage] = seconds
            record = {"stage": stage, "wall_s": round(wall, 2), "process_s": spans.get(stage), "irreducible_s": seconds}
            print(json.dumps(record), file=sys.stderr, flush=True)
    json.dump(breakdown(process, irreducible, whole_run), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
