"""Errors a user can cause and fix: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """Bad input (params, files, network, checksums): shown as one line, no traceback.

    The message names the file or key at fault and says what to do about it.
    """


def require(*paths: Path, stage: str) -> None:
    """Stop with one line when an upstream output is missing."""
    for path in paths:
        if not path.exists():
            raise UserError(f"{path}: missing; run `dvc repro {stage}` first")


class Killed(BaseException):
    """SIGTERM arrived (`kill`, `dvc queue kill`): unwinds like Ctrl-C, so outputs stay whole
    and the MLflow run ends KILLED."""


def raise_killed(signum: int, frame: object) -> None:
    """A SIGTERM handler that turns the signal into `Killed`."""
    raise Killed(f"signal {signum}")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then deliver them.

    For the few steps that must not be cut in two: renaming an output into place, ending an
    MLflow run. Only the main thread can set handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)
