"""download_weights: VGG16's notop ImageNet weights (or a file of the user's), checked.

Writes data/raw/weights/vgg16_notop.h5, or nothing at all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline import catalog
from pipeline.data.download import DownloadError, fetch
from pipeline.errors import UserError
from pipeline.files import atomic_path, check_sha256
from pipeline.params import Vgg16Params, load_params

STAGE = catalog.STAGES["download_weights"]
OUT = catalog.WEIGHTS
# The Keras release that `keras.applications.VGG16(weights="imagenet", include_top=False)` uses.
IMAGENET_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
)
IMAGENET_MD5 = "6d6bbae143d832006294945121d1f1fc"


def check_digest(path: Path, p: Vgg16Params) -> None:
    """The Keras release by its published md5; any other file by vgg16.weights_sha256."""
    if p.weights == "imagenet":
        with path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "md5").hexdigest()
        if digest != IMAGENET_MD5:
            raise UserError(f"{IMAGENET_URL}: md5 is {digest}, Keras publishes {IMAGENET_MD5}")
    elif p.weights_sha256:
        check_sha256(path, p.weights_sha256, p.weights, "vgg16.weights_sha256")


def download_weights(p: Vgg16Params, out: Path = OUT) -> None:
    """Fetch, check the digest, check that the file loads into VGG16, write atomically."""
    from pipeline.models.vgg import build_conv_base

    location = IMAGENET_URL if p.weights == "imagenet" else p.weights
    with atomic_path(out) as temp:
        try:
            fetch(location, temp)
        except DownloadError as exc:
            raise UserError(f"vgg16.weights: {exc}; check it, or give a URL or local path") from None
        check_digest(temp, p)
        # The shapes of the conv kernels do not depend on the input size: check on a small one.
        try:
            build_conv_base(str(temp), (32, 32, 3))
        except UserError as exc:
            raise UserError(str(exc).replace(str(temp), location)) from None


def run(params_file: Path) -> None:
    params = load_params(params_file)
    from pipeline.tracking import tracked

    with tracked(STAGE, params):
        download_weights(params.vgg16)
