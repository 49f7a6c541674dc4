"""Archives, class folders, decoding and splitting, on tiny images made here."""

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import (
    UndecodableImage,
    decode_folder,
    decode_image,
    extract_archive,
    find_class_folders,
    stratified_split,
)
from pipeline.errors import UserError

RED = (220, 30, 30)


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    """A smooth RGB picture (noise would make JPEG comparisons meaningless)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 128, 3)
    pixels = np.stack([base[0] + x * 2, base[1] + y * 3, base[2] + (x + y)], axis=-1)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def jpeg(**kwargs) -> bytes:
    return encode(photo(**kwargs), "JPEG", quality=95)


# --------------------------------------------------------------------------- decode_image


def test_decode_jpeg_to_square_rgb():
    out = decode_image(jpeg(width=64, height=48), ".jpg", 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    expected = np.asarray(photo(64, 48).resize((16, 16), Image.Resampling.BILINEAR))
    assert np.abs(out.astype(int) - expected).mean() < 3


def test_decode_png_is_exact_bilinear_resize():
    img = photo(50, 20)
    out = decode_image(encode(img, "PNG"), ".PNG", 10)  # extensions are case-insensitive
    np.testing.assert_array_equal(out, np.asarray(img.resize((10, 10), Image.Resampling.BILINEAR)))


def test_grayscale_jpeg_becomes_rgb():
    out = decode_image(encode(photo().convert("L"), "JPEG"), ".jpg", 8)
    assert out.shape == (8, 8, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_cmyk_jpeg_is_converted_not_dropped():
    cmyk = Image.new("RGB", (24, 24), RED).convert("CMYK")
    out = decode_image(encode(cmyk, "JPEG", quality=95), ".jpeg", 8)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(axis=0), RED, atol=6)


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA"])
def test_other_modes_become_rgb(mode):
    img = Image.new("RGB", (12, 12), RED).convert(mode, palette=Image.Palette.ADAPTIVE)
    out = decode_image(encode(img, "PNG"), ".png", 6)
    assert out.shape == (6, 6, 3)
    if mode != "LA":
        np.testing.assert_allclose(out.reshape(-1, 3).mean(axis=0), RED, atol=1)


def test_sixteen_bit_png_is_scaled_not_clipped():
    img = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    out = decode_image(encode(img, "PNG"), ".png", 4)
    assert np.all(out == 128)


def test_exif_orientation_is_applied():
    """A portrait photo stored sideways (orientation 6) comes out upright."""
    upright = np.zeros((40, 20, 3), np.uint8)
    upright[:10] = 255  # white top band
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(stored, "JPEG", exif=exif, quality=95), ".jpg", 8)
    assert out[0].mean() > 200 and out[-1].mean() < 50


@pytest.mark.parametrize(
    "data, suffix, reason",
    [
        (b"", ".jpg", "empty file"),
        (b"Thumbs.db is an OLE file, not a picture", ".db", "not an image"),
        (jpeg()[:300], ".jpg", "corrupt or truncated JPEG"),
        (jpeg()[:-40], ".jpg", "corrupt or truncated JPEG"),
        (encode(photo(), "PNG"), ".jpg", "PNG data named .jpg"),
        (jpeg(), ".png", "JPEG data named .png"),
    ],
    ids=["empty", "not-image", "cut-in-header", "cut-in-data", "png-as-jpg", "jpg-as-png"],
)
def test_undecodable(data, suffix, reason):
    with pytest.raises(UndecodableImage) as err:
        decode_image(data, suffix, 8)
    assert err.value.reason == reason


def test_corrupt_jpeg_fails():
    """A broken Huffman table only shows when the pixels are decoded, not when opened."""
    data = bytearray(jpeg(width=64, height=64))
    dht = data.index(b"\xff\xc4")
    length = int.from_bytes(data[dht + 2 : dht + 4], "big")
    data[dht + 4 : dht + 2 + length] = b"\xff" * (length - 2)
    Image.open(io.BytesIO(bytes(data)))  # the header still parses
    with pytest.raises(UndecodableImage, match="corrupt or truncated JPEG"):
        decode_image(bytes(data), ".jpg", 8)


def test_unknown_extension_is_judged_by_content():
    assert decode_image(jpeg(), "", 8).shape == (8, 8, 3)


# --------------------------------------------------------------------------- folders


def write_classes(root: Path, counts: dict[str, int]) -> None:
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.jpg").write_bytes(jpeg(seed=i))


def test_find_class_folders_descends_wrappers(tmp_path):
    write_classes(tmp_path / "archive" / "PetImages", {"Dog": 12, "Cat": 3, "Bird": 2})
    (tmp_path / "archive" / "readme.txt").write_text("licence beside the wrapper")
    (tmp_path / "archive" / "PetImages" / "Cat" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "archive" / "PetImages" / "Cat" / "nested").mkdir()
    (tmp_path / "archive" / ".hidden").mkdir()
    found = find_class_folders(tmp_path)
    assert list(found) == ["Bird", "Cat", "Dog"]
    assert [p.name for p in found["Cat"]] == ["0.jpg", "1.jpg", "2.jpg"]
    assert [p.name for p in found["Dog"]][:3] == ["0.jpg", "1.jpg", "2.jpg"]
    assert [p.name for p in found["Dog"]][-2:] == ["10.jpg", "11.jpg"]  # natural order


def test_empty_class_folder_is_named(tmp_path):
    write_classes(tmp_path, {"cat": 1, "dog": 0})
    with pytest.raises(UserError, match=r"dog.* has no files"):
        find_class_folders(tmp_path)


def test_single_class_is_refused(tmp_path):
    write_classes(tmp_path / "PetImages", {"cat": 2})
    (tmp_path / "PetImages" / "cat" / "sub").mkdir()  # descends into cat: 1 folder, sub: 0
    with pytest.raises(UserError, match="one subfolder per class"):
        find_class_folders(tmp_path)


def test_decode_folder_keeps_good_and_reports_bad(tmp_path):
    write_classes(tmp_path, {"cat": 3, "dog": 2})
    (tmp_path / "cat" / "666.jpg").write_bytes(b"")
    (tmp_path / "dog" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 OLE")
    (tmp_path / "dog" / "11702.jpg").write_bytes(jpeg()[:200])
    (tmp_path / "dog" / "gray.jpg").write_bytes(encode(photo().convert("L"), "JPEG"))
    images, labels, names, report = decode_folder(find_class_folders(tmp_path), 8, progress=False)
    assert names == ["cat", "dog"]
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert report["kept"] == {"cat": 3, "dog": 3}
    assert report["skipped"] == 3
    assert report["skipped_by_reason"] == {
        "corrupt or truncated JPEG": 1, "empty file": 1, "not an image": 1,
    }  # fmt: skip
    assert {"file": "cat/666.jpg", "reason": "empty file"} in report["skipped_examples"]
    np.testing.assert_array_equal(images[0], decode_image(jpeg(seed=0), ".jpg", 8))


# --------------------------------------------------------------------------- archives


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info in members:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def test_extract_zip_and_find_classes(tmp_path):
    members = {"PetImages/Cat/1.jpg": jpeg(), "PetImages/Dog/1.jpg": jpeg()}
    archive = make_zip(tmp_path / "a.zip", members)
    extract_archive(archive, tmp_path / "out")
    assert list(find_class_folders(tmp_path / "out")) == ["Cat", "Dog"]


def test_extract_tar(tmp_path):
    members = [tarfile.TarInfo("d/a/1.jpg"), tarfile.TarInfo("d/b/1.jpg")]
    archive = make_tar(tmp_path / "a.tar.gz", members, {"d/a/1.jpg": jpeg(), "d/b/1.jpg": jpeg()})
    extract_archive(archive, tmp_path / "out")
    assert (tmp_path / "out" / "d" / "b" / "1.jpg").read_bytes() == jpeg()


@pytest.mark.parametrize(
    "name, why",
    [
        ("../evil.jpg", "'..'"),
        ("ok/../../evil.jpg", "'..'"),
        ("..\\evil.jpg", "'..'"),
        ("/tmp/evil.jpg", "absolute"),
        ("C:/evil.jpg", "absolute"),
    ],
)
def test_zip_escaping_members_are_refused(tmp_path, name, why):
    archive = make_zip(tmp_path / "a.zip", {"fine/1.jpg": b"x", name: b"evil"})
    with pytest.raises(UserError, match=why) as err:
        extract_archive(archive, tmp_path / "out")
    assert repr(name) in str(err.value)
    assert not (tmp_path / "out" / "fine").exists()  # checked before anything is written
    assert not (tmp_path / "evil.jpg").exists()


def test_zip_symlink_is_refused(tmp_path):
    link = zipfile.ZipInfo("cats/link.jpg")
    link.external_attr = (0o120777 << 16)  # S_IFLNK, as `zip --symlinks` records it
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(UserError, match="cats/link.jpg"):
        extract_archive(tmp_path / "a.zip", tmp_path / "out")


@pytest.mark.parametrize(
    "kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]
)
def test_tar_links_and_devices_are_refused(tmp_path, kind):
    special = tarfile.TarInfo("cats/special.jpg")
    special.type = kind
    special.linkname = "/etc/passwd"
    members = [tarfile.TarInfo("cats/1.jpg"), special]
    archive = make_tar(tmp_path / "a.tgz", members, {"cats/1.jpg": b"x"})
    with pytest.raises(UserError, match="cats/special.jpg"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "cats").exists()


def test_tar_absolute_member_is_refused(tmp_path):
    archive = make_tar(tmp_path / "a.tar", [tarfile.TarInfo("/abs/1.jpg")], {"/abs/1.jpg": b"x"})
    with pytest.raises(UserError, match="absolute"):
        extract_archive(archive, tmp_path / "out")


def test_not_an_archive(tmp_path):
    (tmp_path / "page.html").write_text("<html>captcha</html>")
    with pytest.raises(UserError, match="not a zip or tar"):
        extract_archive(tmp_path / "page.html", tmp_path / "out")


# --------------------------------------------------------------------------- splitting

PER_CLASS = {"train": 5, "validation": 2, "test": 3}


def test_stratified_split_is_disjoint_balanced_and_seeded():
    labels = np.array([0] * 12 + [1] * 10 + [2] * 11)
    splits = stratified_split(labels, ["a", "b", "c"], PER_CLASS, seed=7)
    assert list(splits) == ["train", "validation", "test"]
    for split, count in PER_CLASS.items():
        assert np.bincount(labels[splits[split]], minlength=3).tolist() == [count] * 3
    everything = np.concatenate(list(splits.values()))
    assert len(np.unique(everything)) == len(everything)
    again = stratified_split(labels, ["a", "b", "c"], PER_CLASS, seed=7)
    assert all(np.array_equal(splits[s], again[s]) for s in splits)
    other = stratified_split(labels, ["a", "b", "c"], PER_CLASS, seed=8)
    assert not np.array_equal(splits["train"], other["train"])


def test_too_few_images_names_the_class():
    labels = np.array([0] * 12 + [1] * 9)
    with pytest.raises(UserError, match=r"'dog' has 9 usable images .*per_class asks for 10"):
        stratified_split(labels, ["cat", "dog"], PER_CLASS, seed=0)
