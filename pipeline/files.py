"""Atomic outputs and content hashes: the only file plumbing the stages share.

A stage writes each output under a temporary name beside it and renames it into place when
the output is complete, so a stage that fails or is killed leaves the previous output or
nothing, never a torn file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import UserError, signals_deferred

TEMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(target: Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`.

    With `directory=True` the temporary path is an empty directory. On any exception (and on
    KeyboardInterrupt or SIGTERM) the temporary path is removed and `target` is untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temp: Path | None = None
    try:
        # A signal between creating the path and knowing its name would leave it behind
        # (a kill right after an epoch's backup began did): held until `temp` is set.
        with signals_deferred():
            temp = _make_temp(target, directory)
        yield temp
        _replace(temp, target)
    except BaseException:
        if temp is not None:
            _remove(temp)
        raise


def _make_temp(target: Path, directory: bool) -> Path:
    if directory:
        temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + target.name + ".", dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix="." + target.name, dir=target.parent)
        os.close(handle)
        temp = Path(name)
    # mkdtemp/mkstemp make private (0700/0600) paths; outputs get the usual permissions.
    temp.chmod((0o777 if directory else 0o666) & ~_umask())
    return temp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(source: Path, target: Path) -> None:
    """Rename `source` onto `target`; an old directory is moved aside first, then deleted."""
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f"{TEMP_PREFIX}{target.name}.old")
        _remove(old)
        with signals_deferred():  # a kill between the two renames would leave neither
            os.replace(target, old)
            os.replace(source, target)
        _remove(old)
    else:
        os.replace(source, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_json(path: Path, data: object) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_npz(path: Path, arrays: Mapping[str, Any]) -> None:
    """Write named arrays as one uncompressed .npz file, atomically."""
    import numpy as np

    with atomic_path(path) as temp, temp.open("wb") as handle:
        np.savez(handle, **arrays)


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file's bytes."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_sha256(path: Path, expected: str, name: str, key: str, hint: str = "") -> None:
    """UserError naming `name` (what the user gave) and the params `key` when the file's
    sha256 is not `expected`; `hint` says what to do."""
    digest = sha256_file(path)
    if digest != expected.lower():
        raise UserError(f"{name}: sha256 is {digest[:12]}..., {key} expects {expected[:12]}...{hint}")


def sha256_tree(paths: list[Path]) -> str:
    """One sha256 over files and directories: relative names and contents, in sorted order."""
    digest = hashlib.sha256()
    for root in sorted(paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            digest.update(str(file.relative_to(root.parent)).encode() + b"\0")
            digest.update(bytes.fromhex(sha256_file(file)))
    return digest.hexdigest()


def sha256_arrays(*arrays: Any) -> str:
    """sha256 of arrays' dtypes, shapes and bytes: the same arrays, the same hash, whichever
    file (or compression) holds them."""
    import numpy as np

    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()
