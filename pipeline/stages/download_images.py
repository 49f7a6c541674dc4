"""download_images: the photo archive (or folder), checked, extracted safely, every photo
decoded once, and only the ones that decode kept.

Writes data/raw/images/<class>/<file> and data/raw/images_report.json (counts per class,
files skipped and why), or nothing at all.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipeline import catalog
from pipeline.data.download import DownloadError, fetch
from pipeline.data.images import decode_each, extract_archive, find_class_folders
from pipeline.errors import UserError
from pipeline.files import atomic_path, check_sha256, write_json
from pipeline.params import ImagesParams, load_params

STAGE = catalog.STAGES["download_images"]
OUT = catalog.IMAGES_RAW
REPORT = catalog.IMAGES_REPORT
CHECK_SIZE = 32  # decode at a small size: every byte is still decoded, the resize is cheap


def local_folder(location: str) -> Path | None:
    """The folder that `location` names, when it is a folder rather than an archive."""
    if location.startswith(("http://", "https://")):
        return None
    path = Path(unquote(urlparse(location).path)) if location.startswith("file://") else Path(location)
    return path if path.is_dir() else None


def fetch_archive(p: ImagesParams, scratch: Path) -> Path:
    """Download or copy the archive into `scratch` and check its sha256; return its path."""
    archive = scratch / Path(urlparse(p.url).path).name
    try:
        fetch(p.url, archive)
    except DownloadError as exc:
        raise UserError(f"images.url: {exc}; check the URL or use a local copy") from None
    if p.sha256:
        check_sha256(
            archive, p.sha256, archive.name, "images.sha256", "; the download is damaged or not the expected archive"
        )
    return archive


def keep_decodable(files_by_class: dict[str, list[Path]], dest: Path) -> dict:
    """Copy each file that decodes into dest/<class>/; return counts and skip reasons."""
    class_names = list(files_by_class)
    for name in class_names:
        (dest / name).mkdir(parents=True)

    def keep(label: int, path: Path, image: object) -> None:
        shutil.copyfile(path, dest / class_names[label] / path.name)

    report = decode_each(files_by_class, CHECK_SIZE, keep, progress=True, desc="checking photos")
    empty = [name for name, count in report["kept"].items() if count == 0]
    if empty:
        raise UserError(f"images.url: class folder(s) {', '.join(empty)} hold no decodable image")
    return report


def download_images(p: ImagesParams, out: Path = OUT, report_path: Path = REPORT) -> dict:
    """The whole stage: fetch, check, extract, decode-check, write atomically."""
    with atomic_path(out, directory=True) as staging:
        scratch = staging / ".scratch"
        scratch.mkdir()
        source = local_folder(p.url)
        if source is None:
            archive = fetch_archive(p, scratch)
            source = scratch / "extracted"
            try:
                extract_archive(archive, source)
            except UserError as exc:  # name what the user gave, not the scratch copy
                raise UserError(str(exc).replace(str(archive), p.url)) from None
        files_by_class = find_class_folders(source)
        report = keep_decodable(files_by_class, staging)
        shutil.rmtree(scratch)
    report["source"] = {"url": p.url, "sha256": p.sha256}
    write_json(report_path, report)
    skipped = ", ".join(f"{n} {why}" for why, n in report["skipped_by_reason"].items()) or "none"
    print(f"kept {sum(report['kept'].values())} photos in {len(report['kept'])} classes; skipped: {skipped}")
    return report


def run(params_file: Path) -> None:
    params = load_params(params_file)
    import mlflow

    from pipeline.tracking import tracked

    with tracked(STAGE, params):
        report = download_images(params.images)
        mlflow.log_metrics({"photos_kept": sum(report["kept"].values()), "photos_skipped": report["skipped"]})
