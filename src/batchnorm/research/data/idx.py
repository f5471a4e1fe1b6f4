"""IDX files (the MNIST format), read and validated; gzipped or not.

Layout: a 4-byte magic ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32
sizes, then the values, big-endian, row-major. Every error names the file and says what was
expected and what was found.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["IDXError", "read_idx", "write_idx", "IDX_DTYPES"]

# dtype code (third magic byte) -> numpy dtype, big-endian as the format stores it
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}


class IDXError(ValueError):
    """A file that is not a well-formed IDX file (or not the one expected)."""


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":  # gzip magic: decompress whatever the file is called
                try:
                    return gzip.decompress(f.read())
                except (OSError, EOFError) as e:
                    raise IDXError(f"{path}: corrupt or truncated gzip data ({e})") from e
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {path}") from None


def read_idx(
    path: str | os.PathLike,
    *,
    expect_ndim: int | None = None,
    expect_shape: tuple[int | None, ...] | None = None,
    expect_dtype: np.dtype | str | None = None,
) -> np.ndarray:
    """Read an IDX file into a native-endian numpy array, checking it fully.

    ``expect_ndim``, ``expect_shape`` (``None`` entries match any size) and ``expect_dtype``
    reject a well-formed file of the wrong kind (e.g. labels passed as images).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXError(f"{path}: too short for an IDX header ({len(data)} bytes, need at least 4)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise IDXError(
            f"{path}: bad magic number 0x{data[:4].hex()}; an IDX file starts with two zero bytes"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise IDXError(f"{path}: unknown IDX dtype code 0x{code:02x} (expected one of {known})")
    if ndim == 0:
        raise IDXError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(
            f"{path}: truncated header: {ndim} dimensions need {header} bytes, got {len(data)}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got != want:
        kind = "truncated" if got < want else "has trailing bytes"
        raise IDXError(
            f"{path}: {kind}: header says shape {shape} of {dtype.newbyteorder('=').name} "
            f"({want} bytes of data), file has {got}"
        )
    if expect_ndim is not None and ndim != expect_ndim:
        raise IDXError(f"{path}: expected {expect_ndim} dimensions, got {ndim} (shape {shape})")
    if expect_shape is not None and (
        len(expect_shape) != ndim
        or any(e is not None and e != s for e, s in zip(expect_shape, shape, strict=True))
    ):
        want_s = "(" + ", ".join("*" if e is None else str(e) for e in expect_shape) + ")"
        raise IDXError(f"{path}: expected shape {want_s}, got {shape}")
    if expect_dtype is not None and np.dtype(expect_dtype) != dtype.newbyteorder("="):
        raise IDXError(
            f"{path}: expected dtype {np.dtype(expect_dtype).name}, got {dtype.newbyteorder('=').name}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file, atomically; gzip when ``compress`` (default: name ends .gz)."""
    path = Path(path)
    arr = np.asarray(array)
    key = arr.dtype.newbyteorder("=")
    if key not in _CODES:
        raise TypeError(
            f"write_idx: dtype {arr.dtype} has no IDX code (use one of uint8, int8, int16, int32, float32, float64)"
        )
    if arr.ndim == 0 or arr.ndim > 255:
        raise ValueError(f"write_idx: need 1 to 255 dimensions, got {arr.ndim}")
    code = _CODES[key]
    raw = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        raw = gzip.compress(raw, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
