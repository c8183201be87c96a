"""Raw reads of a shard set's files, from a path or a WebDataset URL, bounded in size.

Nothing here parses: :func:`read_limited` reads a small file (the manifest, the index) with one
byte to spare so an oversized file is seen, and :func:`read_hashed` reads a shard whole into one
buffer, hashing each block while it is in cache. A missing or unreadable file is a ShardError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ShardError

#: Shards are read (and hashed) in blocks of this size: each block is hashed while in cache.
READ_BLOCK = 1 << 20


def is_url(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if is_url(base) else str(Path(base) / name)


def read_limited(location: str, limit: int, where: str) -> bytes:
    """Read at most ``limit`` bytes (one more to detect excess) from a path or a WebDataset URL."""
    try:
        if is_url(location):
            from webdataset.gopen import gopen

            with gopen(location, "rb") as f:
                return f.read(limit + 1)
        with open(location, "rb") as f:
            return f.read(limit + 1)
    except FileNotFoundError:
        raise ShardError(f"{where}: missing file {location}") from None
    except OSError as e:
        raise ShardError(f"{where}: cannot read {location} ({e})") from None


def read_hashed(location: str, size: int, where: str, digest: Any = None) -> memoryview:
    """Read at most ``size + 1`` bytes from a path or URL into one buffer, feeding each block to
    ``digest`` (a hashlib object) as it arrives; returns a view of what was read (no copy)."""
    buf = bytearray(size + 1)
    view = memoryview(buf)
    n = 0
    try:
        if is_url(location):
            from webdataset.gopen import gopen

            f = gopen(location, "rb")
        else:
            f = open(location, "rb", buffering=0)
        with f:
            readinto = getattr(f, "readinto", None)
            while n < len(buf):
                if readinto is not None:
                    k = readinto(view[n : n + READ_BLOCK])
                else:
                    block = f.read(min(READ_BLOCK, len(buf) - n))
                    k = len(block)
                    view[n : n + k] = block
                if not k:
                    break
                if digest is not None:
                    digest.update(view[n : n + k])
                n += k
    except FileNotFoundError:
        raise ShardError(f"{where}: missing file {location}") from None
    except OSError as e:
        raise ShardError(f"{where}: cannot read {location} ({e})") from None
    return view[:n]
