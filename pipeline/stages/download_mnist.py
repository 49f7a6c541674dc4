"""download_mnist: the four IDX files from the first mirror that serves each one intact.

Writes data/raw/mnist/{train_images,train_labels,test_images,test_labels}.idx, decompressed
and checked (sha256 of the decompressed bytes, IDX header and length), or nothing at all.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import catalog
from pipeline.data.download import DownloadError, decompress_and_hash, fetch, join_location
from pipeline.data.idx import IdxError, parse_idx
from pipeline.errors import UserError
from pipeline.files import atomic_path
from pipeline.params import MnistParams, RemoteFile, load_params

STAGE = catalog.STAGES["download_mnist"]
OUT = catalog.MNIST_RAW
RANKS = {"train_images": 3, "train_labels": 1, "test_images": 3, "test_labels": 1}


def fetch_checked(key: str, remote: RemoteFile, mirrors: list[str], dest: Path, retries: int) -> None:
    """Try each mirror in turn until one gives a file that passes every check."""
    failures: list[str] = []
    download = dest.with_name(dest.name + ".download")
    for mirror in mirrors:
        location = join_location(mirror, remote.name)
        try:
            fetch(location, download, retries=retries)
            digest = decompress_and_hash(download, dest)
            if remote.sha256 and digest != remote.sha256.lower():
                raise DownloadError(
                    f"sha256 of the decompressed bytes is {digest[:12]}..., "
                    f"mnist.files.{key}.sha256 expects {remote.sha256[:12]}..."
                )
            parse_idx(dest.read_bytes(), remote.name, rank=RANKS[key])
            return
        except (DownloadError, IdxError) as exc:
            reason = str(exc).removeprefix(location + ": ").removeprefix(remote.name + ": ")
            failures.append(f"{location}: {reason}")
        finally:
            download.unlink(missing_ok=True)
    raise UserError(
        f"{remote.name}: no mirror in mnist.mirrors gave a valid file ({'; '.join(failures)}); "
        "check the mirrors and hashes in params.yaml"
    )


def download_mnist(p: MnistParams, out: Path = OUT) -> None:
    """Fetch, check and write all four files into `out`, atomically as one folder."""
    with atomic_path(out, directory=True) as staging:
        for key in RANKS:
            remote: RemoteFile = getattr(p.files, key)
            fetch_checked(key, remote, p.mirrors, staging / f"{key}.idx", p.retries)


def run(params_file: Path) -> None:
    params = load_params(params_file)
    from pipeline.tracking import tracked

    with tracked(STAGE, params):
        download_mnist(params.mnist)
