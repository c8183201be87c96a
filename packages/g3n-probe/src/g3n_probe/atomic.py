"""Atomic file writes: write a temp file beside the target, then os.replace, so a crash never
leaves a half-written results table or probe behind."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from g3n_shards import atomic_write_bytes


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (creating parent folders): the contract's writer."""
    atomic_write_bytes(path, data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Atomic UTF-8 text write."""
    return write_bytes(path, text.encode("utf-8"))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed .npz archive in memory (no object arrays, so it loads without pickle)."""
    buf = io.BytesIO()
    for k, a in arrays.items():
        if np.asarray(a).dtype == object:
            raise TypeError(f"array {k!r} has dtype object; it would need pickle")
    np.savez(buf, **arrays)
    return buf.getvalue()
