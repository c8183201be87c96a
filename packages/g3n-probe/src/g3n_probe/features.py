"""Feature sets: a matrix of per-volume features, their sample keys and metadata.

The panel core only sees :class:`FeatureSet`. Two sources make one:

* a g3n-shards set (``tokens``: the ``mean`` array, or the mean of ``tokens``;
  ``latents``: ``latent`` flattened or averaged over tokens), read in :mod:`g3n_probe.shardio`;
* a *feature table* folder, for features from any other encoder: ``features.npz`` with
  ``keys`` (N strings) and ``features`` (N x D), plus ``metadata.jsonl`` with one JSON object
  per sample (``key`` and g3n-shards metadata fields). :func:`write_feature_table` makes one.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import npz_bytes, write_bytes, write_text


class FeatureSourceError(ValueError):
    """A feature source cannot be read; the message names the file and the reason."""


@dataclass
class FeatureSet:
    """Features (N x D), sorted by sample key, with one metadata mapping per sample."""

    name: str
    X: np.ndarray
    keys: list[str]
    records: list[dict[str, Any]]
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.X = np.asarray(self.X)
        if self.X.ndim != 2:
            raise FeatureSourceError(f"{self.name}: features must be 2-D (N, D), got shape {self.X.shape}")
        if not (len(self.keys) == len(self.records) == self.X.shape[0]):
            raise FeatureSourceError(
                f"{self.name}: {self.X.shape[0]} feature rows, {len(self.keys)} keys, {len(self.records)} metadata records"
            )
        if len(set(self.keys)) != len(self.keys):
            raise FeatureSourceError(f"{self.name}: duplicate sample keys")
        if not np.isfinite(self.X).all():
            bad = [self.keys[i] for i in np.flatnonzero(~np.isfinite(self.X).all(axis=1))[:5]]
            raise FeatureSourceError(f"{self.name}: non-finite feature values in sample(s) {bad}")
        order = np.argsort(np.asarray(self.keys, dtype=str), kind="stable")
        if (order != np.arange(len(order))).any():
            self.X = self.X[order]
            self.keys = [self.keys[i] for i in order]
            self.records = [self.records[i] for i in order]
        for k, r in zip(self.keys, self.records):
            r.setdefault("key", k)

    @property
    def dim(self) -> int:
        return int(self.X.shape[1])

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, keys: Sequence[str]) -> "FeatureSet":
        """The samples named by ``keys`` (kept in key order)."""
        pos = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in pos]
        if missing:
            raise KeyError(f"{self.name}: no sample(s) {missing[:5]}")
        idx = np.asarray(sorted(pos[k] for k in keys), dtype=np.int64)
        return FeatureSet(self.name, self.X[idx], [self.keys[i] for i in idx], [self.records[i] for i in idx], dict(self.source))


def from_arrays(
    X: np.ndarray, records: Sequence[Mapping[str, Any]], name: str = "features", keys: Sequence[str] | None = None
) -> FeatureSet:
    """A FeatureSet from a matrix and metadata mappings (keys from ``records[i]['key']`` if not given)."""
    recs = [_as_record(r) for r in records]
    if keys is None:
        try:
            keys = [str(r["key"]) for r in recs]
        except KeyError as e:
            raise FeatureSourceError(f"{name}: records need a 'key' when keys are not given") from e
    return FeatureSet(name, np.asarray(X), list(map(str, keys)), recs, {"type": "arrays"})


def _as_record(r: Any) -> dict[str, Any]:
    if hasattr(r, "model_dump"):
        return dict(r.model_dump())
    if isinstance(r, Mapping):
        return dict(r)
    raise FeatureSourceError(f"metadata record of type {type(r).__name__} is neither a mapping nor a pydantic model")


def write_feature_table(folder: str | Path, X: np.ndarray, keys: Sequence[str], records: Sequence[Any]) -> Path:
    """Write a feature-table folder (``features.npz`` + ``metadata.jsonl``), atomically."""
    folder = Path(folder)
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] != len(keys) or len(keys) != len(records):
        raise FeatureSourceError(f"{folder}: need X (N, D) with N keys and N records; got {X.shape}, {len(keys)}, {len(records)}")
    lines = []
    for k, r in zip(keys, records):
        rec = _as_record(r)
        rec["key"] = str(k)
        lines.append(json.dumps(rec, sort_keys=True, default=str))
    write_text(folder / "metadata.jsonl", "\n".join(lines) + "\n")
    write_bytes(folder / "features.npz", npz_bytes({"keys": np.asarray(list(map(str, keys)), dtype=str), "features": X}))
    return folder


def load_feature_table(folder: str | Path, name: str | None = None) -> FeatureSet:
    """Read a feature-table folder; rows and metadata lines are matched by key."""
    folder = Path(folder)
    npz, meta = folder / "features.npz", folder / "metadata.jsonl"
    try:
        with np.load(io.BytesIO(npz.read_bytes()), allow_pickle=False) as z:
            if "keys" not in z or "features" not in z:
                raise FeatureSourceError(f"{npz}: needs arrays 'keys' and 'features', has {sorted(z.files)}")
            keys = [str(k) for k in z["keys"]]
            X = z["features"]
    except FeatureSourceError:
        raise
    except (OSError, ValueError) as e:
        raise FeatureSourceError(f"{npz}: cannot read features: {e}") from e
    records: dict[str, dict[str, Any]] = {}
    try:
        text = meta.read_text()
    except OSError as e:
        raise FeatureSourceError(f"{meta}: cannot read metadata: {e}") from e
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FeatureSourceError(f"{meta}:{n}: not valid JSON: {e}") from e
        if not isinstance(rec, dict) or "key" not in rec:
            raise FeatureSourceError(f"{meta}:{n}: each line must be an object with a 'key'")
        records[str(rec["key"])] = _validate(rec, f"{meta}:{n}")
    missing = [k for k in keys if k not in records]
    if missing:
        raise FeatureSourceError(f"{meta}: no metadata for {len(missing)} sample(s), e.g. {missing[:3]}")
    return FeatureSet(
        name or folder.name,
        X,
        keys,
        [records[k] for k in keys],
        {"type": "table", "path": str(folder)},
    )


def _validate(rec: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate through g3n_shards.SampleMeta when it can, keeping the key and unknown columns."""
    from . import shardio

    return shardio.validate_record(rec, source)


def load_features(
    path: str | Path, name: str | None = None, array: str = "auto", latent_reduce: str = "flatten"
) -> FeatureSet:
    """Open a shard set (folder with manifest.json) or a feature table (folder with features.npz)."""
    p = Path(path)
    if (p / "manifest.json").exists():
        from . import shardio

        return shardio.load_shard_features(p, name=name, array=array, latent_reduce=latent_reduce)
    if (p / "features.npz").exists():
        return load_feature_table(p, name=name)
    raise FeatureSourceError(f"{p}: neither a shard set (manifest.json) nor a feature table (features.npz + metadata.jsonl)")


def parse_named(spec: str) -> tuple[str | None, str]:
    """``name=path`` -> (name, path); a bare path -> (None, path)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, path
    return None, spec
