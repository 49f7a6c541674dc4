"""The `pipeline` console script ends without the interpreter's teardown (pipeline/cli.py,
`console`), but like a normal exit in everything a caller can see: the exit status, every
line printed (also into a pipe), atexit functions run; and an idle thread pool left behind
by a library (MLflow's artifact downloads: `pipeline compare --paired`) does not keep it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import command_env

# `pipeline ARGS` through the console script's function, with an atexit function (it leaves
# a file behind when it ran) and an idle ThreadPoolExecutor (its worker is not a daemon).
SCRIPT = """
import atexit, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from pipeline import cli

atexit.register(lambda: Path("atexit-ran").write_text("yes"))
pool = ThreadPoolExecutor(1)  # kept, as a library keeps its pool
pool.submit(print, end="").result()
sys.argv = ["pipeline", *sys.argv[1:]]
cli.console()
raise AssertionError("console() returned")
"""


def console(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=cwd, env=command_env(),
                          capture_output=True, text=True, timeout=60)


def test_a_command_that_succeeds_exits_0_with_its_output_and_its_atexit_work_done(tmp_path):
    result = console(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train-baseline" in result.stdout and result.stdout.endswith("\n"), "the whole help, flushed into the pipe"
    assert (tmp_path / "atexit-ran").read_text() == "yes"


def test_a_user_error_exits_2_with_its_one_line_and_its_atexit_work_done(tmp_path):
    result = console(["train-baseline", "--params", "missing.yaml"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: missing.yaml"), result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "atexit-ran").read_text() == "yes"


def test_a_bug_still_shows_its_traceback_and_exits_1(tmp_path):
    script = SCRIPT.replace("cli.console()", "cli.main = lambda: 1 / 0\ncli.console()")
    result = subprocess.run([sys.executable, "-c", script, "train-baseline"], cwd=tmp_path, env=command_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "ZeroDivisionError" in result.stderr and "Traceback" in result.stderr
