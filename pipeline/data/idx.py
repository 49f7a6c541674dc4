"""The IDX format of MNIST-style datasets: a checked reader.

Layout: two zero bytes, a type code, the rank, then `rank` big-endian uint32 dimensions,
then the values, big-endian, row-major. See http://yann.lecun.com/exdb/mnist/.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from pipeline.errors import UserError

IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxError(UserError):
    """The bytes are not a well-formed IDX file of the expected shape."""


def parse_idx(data: bytes, name: str, rank: int | None = None) -> np.ndarray:
    """Decode IDX bytes to an array (native byte order); `name` is used in errors.

    Checks the magic number, element type, rank (when `rank` is given), dimensions and the
    exact byte length, so a truncated, padded or foreign file is an IdxError naming `name`.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxError(f"{name}: not an IDX file (bad magic number {data[:4].hex() or 'none'})")
    type_code, file_rank = data[2], data[3]
    if type_code not in IDX_TYPES:
        raise IdxError(f"{name}: not an IDX file (unknown element type 0x{type_code:02x})")
    if file_rank == 0 or (rank is not None and file_rank != rank):
        expected = f"rank {rank}" if rank is not None else "rank >= 1"
        raise IdxError(f"{name}: IDX rank is {file_rank}, expected {expected}")
    header = 4 + 4 * file_rank
    if len(data) < header:
        raise IdxError(f"{name}: truncated IDX header ({len(data)} bytes)")
    dims = struct.unpack(f">{file_rank}I", data[4:header])
    if 0 in dims:
        raise IdxError(f"{name}: IDX dimensions {dims} hold no data")
    dtype = IDX_TYPES[type_code]
    expected_length = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected_length:
        problem = "truncated" if len(data) < expected_length else "has trailing bytes"
        raise IdxError(f"{name}: {problem}: {len(data)} bytes, the IDX header {dims} needs {expected_length}")
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return values.astype(dtype.newbyteorder("="), copy=False)
