"""The `pipeline` command: one sub-command per DVC stage, plus `compare`, `study`, `predict` and `ui`.

This module only parses and dispatches; each stage lives in pipeline/stages/. Errors a user
can fix (bad params, a corrupt download, a missing upstream output) end in one line on
stderr and exit status 2; a traceback means a bug.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.catalog import STAGES, Stage
from pipeline.errors import Killed, UserError, signals_handled

app = typer.Typer(
    help="Reproducible image classification: MNIST convnet and VGG16 transfer learning.\n\n"
    "Each command is one stage of dvc.yaml; `dvc repro` runs them in order.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOption = Annotated[Path, typer.Option("--params", help="The params file to read.", dir_okay=False)]


def _run_stage(module: str, params_file: Path) -> None:
    importlib.import_module(f"pipeline.stages.{module}").run(params_file)


def _stage(stage: Stage) -> None:
    """Register `pipeline SUBCOMMAND` for the stage module `stage.name` (see pipeline/catalog.py)."""

    def command(params: ParamsOption = Path("params.yaml")) -> None:
        _run_stage(stage.name, params)

    command.__doc__ = stage.summary
    app.command(stage.subcommand)(command)


for _stage_in_catalog in STAGES.values():
    _stage(_stage_in_catalog)


class OutputFormat(str, Enum):
    table = "table"
    markdown = "markdown"
    csv = "csv"
    json = "json"


# One option per line or two, as --help shows them.
# fmt: off
@app.command("compare")
def compare_runs(
    experiment: Annotated[Optional[str], typer.Option(
        "--experiment", "-e", metavar="NAME",
        help="MLflow experiment (default: mlflow.experiment in --params).")] = None,
    stage: Annotated[Optional[str], typer.Option(
        "--stage", metavar="STAGE", help="Only runs of this stage (tag pipeline.stage), e.g. train_baseline.")] = None,
    dvc_exp: Annotated[Optional[str], typer.Option(
        "--dvc-exp", metavar="NAME", help="Only runs of this DVC experiment (tag dvc.exp_name).")] = None,
    tag: Annotated[Optional[list[str]], typer.Option(
        "--tag", metavar="KEY=VALUE", help="Only runs with this tag; repeatable.")] = None,
    metric: Annotated[Optional[list[str]], typer.Option(
        "--metric", "-m", metavar="NAME",
        help="A metric column; repeatable (default: test_accuracy, test_loss, seconds_per_epoch).")] = None,
    param: Annotated[Optional[list[str]], typer.Option(
        "--param", "-p", metavar="NAME",
        help="A param column, e.g. baseline.dropout; repeatable (default: the params that differ).")] = None,
    sort: Annotated[Optional[str], typer.Option(
        "--sort", metavar="COLUMN", help="Sort by this column: a metric, a param, started... (default: newest first).")
    ] = None,
    ascending: Annotated[bool, typer.Option(
        "--ascending", help="Sort smallest first (default: largest first).")] = False,
    output_format: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = OutputFormat.table,
    paired: Annotated[Optional[tuple[str, str]], typer.Option(
        "--paired", metavar="RUN_A RUN_B",
        help="Pair two evaluate runs (ids or prefixes) that scored the same test data: per model, the "
             "samples only one got right and the exact McNemar p-value.")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Compare MLflow runs: one row per run, its metrics and the params that differ.

    Example: pipeline compare --stage train_baseline --sort test_accuracy --format markdown
    """
    from pipeline.compare import RunFilter, compare, compare_paired, default_experiment, parse_tags

    if paired:
        typer.echo(compare_paired(experiment or default_experiment(params), *paired), nl=False)
        return

    run_filter = RunFilter(stage=stage, dvc_exp=dvc_exp, tags=parse_tags(tag or []))
    text = compare(experiment or default_experiment(params), run_filter, metric or [], param or [],
                   sort, ascending, output_format.value)
    typer.echo(text, nl=False)


@app.command("study")
def study(
    name: Annotated[str, typer.Argument(help="A study of studies.yaml, e.g. dropout or normalisation.")],
    jobs: Annotated[int, typer.Option(
        "--jobs", "-j", min=1, help="Experiments run at a time from the queue.")] = 1,
    report: Annotated[bool, typer.Option(
        "--report/--no-report", help="Redraw the report afterwards (dvc repro --single-item --force report).")] = True,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Run a study of studies.yaml through DVC's experiment queue, then redraw the report.

    Queues one experiment per value of the study's params (dvc exp run --queue -S KEY=VALUE),
    runs the queue until it is empty, and redraws the report, which draws the study from MLflow.

    Example: pipeline study dropout
    """
    from pipeline.studies import run_study

    run_study(name, params, jobs, report)


class PredictFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command("predict")
def predict_files(
    paths: Annotated[list[Path], typer.Argument(
        metavar="PATH...", help="Picture files (JPEG, PNG, ...; any size, grey, RGB or CMYK) or folders of them.")],
    model: Annotated[Optional[str], typer.Option(
        "--model", metavar="MODEL",
        help="models:/NAME@ALIAS, models:/NAME/VERSION (the project's MLflow registry) or a .keras file "
             "(default: models:/<evaluate.registry.names.fine_tuning>@champion).")] = None,
    output_format: Annotated[PredictFormat, typer.Option(
        "--format", "-f", help="Output format.")] = PredictFormat.table,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Classify picture files with a trained model: one line per file (class, probability).

    Files that do not decode are listed and skipped. A digit model (models/baseline.keras,
    models:/mnist-convnet@champion) reads each file as an MNIST digit: grey, inverted when
    the background is light, centred and scaled.

    Example: pipeline predict photos/ --model models:/cats-vs-dogs@champion --format csv
    """
    from pipeline.params import load_params
    from pipeline.predict import predict

    settings = load_params(params)
    reference = model or f"models:/{settings.evaluate.registry.names['fine_tuning']}@champion"
    out, err = predict(paths, reference, output_format.value, settings.predict)
    typer.echo(out, nl=False)
    typer.echo(err, nl=False, err=True)


@app.command("ui")
def ui(
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to serve on.")] = 5000,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    experiment: Annotated[Optional[str], typer.Option(
        "--experiment", "-e", metavar="NAME",
        help="MLflow experiment (default: mlflow.experiment in --params).")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """MLflow's UI on the project's store: prints the address of the experiment's training runs, then serves.

    MLflow 3.17 opens a new browser in its GenAI view whatever the experiment's kind; the
    printed address opens the runs table (Dataset and Models columns) in the model-training
    view. With MLFLOW_TRACKING_URI set to a server, prints that server's address and exits.

    Example: pipeline ui --port 5001
    """
    from pipeline.compare import default_experiment
    from pipeline.ui import serve

    serve(experiment or default_experiment(params), host, port)


@app.command("warm", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def warm(ctx: typer.Context) -> None:
    """Run a command, e.g. `dvc repro`, with TensorFlow, Keras and MLflow loaded once for all its stages.

    Every `pipeline` command the command starts (each DVC stage) forks from one process that
    has the libraries loaded, instead of loading them again: about 5 s less per TensorFlow
    stage. Outputs, logs, exit codes and Ctrl-C are as without it. `make run` uses it.

    Example: pipeline warm -- dvc exp run --set-param baseline.dropout=0.3
    """
    from pipeline.warm import run

    if not ctx.args:
        raise UserError("pipeline warm: no command given; e.g. pipeline warm -- dvc repro")
    raise typer.Exit(run(ctx.args))


# fmt: on


def main() -> None:
    """Console entry point: user errors as one line, Ctrl-C and SIGTERM as exit codes."""
    # TensorFlow's C++ start-up chatter (oneDNN notes, CPU feature lists) is not for users.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with signals_handled():
            app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130:  # Typer turns Ctrl-C into Exit(130) itself, silently
            print("interrupted", file=sys.stderr)
        raise
    except Killed as exc:
        print("terminated", file=sys.stderr)
        sys.exit(128 + exc.signum)  # 143 for SIGTERM, 129 for SIGHUP, as a shell reports them


def console() -> None:
    """The `pipeline` console script: `main`, then an exit without the interpreter's teardown.

    When `main` ends, the command's work is done: its MLflow run has ended, every output is
    whole (renamed into place) or absent, and its line ("terminated", "error: ...") is
    printed. What Python would do next is tear down every module and object, which takes
    1.2-1.5 s with TensorFlow loaded (four runs on a 2-core machine): a second per stage for
    nothing, and a killed stage should be gone as soon as it has cleaned up. So the exit is
    immediate after the part of a normal one that can matter: atexit functions run (where
    libraries flush what they queued: MLflow's async logging, logging handlers), then stdout
    and stderr are flushed. Threads still alive then are idle pools (or fire-and-forget
    telemetry): nothing of ours runs in the background, and waiting for an idle
    ThreadPoolExecutor worker would wait forever. A traceback (a bug) takes the normal way out.
    """
    try:
        main()
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code
        if not isinstance(code, int):
            raise
    else:
        code = 0
    _exit_now(code)


def _exit_now(code: int) -> None:
    """End the process with `code`: atexit functions (not after a kill), stdio flushed, no teardown."""
    import atexit

    if code not in (130, 128 + signal.SIGHUP, 128 + signal.SIGTERM):  # after a kill, nothing waits
        atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
