"""The feature set the panel core sees: a matrix of per-volume features, their sample keys and
metadata (:class:`FeatureSet`), and the row screening of lenient reads (:func:`screen_rows`).

No I/O here: :mod:`g3n_probe.features` reads feature tables and dispatches, :mod:`g3n_probe.shardio`
reads shard sets; both build on this module (and it on neither).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .rejects import STEP_FEATURES, Reject


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


def screen_rows(
    where: str,
    keys: Sequence[str],
    rows: np.ndarray | Sequence[np.ndarray],
    records: Sequence[dict[str, Any] | None],
    rejects: list[Reject],
    expected_dim: int | None = None,
) -> tuple[np.ndarray, list[str], list[dict[str, Any]]]:
    """Keep the rows a probe can score; append a :class:`Reject` for every other one.

    ``records[i] is None`` marks a row already rejected for its metadata. Refused: a key that
    occurs more than once (which row is right is unknowable, so none), a width other than the
    reference (``expected_dim`` when some row has it, else the most common width), and any
    NaN/Inf value. Returns (X, keys, records) of the kept rows, in input order.
    """
    counts = Counter(keys)
    matrix = isinstance(rows, np.ndarray) and rows.ndim == 2
    widths = [rows.shape[1]] * rows.shape[0] if matrix else [int(np.asarray(r).size) for r in rows]  # type: ignore[union-attr]
    finite = np.isfinite(rows).all(axis=1) if matrix else [bool(np.isfinite(np.asarray(r)).all()) for r in rows]
    live = [i for i, r in enumerate(records) if r is not None]
    common = Counter(widths[i] for i in live).most_common()
    ref = expected_dim if expected_dim is not None and any(widths[i] == expected_dim for i in live) else (
        common[0][0] if common else (expected_dim or 0))
    ref_text = "the probes' expected width" if ref == expected_dim else "the width of the other samples"
    keep: list[int] = []
    for i in live:
        rec = records[i]
        assert rec is not None
        subj = rec.get("subject")
        k = str(keys[i])
        if counts[k] > 1:
            rejects.append(Reject(k, where, STEP_FEATURES, f"key occurs {counts[k]} times in the feature source", subj))
        elif widths[i] != ref:
            rejects.append(Reject(k, where, STEP_FEATURES, f"feature row has {widths[i]} values, not {ref} ({ref_text})", subj))
        elif not finite[i]:
            bad = int((~np.isfinite(np.asarray(rows[i]))).sum())
            rejects.append(Reject(k, where, STEP_FEATURES, f"feature row has {bad} non-finite value(s) (NaN/Inf)", subj))
        else:
            keep.append(i)
    if matrix:
        X = np.asarray(rows)[np.asarray(keep, dtype=np.int64)]
    elif keep:
        X = np.stack([np.asarray(rows[i]).reshape(-1) for i in keep])
    else:
        X = np.zeros((0, ref), dtype=np.float32)
    return X, [str(keys[i]) for i in keep], [records[i] for i in keep]  # type: ignore[misc]
