"""Fetching files from mirrors: http(s) through pooch, `file://` URLs and local paths by copy.

Pooch does the HTTP work (streaming to a temporary file, retries with back-off, progress
bars); this module adds mirrors tried in order, local sources, and checks of the
*decompressed* bytes, so a mirror passes whatever its gzip settings.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import zlib
from pathlib import Path
from urllib.parse import unquote, urlparse

import pooch

from pipeline.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
HTTP_TIMEOUT_SECONDS = 60
CHUNK = 1 << 20


class DownloadError(UserError):
    """One source could not deliver a usable file."""


def join_location(base: str, name: str) -> str:
    """`name` inside the mirror `base` (a URL or a folder)."""
    if base.startswith(("http://", "https://", "file://")):
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


def fetch(location: str, dest: Path, retries: int = 2, progress: bool = True) -> Path:
    """Copy or download `location` (http(s) URL, file:// URL or path) to the file `dest`.

    Raises DownloadError with a short reason when the source cannot be read.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)  # pooch would take a file left by an earlier mirror as done
    if location.startswith(("http://", "https://")):
        return _download(location, dest, retries, progress)
    source = Path(unquote(urlparse(location).path)) if location.startswith("file://") else Path(location)
    if not source.is_file():
        raise DownloadError(f"{location}: no such file")
    shutil.copyfile(source, dest)
    return dest


def _download(url: str, dest: Path, retries: int, progress: bool) -> Path:
    import requests  # pooch's own dependency; imported late to keep the CLI quick

    # Pooch's per-file INFO lines duplicate the progress bar; keep its warnings.
    pooch.get_logger().setLevel(logging.WARNING)
    base, _, name = url.rpartition("/")
    store = pooch.create(path=dest.parent, base_url=base + "/", registry={name: None}, retry_if_failed=retries)
    downloader = pooch.HTTPDownloader(progressbar=progress, timeout=HTTP_TIMEOUT_SECONDS)
    try:
        fetched = Path(store.fetch(name, downloader=downloader))
    except requests.exceptions.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "error"
        raise DownloadError(f"{url}: HTTP {status}") from None
    except requests.exceptions.ConnectionError as exc:
        reason = "connection failed" if "refused" not in str(exc).lower() else "connection refused"
        raise DownloadError(f"{url}: {reason}") from None
    except requests.exceptions.RequestException as exc:
        raise DownloadError(f"{url}: {type(exc).__name__}") from None
    if fetched != dest:
        fetched.replace(dest)
    return dest


def decompress_and_hash(source: Path, dest: Path) -> str:
    """Write `source` to `dest` gunzipped when it is gzip (by its magic bytes, not its name),
    as it is otherwise; return the sha256 of the bytes written.

    A damaged or truncated gzip stream raises DownloadError naming `source`.
    """
    digest = hashlib.sha256()
    with source.open("rb") as raw:
        compressed = raw.read(2) == GZIP_MAGIC
    opener = gzip.open if compressed else open
    try:
        with opener(source, "rb") as reader, dest.open("wb") as writer:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                writer.write(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise DownloadError(f"{source.name}: damaged or truncated gzip data ({exc})") from None
    return digest.hexdigest()
