"""Photo archives and folders: safe extraction, class discovery, decoding, stratified splits.

Used by the `download_images` and `prepare_images` stages. `extract_archive` writes into
the folder it is given, `find_class_folders` and `decode_folder` read the files they are
given; `decode_image` and `stratified_split` are pure.
"""

from __future__ import annotations

import io
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm

from pipeline.errors import UserError

# A truncated JPEG must fail, not come back with a grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Extension (lower case) -> the format Pillow must find inside; a mismatch is skipped.
EXPECTED_FORMAT = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG",
    ".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP",
    ".tif": "TIFF", ".tiff": "TIFF",
}  # fmt: skip

# How many skipped files the report names one by one; the counts cover all of them.
MAX_SKIPPED_EXAMPLES = 20

# What Pillow raises on damaged data, besides OSError (which covers UnidentifiedImageError).
_PILLOW_DATA_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError,
)  # fmt: skip


class UndecodableImage(Exception):
    """A file that cannot be used as a training image; `reason` is short and human."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- archives


def extract_archive(archive: Path, dest: Path) -> None:
    """Extract a zip or tar (.gz/.bz2/.xz) `archive` into the folder `dest`.

    Every member is checked before anything is written: an absolute path, a `..`
    component, a link or a device raises UserError naming the member, so that nothing
    can land outside `dest`.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, dest)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, dest)
    else:
        raise UserError(f"{archive} is not a zip or tar archive, or is truncated: check images.url")


def _extract_zip(archive: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                file_type = stat.S_IFMT(info.external_attr >> 16)
                # 0 = no Unix mode recorded (archives made on Windows): a plain file or dir.
                if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
                    _refuse(archive, info.filename, "is a link or special file")
                _check_member_path(archive, info.filename, dest)
            zf.extractall(dest)
    except zipfile.BadZipFile as err:
        raise UserError(f"{archive} is a damaged zip archive ({err}): download it again") from err


def _extract_tar(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for member in members:
                if not (member.isfile() or member.isdir()):
                    _refuse(archive, member.name, "is a link or special file")
                _check_member_path(archive, member.name, dest)
            # The "data" filter (3.12+, and 3.8-3.11 security releases) re-checks the same.
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, members=members, filter="data")
            else:
                tf.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, zlib.error) as err:  # the last two: a cut .tar.gz
        raise UserError(f"{archive} is a damaged tar archive ({err}): download it again") from err


def _check_member_path(archive: Path, name: str, dest: Path) -> None:
    """Refuse a member name that is absolute, climbs with `..` or resolves outside dest."""
    # Archives made on Windows may use backslashes or drive letters: judge by both rules.
    windows = PureWindowsPath(name)
    if PurePosixPath(name).is_absolute() or windows.drive or windows.root:
        _refuse(archive, name, "has an absolute path")
    if ".." in windows.parts:  # PureWindowsPath splits on both / and \
        _refuse(archive, name, "has a '..' path component")
    if not (dest / name).resolve().is_relative_to(dest.resolve()):
        _refuse(archive, name, "would be written outside the destination")


def _refuse(archive: Path, name: str, why: str) -> None:
    raise UserError(
        f"{archive}: member {name!r} {why}; refusing to extract this archive "
        "(use an archive of plain files and folders)"
    )


# --------------------------------------------------------------------------- folders


def find_class_folders(root: Path) -> dict[str, list[Path]]:
    """Find the folder holding one subfolder per class, below `root`.

    Single-folder wrappers are descended (`PetImages/Cat`, `PetImages/Dog`); loose files
    beside a wrapper (a licence, a readme) are ignored. Returns class name -> files,
    class names sorted, files in natural order ("2.jpg" before "10.jpg"). Hidden entries
    are ignored. Fewer than 2 classes, or a class folder without files, is a UserError.
    """
    folder = root
    subfolders = _visible_subfolders(folder)
    while len(subfolders) == 1:
        folder = subfolders[0]
        subfolders = _visible_subfolders(folder)
    if len(subfolders) < 2:
        raise UserError(
            f"{folder} must hold one subfolder per class (at least 2), found {len(subfolders)}: check images.url"
        )
    classes = {}
    for sub in sorted(subfolders, key=lambda p: p.name):
        files = sorted(
            (p for p in sub.iterdir() if p.is_file() and _is_visible(p)),
            key=_natural_key,
        )
        if not files:
            raise UserError(f"class folder {sub} has no files: add images or remove it")
        classes[sub.name] = files
    return classes


def _visible_subfolders(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and _is_visible(p)]


def _is_visible(path: Path) -> bool:
    # __MACOSX holds resource forks that macOS's archiver adds beside the real folders.
    return not path.name.startswith(".") and path.name != "__MACOSX"


def _natural_key(path: Path) -> tuple:
    """Sort key treating digit runs as numbers; the name itself breaks ties."""
    parts = re.split(r"(\d+)", path.name.casefold())
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), path.name


# --------------------------------------------------------------------------- decoding


def decode_image(data: bytes, suffix: str, size: int) -> np.ndarray:
    """Decode image file bytes into a uint8 RGB array of shape (size, size, 3).

    `suffix` is the file's extension (".jpg"); a known image extension must match the
    real format. Grayscale, palette, RGBA, CMYK and 16-bit images are converted to RGB
    (alpha is dropped, as tf.io.decode_image(channels=3) does). The EXIF orientation is
    applied, and the image is stretched to a square with bilinear filtering (no aspect
    preservation, like keras' image_dataset_from_directory).
    Raises UndecodableImage(reason) for empty, unrecognised, mislabelled or damaged data.
    """
    if not data:
        raise UndecodableImage("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise UndecodableImage("too many pixels (over 2x PIL.Image.MAX_IMAGE_PIXELS)") from err
    except _PILLOW_DATA_ERRORS as err:
        known = _sniff_format(data)  # a JPEG cut inside its headers is still a JPEG
        reason = f"corrupt or truncated {known}" if known else "not an image"
        raise UndecodableImage(reason) from err
    expected = EXPECTED_FORMAT.get(suffix.lower())
    if expected is not None and img.format != expected:
        raise UndecodableImage(f"{img.format} data named {suffix.lower()}")
    try:
        return _to_rgb_square(img, size)
    except _PILLOW_DATA_ERRORS as err:
        raise UndecodableImage(f"corrupt or truncated {img.format}") from err


_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF8": "GIF", b"BM": "BMP",
}  # fmt: skip


def _sniff_format(data: bytes) -> str | None:
    """The format announced by the first bytes, for files Pillow cannot even open."""
    return next((fmt for sig, fmt in _SIGNATURES.items() if data.startswith(sig)), None)


def _to_rgb_square(img: Image.Image, size: int) -> np.ndarray:
    transpose = _exif_transpose_method(img)
    if img.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below `size`): DCT scaling
        # averages like a box filter, ~1.5x faster, and differs from a full decode by
        # about 1 grey level on average (measured on the 2,002 Kaggle photos).
        img.draft("RGB", (size, size))
    img.load()  # the full decode: damaged data fails here
    rgb = _as_rgb(img).resize((size, size), Image.Resampling.BILINEAR)
    if transpose is not None:
        # Flips and quarter turns commute with a resize to a square: turning the small
        # image gives the same pixels, cheaper.
        rgb = rgb.transpose(transpose)
    return np.asarray(rgb, dtype=np.uint8)


def _as_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I"):
        # Pillow clips 16-bit values to 255 when converting; scale them down instead.
        scaled = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids Pillow's warning for byte-coded transparency
    return img.convert("RGB")  # handles L, LA, RGBA, CMYK (Adobe-inverted too), YCbCr...


_EXIF_ORIENTATION = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _exif_transpose_method(img: Image.Image) -> Image.Transpose | None:
    """The transpose that shows the photo upright, per its EXIF tag; None if none/broken."""
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except _PILLOW_DATA_ERRORS:
        return None  # a damaged EXIF block should not cost us the picture
    return _TRANSPOSE_FOR_ORIENTATION.get(orientation)


def decode_each(
    files_by_class: dict[str, list[Path]],
    size: int,
    keep: Callable[[int, Path, np.ndarray], None],
    progress: bool,
    desc: str = "decoding images",
) -> dict:
    """Decode every file of every class (as found by `find_class_folders`), in order, and
    call `keep(label, path, image)` for each one that decodes (`label` indexes the classes
    in the order of `files_by_class`; `image` is uint8 (size, size, 3)).

    Undecodable files are skipped, never fatal. Returns the report:
    {"kept": {class: n}, "skipped": n, "skipped_by_reason": {reason: n},
     "skipped_examples": [{"file": "Cat/666.jpg", "reason": "empty file"}, ...]}.
    """
    total = sum(len(files) for files in files_by_class.values())
    kept: dict[str, int] = {}
    reasons: Counter[str] = Counter()
    examples: list[dict[str, str]] = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for label, name in enumerate(files_by_class):
            kept[name] = 0
            for path in files_by_class[name]:
                bar.update()
                try:
                    image = decode_image(_read(path), path.suffix, size)
                except UndecodableImage as err:
                    reasons[err.reason] += 1
                    if len(examples) < MAX_SKIPPED_EXAMPLES:
                        examples.append({"file": f"{name}/{path.name}", "reason": err.reason})
                    continue
                keep(label, path, image)
                kept[name] += 1
    return {
        "kept": kept,
        "skipped": sum(reasons.values()),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "skipped_examples": examples,
    }


def decode_folder(
    files_by_class: dict[str, list[Path]], size: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Every decodable file of every class, as arrays (see `decode_each` for the report).

    Returns images uint8 (N, size, size, 3), labels int64 (N,) indexing the class names
    (in the order of `files_by_class`), the class names, and the report.
    """
    total = sum(len(files) for files in files_by_class.values())
    # One allocation of the final size: a list of arrays then np.stack would need twice it.
    images = np.empty((total, size, size, 3), dtype=np.uint8)
    labels = np.empty(total, dtype=np.int64)
    count = 0

    def keep(label: int, path: Path, image: np.ndarray) -> None:
        nonlocal count
        images[count], labels[count] = image, label
        count += 1

    report = decode_each(files_by_class, size, keep, progress)
    # A slice, not a copy: no second buffer of the full size.
    return images[:count], labels[:count], list(files_by_class), report


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UndecodableImage("unreadable file") from err


# --------------------------------------------------------------------------- splitting


def stratified_split(
    labels: np.ndarray, class_names: list[str], per_class: dict[str, int], seed: int
) -> dict[str, np.ndarray]:
    """Pick `per_class[split]` images of every class for each split, disjointly.

    `labels` holds class indices into `class_names`; `per_class` is e.g.
    {"train": 1000, "validation": 500, "test": 1000}. Per class, a seeded random
    permutation is cut into consecutive parts, in the order of `per_class`. Returns
    split -> indices into `labels`, shuffled (deterministically, by `seed`) so that
    classes are interleaved. A class with too few images is a UserError.
    """
    for split, count in per_class.items():
        if count < 0:
            raise UserError(f"images.per_class.{split} is {count}: it must be >= 0")
    wanted = sum(per_class.values())
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in per_class}
    for label, name in enumerate(class_names):
        members = np.flatnonzero(labels == label)
        if len(members) < wanted:
            raise UserError(
                f"class {name!r} has {len(members)} usable images but images.per_class "
                f"asks for {wanted} ({_describe(per_class)}): lower images.per_class"
            )
        chosen = rng.permutation(members)
        start = 0
        for split, count in per_class.items():
            parts[split].append(chosen[start : start + count])
            start += count
    return {split: rng.permutation(np.concatenate(p)) for split, p in parts.items()}


def _describe(per_class: dict[str, int]) -> str:
    return ", ".join(f"{split} {count}" for split, count in per_class.items())
