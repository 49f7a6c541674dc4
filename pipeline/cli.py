"""The `pipeline` command: one sub-command per DVC stage, plus `compare`.

This module only parses and dispatches; each stage lives in pipeline/stages/. Errors a user
can fix (bad params, a corrupt download, a missing upstream output) end in one line on
stderr and exit status 2; a traceback means a bug.
"""

from __future__ import annotations

import importlib
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import Killed, UserError, raise_killed

app = typer.Typer(
    help="Reproducible image classification: MNIST convnet and VGG16 transfer learning.\n\n"
    "Each command is one stage of dvc.yaml; `dvc repro` runs them in order.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOption = Annotated[
    Path, typer.Option("--params", help="The params file to read.", dir_okay=False)
]


def _run_stage(module: str, params_file: Path) -> None:
    importlib.import_module(f"pipeline.stages.{module}").run(params_file)


def _stage(name: str, help_text: str) -> None:
    """Register `pipeline NAME` for the stage module `name` (dashes on the command line)."""

    def command(params: ParamsOption = Path("params.yaml")) -> None:
        _run_stage(name, params)

    command.__doc__ = help_text
    app.command(name.replace("_", "-"))(command)


STAGES = {
    "download_mnist": "Download the four MNIST IDX files from the first good mirror, checked.",
    "prepare_mnist": "Normalise MNIST to float32 in [0, 1], one-hot labels, stratified split.",
    "train_baseline": "Train the baseline convnet on MNIST; log it to MLflow.",
}
for _name, _help in STAGES.items():
    _stage(_name, _help)


def main() -> None:
    """Console entry point: user errors as one line, Ctrl-C and SIGTERM as exit codes."""
    signal.signal(signal.SIGTERM, raise_killed)
    try:
        app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Killed:
        print("terminated", file=sys.stderr)
        sys.exit(143)
