"""Errors a user can cause and fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input (params, files, network, checksums): shown as one line, no traceback.

    The message names the file or key at fault and says what to do about it.
    """


class Killed(BaseException):
    """SIGTERM arrived (`kill`, `dvc queue kill`): unwinds like Ctrl-C, so outputs stay whole
    and the MLflow run ends KILLED."""


def raise_killed(signum: int, frame: object) -> None:
    """A SIGTERM handler that turns the signal into `Killed`."""
    raise Killed(f"signal {signum}")
