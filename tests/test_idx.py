import numpy as np
import pytest

from pipeline.data.idx import IdxError, parse_idx

from conftest import idx_bytes


def test_round_trip_and_big_endian_types():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(images), "x", rank=3), images)
    values = np.array([1, -2, 300000], dtype=">i4")
    data = bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + values.tobytes()
    parsed = parse_idx(data, "ints", rank=1)
    assert parsed.tolist() == [1, -2, 300000]
    assert parsed.dtype.byteorder in ("=", "|", "<")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x1f\x8b\x08\x00rest", "bad magic number"),
        (b"", "bad magic number"),
        (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]), "unknown element type 0x07"),
        (idx_bytes(np.zeros((2, 2, 2), np.uint8))[:-1], "truncated"),
        (idx_bytes(np.zeros((2, 2, 2), np.uint8)) + b"\0", "trailing bytes"),
        (idx_bytes(np.zeros(4, np.uint8)), "rank is 1, expected rank 3"),
        (bytes([0, 0, 0x08, 3, 0, 0]), "truncated IDX header"),
    ],
)
def test_foreign_or_damaged_bytes_name_the_file(data, message):
    with pytest.raises(IdxError, match=message) as caught:
        parse_idx(data, "train-images.gz", rank=3)
    assert str(caught.value).startswith("train-images.gz: ")
