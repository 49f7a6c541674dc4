"""`pipeline warm -- COMMAND` (pipeline/warm.py): the `pipeline` commands under it fork from
one process that has the libraries loaded, and meet their caller as fresh processes would:
outputs, exit status, one-line errors, signals. A command the warm process cannot stand in
for runs on its own. (The whole pipeline under it, as `make run` runs it: tests/test_pipeline.py.)
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import psutil
import pytest

from conftest import BIN, REPO, command_env, runs_in, serve_folder, shipped_params, wait_for, write_mnist_mirror, write_yaml


@pytest.fixture(scope="module")
def project(tmp_path_factory, request) -> Path:
    """Tiny MNIST served from loopback, downloaded and prepared (without `pipeline warm`), a
    baseline that trains long enough to be interrupted, and a copy of pipeline/ in the
    project folder, as a DVC project has one (its stages' deps)."""
    base = tmp_path_factory.mktemp("warm")
    files = write_mnist_mirror(base / "served" / "mnist", train=160, test=50)
    url = serve_folder(base / "served", request)
    params = shipped_params()
    params["mnist"].update(mirrors=[f"{url}/mnist/"], files=files, validation_size=40, retries=0)
    params["baseline"].update(conv_filters=[4, 8], dense_units=16, epochs=500, batch_size=16)
    params["mlflow"].update(experiment="tiny", system_metrics_seconds=1)
    root = base / "project"
    root.mkdir()
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    write_yaml(root / "params.yaml", params)
    for stage in ("download-mnist", "prepare-mnist"):
        subprocess.run([BIN / "pipeline", stage], cwd=root, env=command_env(), check=True, capture_output=True,
                       timeout=120)
    return root


def warm_env(tmp: Path) -> dict[str, str]:
    return {**command_env(), "TMPDIR": str(tmp)}  # the warm process's socket folder goes in `tmp`


def left_behind(tmp: Path) -> list[str]:
    """The warm process's socket folder in `tmp`, and every process that still names it."""
    processes = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    return [str(p) for p in tmp.glob("pipeline-warm-*")] + [c for c in processes if str(tmp) in c]


def test_commands_fork_from_the_warm_process_unless_it_cannot_stand_in_for_a_fresh_one(project, tmp_path):
    """Each command's MLflow run says whether it was forked (`pipeline.warm`): yes under the
    warm process; no with a load-time variable of its own (TF_*), from another Python or
    checkout, or with no warm process to reach. A user error is its one line and exit 2, as
    always; the command's exit status is `pipeline warm`'s. Nothing is left behind."""
    other_python = ("import sys; from pipeline import warm; warm._CODE[0] += '-other';"
                    " sys.argv = ['pipeline', 'prepare-mnist']; warm.console()")
    script = ("pipeline prepare-mnist && TF_ENABLE_ONEDNN_OPTS=0 pipeline prepare-mnist"
              f" && python -c \"{other_python}\""
              " && PIPELINE_WARM=/nonexistent/socket pipeline prepare-mnist"
              " && pipeline prepare-mnist --params missing.yaml")
    result = subprocess.run([BIN / "pipeline", "warm", "--", "sh", "-c", script], cwd=project,
                            env=warm_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: missing.yaml"), result.stderr
    assert "Traceback" not in result.stderr
    runs = runs_in(project, "tiny", "prepare_mnist")[-4:]
    assert [run.data.tags["pipeline.warm"] for run in runs] == ["true", "false", "false", "false"]
    assert all(run.info.status == "FINISHED" for run in runs)
    assert (project / "data/prepared/mnist.npz").exists()
    assert left_behind(tmp_path) == []


def start_training(project: Path, tmp: Path) -> tuple[subprocess.Popen, psutil.Process, psutil.Process, Path]:
    """`pipeline warm -- pipeline train-baseline` until its second epoch: the process,
    the command's own process (the client) and its forked child, and the log."""
    log = tmp / "out.log"
    process = subprocess.Popen([BIN / "pipeline", "warm", "--", "pipeline", "train-baseline"], cwd=project,
                               env=warm_env(tmp), stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    warm = psutil.Process(process.pid)

    def named(parent: psutil.Process, word: str) -> list[psutil.Process]:
        return [p for p in parent.children() if word in " ".join(p.cmdline())]

    wait_for(lambda: named(warm, "serve(") and named(warm, "train-baseline"), "the warm process and the client",
             process=process, log=log)
    server, client = named(warm, "serve(")[0], named(warm, "train-baseline")[0]
    wait_for(lambda: server.children(), "the forked child", process=process, log=log)
    child = server.children()[0]
    wait_for(lambda: "Epoch 2/" in log.read_text(), "the second epoch", process=process, log=log)
    return process, client, child, log


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_command_ends_its_forked_child_as_it_would_end_a_fresh_one(project, tmp_path, sent):
    """SIGTERM to the command is forwarded: the child unwinds (its run KILLED) and the
    command exits 143. SIGKILL cannot be forwarded: the child sees its client gone and ends
    the same way. Either way nothing is left behind."""
    process, client, child, log = start_training(project, tmp_path)
    client.send_signal(sent)
    assert process.wait(timeout=60) == 128 + sent, log.read_text()[-3000:]
    wait_for(lambda: not child.is_running(), "the child's end", timeout=30)
    assert "terminated" in log.read_text()
    run = runs_in(project, "tiny", "train_baseline")[-1]
    assert run.data.tags["pipeline.warm"] == "true"
    assert run.info.status == "KILLED"
    assert left_behind(tmp_path) == []


def test_a_changed_file_of_the_package_makes_the_warm_process_refuse(tmp_path, monkeypatch):
    """Code edited after the warm process loaded it would run stale: every command then runs
    on its own."""
    from pipeline import warm

    source = tmp_path / "probe.py"
    source.write_text("x = 1\n")
    module = types.ModuleType("pipeline._probe")
    module.__file__ = str(source)
    monkeypatch.setitem(sys.modules, "pipeline._probe", module)
    files = warm._package_files()
    assert str(source) in files and warm._unchanged(files)
    source.write_text("x = 22\n")
    assert not warm._unchanged(files)
