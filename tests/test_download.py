"""download_mnist against a loopback HTTP server: the real pooch download code runs."""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.params import MnistParams
from pipeline.stages.download_mnist import download_mnist

from conftest import MNIST_NAMES, dead_url, idx_bytes, write_mnist_mirror


def params(mirrors: list[str], files: dict) -> MnistParams:
    return MnistParams(mirrors=mirrors, files=files, retries=0, validation_size=0)


def leftovers(folder: Path) -> list[str]:
    """Every file below `folder` (empty parent folders do not count)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def test_first_good_mirror_wins_and_files_are_decompressed(http_root, workdir):
    root, url = http_root
    files = write_mnist_mirror(root / "mnist")
    out = workdir / "data/raw/mnist"
    download_mnist(params([dead_url(), url + "/mnist/"], files), out)
    assert sorted(p.name for p in out.iterdir()) == [
        "test_images.idx", "test_labels.idx", "train_images.idx", "train_labels.idx",
    ]
    raw = (out / "train_images.idx").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == files["train_images"]["sha256"]
    names = sorted(p.name for p in out.iterdir())
    assert leftovers(workdir / "data/raw") == [f"mnist/{n}" for n in names]


def test_any_faithful_mirror_passes_whatever_its_compression(http_root, workdir):
    root, url = http_root
    files = write_mnist_mirror(root / "mnist")
    for name in MNIST_NAMES.values():  # recompress with other settings: different gz bytes
        path = root / "mnist" / name
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=1, mtime=99))
    download_mnist(params([url + "/mnist"], files), workdir / "out")
    assert (workdir / "out/test_labels.idx").exists()


def test_local_folder_and_file_url_mirrors(tmp_path, workdir):
    files = write_mnist_mirror(tmp_path / "mirror")
    download_mnist(params([str(tmp_path / "mirror")], files), workdir / "a")
    download_mnist(params([(tmp_path / "mirror").as_uri()], files), workdir / "b")
    assert (workdir / "a/train_labels.idx").read_bytes() == (workdir / "b/train_labels.idx").read_bytes()


def test_truncated_file_falls_back_to_the_next_mirror(http_root, workdir):
    root, url = http_root
    files = write_mnist_mirror(root / "good")
    write_mnist_mirror(root / "bad")
    bad = root / "bad" / MNIST_NAMES["train_images"]
    bad.write_bytes(bad.read_bytes()[:-100])
    download_mnist(params([url + "/bad/", url + "/good/"], files), workdir / "out")
    assert (workdir / "out/train_images.idx").exists()


def expect_failure(mnist: MnistParams, workdir: Path, *fragments: str) -> str:
    with pytest.raises(UserError) as caught:
        download_mnist(mnist, workdir / "data/raw/mnist")
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert leftovers(workdir / "data") == [], "a failed download must leave nothing behind"
    return message


def test_truncated_everywhere_is_one_clear_error(http_root, workdir):
    root, url = http_root
    files = write_mnist_mirror(root / "mnist")
    bad = root / "mnist" / MNIST_NAMES["test_images"]
    bad.write_bytes(bad.read_bytes()[:-100])
    expect_failure(params([url + "/mnist/"], files), workdir, "t10k-images-idx3-ubyte.gz", "truncated")


def test_checksum_mismatch(http_root, workdir):
    root, url = http_root
    files = write_mnist_mirror(root / "mnist")
    files["train_labels"]["sha256"] = "0" * 64
    expect_failure(
        params([url + "/mnist/"], files), workdir,
        "train-labels-idx1-ubyte.gz", "sha256", "mnist.files.train_labels.sha256",
    )


def test_no_mirror_reachable(workdir):
    files = {key: {"name": name, "sha256": None} for key, name in MNIST_NAMES.items()}
    message = expect_failure(params([dead_url(), dead_url()], files), workdir, "no mirror", "connection")
    assert message.count("127.0.0.1") == 2


def test_missing_file_is_http_404(http_root, workdir):
    root, url = http_root
    files = write_mnist_mirror(root / "mnist")
    (root / "mnist" / MNIST_NAMES["test_labels"]).unlink()
    expect_failure(params([url + "/mnist/"], files), workdir, "HTTP 404")


def test_gzip_that_is_not_idx(http_root, workdir):
    root, url = http_root
    files = write_mnist_mirror(root / "mnist")
    (root / "mnist" / MNIST_NAMES["train_images"]).write_bytes(gzip.compress(b"<html>not found</html>"))
    files["train_images"]["sha256"] = None  # unchecked: the IDX check must still catch it
    expect_failure(params([url + "/mnist/"], files), workdir, "train-images-idx3-ubyte.gz", "not an IDX file")


def test_labels_in_place_of_images_is_a_rank_error(http_root, workdir):
    root, url = http_root
    files = write_mnist_mirror(root / "mnist")
    labels = np.zeros(10, np.uint8)
    (root / "mnist" / MNIST_NAMES["train_images"]).write_bytes(gzip.compress(idx_bytes(labels)))
    files["train_images"]["sha256"] = None
    expect_failure(params([url + "/mnist/"], files), workdir, "rank is 1, expected rank 3")
