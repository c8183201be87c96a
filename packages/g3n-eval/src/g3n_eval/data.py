"""The one place g3n-eval reads and writes shard sets and array files (through g3n_shards)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class InputError(ValueError):
    """An input cannot be used; the message names the path and the reason."""


def label_of(value: Any) -> str | None:
    """Categorical value as compared with probe classes (None stays None; 4 -> '4', 3.0 -> '3')."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


@dataclass
class Loaded:
    """Samples of one set, sorted by key: arrays (one per sample), metadata dicts, set digest."""

    path: str
    kind: str
    keys: list[str]
    arrays: list[np.ndarray]
    metas: list[dict[str, Any]]
    digest: str | None
    manifest: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


ARRAY_OF_KIND = {"volumes": "volume", "latents": "latent", "tokens": "tokens"}


def open_set(path: str | Path, kind: str | None = None) -> Any:
    import g3n_shards as gs

    try:
        return gs.ShardSet.open(path, kind=kind)
    except gs.ShardError as e:
        raise InputError(str(e)) from None


def volume_space(manifest: Any, location: str | Path) -> str:
    """The intensity space a volumes set records (:func:`g3n_shards.intensity.intensity_of`);
    :class:`InputError` naming the set when it records none, or one no encoder takes."""
    from g3n_shards.intensity import IntensityError, intensity_of

    try:
        return intensity_of(manifest, str(location))
    except IntensityError as e:
        raise InputError(str(e)) from None


def iter_set(path: str | Path, kind: str | None = None, limit: int | None = None) -> Iterator[tuple[str, dict, np.ndarray]]:
    """(key, metadata dict, main array) per sample, streamed in the set's (deterministic) shard
    order; ``limit`` keeps the first N keys in sorted order, so it names the same samples however
    the set was sharded. Only one shard is in memory at a time."""
    ss = open_set(path, kind)
    name = ARRAY_OF_KIND[ss.kind]
    wanted = set(sorted(ss.keys())[:limit]) if limit else None
    for s in ss:
        if wanted is not None and s.key not in wanted:
            continue
        arr = s.arrays.get(name)
        if arr is None and ss.kind == "tokens":
            arr = s.arrays["mean"]
        yield s.key, s.meta.model_dump(mode="json"), arr


def load_set(path: str | Path, kind: str | None = None, limit: int | None = None) -> Loaded:
    """A whole shard set in memory (evaluation sets are small: 64 samples per class in the paper)."""
    ss = open_set(path, kind)
    keys, arrays, metas = [], [], []
    for k, m, a in iter_set(path, kind, limit):
        keys.append(k)
        metas.append(m)
        arrays.append(a)
    return Loaded(str(path), ss.kind, keys, arrays, metas, ss.digest, ss.manifest)


def load_matrix(path: str | Path, role: str) -> tuple[np.ndarray, list[str], str | None]:
    """(n, ...) array of latents from a ``latents``/``tokens`` shard set or a ``.npy`` file.

    Returns the stacked arrays, sample keys (row numbers for .npy) and a digest."""
    p = Path(path)
    if p.is_file() and p.suffix == ".npy":
        from .records import file_sha256

        try:
            arr = np.load(io.BytesIO(p.read_bytes()), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"{p}: cannot read {role} array: {e}") from None
        return arr, [str(i) for i in range(len(arr))], "sha256:" + file_sha256(p)
    if not (p / "manifest.json").is_file():
        raise InputError(f"{p}: {role} must be a latents/tokens shard set (folder with manifest.json) or a .npy file")
    loaded = load_set(p)
    if loaded.kind == "volumes":
        raise InputError(f"{p}: {role} is a volumes set; the memorisation audit compares latents")
    if not loaded.arrays:
        raise InputError(f"{p}: {role} set is empty")
    shapes = {a.shape for a in loaded.arrays}
    if len(shapes) != 1:
        raise InputError(f"{p}: {role} samples have different shapes {sorted(shapes)}")
    return np.stack(loaded.arrays), loaded.keys, loaded.digest
