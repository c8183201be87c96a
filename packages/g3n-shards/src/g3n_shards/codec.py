"""Array payloads: raw little-endian C-order bytes in one zstd frame, described in the sample JSON.

Why not .npy or pickle: the sample JSON already records dtype and shape, which lets the reader
check them against the kind's rules *before* decompressing, and refuse a frame whose declared
content size differs from what the shape allows (no decompression bomb, nothing unpickled).
zstd's fast level -1 stores noisy mantissa bytes as raw literals and only matches runs (the zero
background): a float16 brain volume decompresses in under 1 ms at ~60 % of the .nii.gz size,
where level 1 saves another 20 % of bytes but decodes 4-5x slower (see tools/bench/shards.py).
"""

from __future__ import annotations

import numpy as np
import zstandard as zstd

from .errors import ShardError

#: Storage dtypes a reader accepts at all (anything else is refused before decoding).
ALLOWED_DTYPES = {"float16", "float32", "float64", "uint8", "int16", "int32", "int64"}
#: Hard ceiling on one decoded array (8 GiB): a paper-size float32 volume is 19.7 MB.
MAX_ARRAY_BYTES = 8 << 30
FLOAT16_MAX = float(np.finfo(np.float16).max)

ZSTD_LEVEL = -1
_cctx = zstd.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True)
_dctx = zstd.ZstdDecompressor()


def choose_dtype(arr: np.ndarray, allowed: tuple[str, ...]) -> str:
    """First allowed dtype that holds ``arr`` without overflow (float16 -> float32 fallback)."""
    for name in allowed:
        if name == "float16":
            if arr.size == 0 or float(np.max(np.abs(arr))) <= FLOAT16_MAX:
                return name
            continue
        if name == "uint8" and arr.size and (arr.min() < 0 or arr.max() > 255):
            continue
        return name
    raise ValueError(f"values do not fit any of {allowed}")


def encode_array(arr: np.ndarray, dtype: str) -> bytes:
    data = np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<"))
    return _cctx.compress(data.tobytes())


def expected_nbytes(dtype: str, shape: list[int]) -> int:
    n = np.dtype(dtype).itemsize
    for s in shape:
        n *= int(s)
    return n


def decode_array(payload: bytes, dtype: str, shape: list[int], where: str) -> np.ndarray:
    """Decode one payload after checking dtype, shape and the frame's declared size."""
    if dtype not in ALLOWED_DTYPES:
        raise ShardError(f"{where}: refused dtype {dtype!r}")
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ShardError(f"{where}: invalid shape {shape!r}")
    nbytes = expected_nbytes(dtype, shape)
    if nbytes > MAX_ARRAY_BYTES:
        raise ShardError(f"{where}: declared array of {nbytes} bytes exceeds the {MAX_ARRAY_BYTES}-byte limit")
    try:
        declared = zstd.frame_content_size(payload)
    except zstd.ZstdError as e:
        raise ShardError(f"{where}: corrupt payload ({e})") from None
    if declared != nbytes:
        raise ShardError(
            f"{where}: payload would decompress to {declared} bytes but dtype {dtype} and shape {shape} allow {nbytes}"
        )
    try:
        raw = _dctx.decompress(payload, max_output_size=nbytes)
    except zstd.ZstdError as e:
        raise ShardError(f"{where}: corrupt payload ({e})") from None
    if len(raw) != nbytes:
        raise ShardError(f"{where}: payload decompressed to {len(raw)} bytes, expected {nbytes}")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
