"""Errors a user can cause and fix: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
    """SIGTERM (`kill`, `timeout`, `dvc queue kill`) or SIGHUP (a terminal hang-up) arrived:
    unwinds like Ctrl-C, so outputs stay whole and the MLflow run ends KILLED."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


# The signals `on_signal` handles, and every one the CLI received, in order.
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_received: list[int] = []


def _interruption(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Killed(signum)


def on_signal(signum: int, frame: object) -> None:
    """The CLI's signal handler: remember the signal, then raise KeyboardInterrupt (SIGINT)
    or `Killed` (SIGTERM, SIGHUP) to unwind the stage.

    Python runs a handler between any two bytecodes, so the exception can land inside code
    that swallows it: a bare `except:` in Keras' graph tracing, a `__del__`, a callback
    wrapped in `except BaseException`. Raising alone would then lose the signal and the
    stage would train on. The record stays: `raise_if_signalled` raises again at the next
    safe point (every batch of a training, the end of a stage's run), so no signal is lost.
    """
    _received.append(signum)
    raise _interruption(signum)


@contextlib.contextmanager
def signals_handled() -> Iterator[None]:
    """`on_signal` handles SIGTERM, SIGINT and SIGHUP while the block runs; the previous
    handlers and an empty record come back after it. A signal the shell made us ignore stays
    ignored (`nohup`, or a job started with `&`, which must not stop on a Ctrl-C)."""
    _received.clear()
    previous = {sig: signal.signal(sig, on_signal) for sig in HANDLED if signal.getsignal(sig) is not signal.SIG_IGN}
    previous_hook = sys.unraisablehook

    def quiet_about_interruptions(unraisable: Any) -> None:
        """An interruption raised inside a weakref callback or a `__del__` (an import's
        module-lock callback, say) is swallowed there, and Python would print its traceback.
        It is recorded and raised again at the next safe point: no error to show."""
        if not (_received and isinstance(unraisable.exc_value, (Killed, KeyboardInterrupt))):
            previous_hook(unraisable)

    sys.unraisablehook = quiet_about_interruptions
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        _received.clear()


def raise_if_signalled() -> None:
    """Raise the interruption of the first signal received, if any: a signal whose
    exception something swallowed is delivered again here (see `on_signal`)."""
    if _received:
        raise _interruption(_received[0])


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block is done, then deliver them.

    For the few steps that must not be cut in two: renaming an output into place, ending an
    MLflow run. Only the main thread can set handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in HANDLED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)
