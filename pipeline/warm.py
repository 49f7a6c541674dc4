"""`pipeline warm -- COMMAND`: run COMMAND (`dvc repro`, `dvc exp run`) with the libraries loaded once.

DVC starts every stage as its own process, and each TensorFlow stage spent about 5.5 s
importing TensorFlow, Keras and MLflow before any work (py-spy, README "Where the time goes").
Under `pipeline warm` one process (the warm process) imports them once; every `pipeline`
command started below it (by DVC, through the `PIPELINE_WARM` variable) sends its
arguments, working directory, environment and standard streams over a Unix socket, and the
warm process forks a child that runs the command exactly as a fresh process would, from
`pipeline.cli.console`. The command's own process (the client) waits, forwards SIGINT,
SIGTERM and SIGHUP to the child, and exits with the child's status; if the client dies, the
child is terminated. Python's multiprocessing "forkserver" does the same for one parent
process only; these clients are separate processes started by DVC, hence this module.

A command runs on its own, as without `pipeline warm`, whenever the warm process cannot
stand in for a fresh process: it is not running or refuses, a variable read while the
libraries load (`PYTHON*`, `TF_*`, `KERAS_*`, thread settings...) differs from the warm
process's, or a file of the `pipeline` package changed since it was loaded.

Fork after import only: the warm process never creates a TensorFlow context, a thread of
its own, an MLflow client or a database connection; the children do, after the fork.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

ENV = "PIPELINE_WARM"  # the warm process's socket, for the `pipeline` commands below it
SERVED = False  # True in a child of the warm process: stage runs are tagged `pipeline.warm`

# Variables read as Python or the preloaded libraries load: a client whose values differ
# from the warm process's would not get the process it asked for, so it runs on its own.
LOAD_TIME = ("PYTHON", "TF_", "KERAS_", "XLA_", "OMP_", "MKL_", "OPENBLAS_", "CUDA_", "LD_", "MPL", "MALLOC", "HOME")

# What the warm process loads, in two steps: what every command needs, then TensorFlow and
# Keras. Commands that came in meanwhile are forked between the two: the first stages
# (downloads, preparation) need no TensorFlow and need not wait for it.
PRELOAD = (
    (
        "pipeline.cli",
        "pipeline.tracking",
        "mlflow",
        "mlflow.store.tracking.sqlalchemy_store",  # SQLAlchemy and MLflow's ORM: 0.9 s per stage
        "pandas",
    ),
    ("tensorflow", "keras", "matplotlib.pyplot", "pipeline.stages.common"),
)

_HEADER = struct.Struct("!I")
_CODE = [sys.executable, __file__]  # a client of another venv or checkout runs on its own


def _load_time_env(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.startswith(LOAD_TIME)}


def _stamp(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size


def _package_files() -> dict[str, tuple[int, int]]:
    """(mtime, size) of every loaded module of the `pipeline` package."""
    return {
        path: _stamp(path)
        for name, module in list(sys.modules.items())
        if (name == "pipeline" or name.startswith("pipeline.")) and (path := getattr(module, "__file__", None))
    }


def _unchanged(files: dict[str, tuple[int, int]]) -> bool:
    try:
        return all(_stamp(path) == stamp for path, stamp in files.items())
    except OSError:
        return False


# ---------------------------------------------------------------- the client: a `pipeline` command


def client(argv: list[str]) -> int | None:
    """Run `argv` in a child of the warm process named by $PIPELINE_WARM.

    Returns the exit status to end with, or None when the command must run on its own (no
    warm process, or it refused). Called before anything heavy is imported."""
    path = os.environ.get(ENV)
    if not path:
        return None
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
    except OSError:
        return None
    with conn:
        umask = os.umask(0)
        os.umask(umask)
        request = json.dumps(
            {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask, "code": _CODE}
        ).encode()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            socket.send_fds(conn, [_HEADER.pack(len(request)) + request], [0, 1, 2])
            reply = conn.makefile("rb")
            first = reply.readline().split()
        except OSError:
            return None
        if len(first) != 2 or first[0] != b"pid":
            return None  # refused (or the warm process went away before forking): run here
        child = int(first[1])

        def forward(signum: int, frame: object) -> None:
            with contextlib.suppress(ProcessLookupError):  # it has just ended: its status follows
                os.kill(child, signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, forward)
        last = reply.readline().split()  # a forwarded signal does not interrupt it (PEP 475)
    if len(last) == 2 and last[0] == b"exit":
        return int(last[1])
    if len(last) == 2 and last[0] == b"signal":  # end the way the child did, for DVC and the shell
        signum = int(last[1])
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum
    print(f"error: the warm process ({path}) ended before the command did; run it again", file=sys.stderr)
    return 1


# ---------------------------------------------------------------- the warm process


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    if len(data) < _HEADER.size:
        raise OSError("short request")
    (size,) = _HEADER.unpack_from(data)
    data = data[_HEADER.size :]
    while len(data) < size:
        more = conn.recv(size - len(data))
        if not more:
            raise OSError("short request")
        data += more
    return json.loads(data), fds


def _become(request: dict, fds: list[int], conn: socket.socket) -> None:
    """In the forked child: take on the client's streams, directory, environment and
    arguments, end if the client ends, then run the command and exit with its status."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    for stream in (sys.stdout, sys.stderr):  # line-buffered on a terminal, as a fresh process sets it
        cast(io.TextIOWrapper, stream).reconfigure(line_buffering=os.isatty(stream.fileno()))
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    global SERVED
    SERVED = True
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):  # as a fresh Python process has them
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    import threading

    def end_with_client() -> None:
        """The client never writes again: end of file means it died (SIGKILL): stop as a kill would."""
        with contextlib.suppress(OSError):
            while conn.recv(1):
                continue
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=end_with_client, name="warm-client-watch", daemon=True).start()
    from pipeline.cli import console

    console()  # ends the process (os._exit), or raises on a bug


def serve(path: str) -> None:
    """The warm process: listen on `path` at once, load the libraries, then fork a child
    per request until SIGTERM."""
    original_env = _load_time_env(dict(os.environ))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # as pipeline.cli.main sets it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)  # clients queue here while the libraries load
    children: dict[int, socket.socket] = {}
    files: dict[str, tuple[int, int]] = {}

    def fork_for(conn: socket.socket) -> None:
        """Fork a child that runs the command `conn` sends, or refuse it."""
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError):
            conn.close()
            return
        stand_in = request["code"] == _CODE and _load_time_env(request["env"]) == original_env
        if not (stand_in and _unchanged(files)):
            for fd in fds:
                os.close(fd)
            _send_and_close(conn, "refuse")
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                listener.close()
                for other in children.values():
                    other.close()
                _become(request, fds, conn)
            except SystemExit as exc:  # pragma: no cover (console exits through os._exit)
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):  # the client is gone: its child's watcher ends the child
            conn.sendall(f"pid {pid}\n".encode())
        children[pid] = conn

    def serve_for(seconds: float, accepting: bool = True) -> None:
        """Wait up to `seconds` for a command, fork for those that came, report the children that ended."""
        ready, _, _ = select.select([listener] if accepting else [], [], [], seconds)  # PEP 475: no EINTR
        while children:  # report every child that ended to its client
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            _send_and_close(children.pop(pid), f"signal {-code}" if code < 0 else f"exit {code}")
        for _ in ready:
            fork_for(listener.accept()[0])

    import importlib

    for step in PRELOAD:
        for name in step:
            importlib.import_module(name)
        files = _package_files()
        serve_for(0)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the commands through their clients
    while not stopping or children:
        serve_for(0.2, accepting=not stopping)
    listener.close()


def _send_and_close(conn: socket.socket, line: str) -> None:
    with contextlib.suppress(OSError):  # a client that is gone needs no answer
        conn.sendall(f"{line}\n".encode())
    conn.close()


# ---------------------------------------------------------------- `pipeline warm -- COMMAND`


def console() -> None:
    """The `pipeline` console script: the command runs in a child of the warm process when
    there is one that can stand in for a fresh process, else here (pipeline.cli)."""
    if os.environ.get(ENV) and sys.argv[1:2] != ["warm"]:
        code = client(sys.argv)
        if code is not None:
            sys.exit(code)
    from pipeline.cli import console as in_this_process

    in_this_process()


@contextlib.contextmanager
def warm_process() -> Iterator[dict[str, str]]:
    """A warm process for the duration of the block. Yields the environment to start
    commands with: this one and $PIPELINE_WARM (without it if the warm process did not start)."""
    folder = tempfile.mkdtemp(prefix="pipeline-warm-")
    path = os.path.join(folder, "socket")
    # `python -c` puts the working folder first on sys.path, where a project's copy of
    # pipeline/ (DVC's deps) would shadow the installed package: not for the warm process.
    server = subprocess.Popen(
        [sys.executable, "-c", f"import sys; del sys.path[0]; from pipeline.warm import serve; serve({path!r})"],
        cwd=folder,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches the children through their clients only
    )
    try:
        deadline = time.monotonic() + 30  # it listens before it loads anything: milliseconds
        while not os.path.exists(path) and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        yield dict(os.environ, **{ENV: path}) if os.path.exists(path) else dict(os.environ)
    finally:
        server.terminate()  # it ends once its children have
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        Path(path).unlink(missing_ok=True)
        os.rmdir(folder)


def run(command: list[str]) -> int:
    """`command` with a warm process (`pipeline warm -- COMMAND`); returns its exit status."""
    with warm_process() as env:
        # Like a shell, wait through a Ctrl-C: the command decides what it means. (A handler,
        # not SIG_IGN, which the command would inherit.)
        previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
        try:
            code = subprocess.call(command, env=env)
        except FileNotFoundError:
            from pipeline.errors import UserError

            raise UserError(f"{command[0]}: command not found") from None
        finally:
            signal.signal(signal.SIGINT, previous)
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says
