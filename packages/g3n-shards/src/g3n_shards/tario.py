"""Deterministic tar writing and defensive tar reading.

Shards may come from elsewhere, so the reader trusts nothing: member names must be flat and
safe (no absolute paths, no ``..``, no directories), only regular files are accepted, no
member may be larger than the shard itself, and nothing is ever extracted to disk.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator

from .errors import ShardError

_MEMBER = re.compile(r"^[A-Za-z0-9_-]{1,200}\.[A-Za-z0-9_.]{1,40}$")


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one file with fixed mtime/owner/mode so equal inputs give byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def check_member_name(name: str, where: str) -> tuple[str, str]:
    """Split ``key.suffix``; refuse anything that is not a flat, safe member name."""
    if name.startswith("/") or "\\" in name or "/" in name or ".." in name.split(".") or name.startswith(".."):
        raise ShardError(f"{where}: refused hostile member name {name!r}")
    if not _MEMBER.match(name):
        raise ShardError(f"{where}: refused member name {name!r} (expected KEY.SUFFIX with safe characters)")
    key, suffix = name.split(".", 1)
    return key, suffix


class _BufferFile:
    """A read-only, seekable file over an in-memory buffer that does not copy it (``io.BytesIO``
    copies anything but ``bytes``): tarfile reads only the 512-byte headers through it."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        out = self._view[self._pos : end].tobytes()
        self._pos = max(self._pos, end)
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos


def iter_members(data: bytes | bytearray | memoryview, where: str) -> Iterator[tuple[str, str, memoryview]]:
    """Yield (key, suffix, bytes) for each member of an in-memory tar, refusing anything odd.
    Payloads are zero-copy views into ``data`` (tarfile only parses the headers)."""
    view = memoryview(data).cast("B")
    try:
        with tarfile.open(fileobj=_BufferFile(view), mode="r:") as tar:  # type: ignore[call-overload]
            for info in tar:
                if not info.isreg():
                    raise ShardError(f"{where}: refused non-regular member {info.name!r} (type {info.type!r})")
                key, suffix = check_member_name(info.name, where)
                end = info.offset_data + info.size
                if info.size < 0 or end > len(view):
                    raise ShardError(f"{where}: truncated member {info.name!r} ({info.size} bytes claimed)")
                yield key, suffix, view[info.offset_data : end]
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"{where}: unreadable tar ({e}): truncated or corrupt shard") from None


def group_samples(members: Iterator[tuple[str, str, memoryview]], where: str) -> Iterator[tuple[str, dict[str, memoryview]]]:
    """Group consecutive members by key (the WebDataset layout). A key may not reappear later."""
    seen: set[str] = set()
    current: str | None = None
    parts: dict[str, memoryview] = {}
    for key, suffix, payload in members:
        if key != current:
            if current is not None:
                yield current, parts
            if key in seen:
                raise ShardError(f"{where}: key {key!r} appears in two places")
            seen.add(key)
            current, parts = key, {}
        if suffix in parts:
            raise ShardError(f"{where}: duplicate member {key}.{suffix}")
        parts[suffix] = payload
    if current is not None:
        yield current, parts
