"""Feature sets: a matrix of per-volume features, their sample keys and metadata.

The panel core only sees :class:`FeatureSet`. Two sources make one:

* a g3n-shards set (``tokens``: the ``mean`` array, or the mean of ``tokens``;
  ``latents``: ``latent`` flattened or averaged over tokens), read in :mod:`g3n_probe.shardio`;
* a *feature table* folder, for features from any other encoder: ``features.npz`` with
  ``keys`` (N strings) and ``features`` (N x D), plus ``metadata.jsonl`` with one JSON object
  per sample (``key`` and g3n-shards metadata fields). :func:`write_feature_table` makes one.

``run`` and ``compare`` read strictly: any bad row is an error, since a panel fitted on a
silently thinned cohort would misreport. ``apply`` passes a ``rejects`` list instead: bad rows
(non-finite values, a width other than the rest, invalid or missing metadata, duplicate keys)
are left out and recorded there, one :class:`~g3n_probe.rejects.Reject` each, and the rest load.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import npz_bytes, write_bytes, write_text
from .rejects import STEP_FEATURES, STEP_METADATA, Reject


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


#: Optional sidecar of a feature table: what made the features (kind, reduction, encoder), so
#: that ``apply`` can check a table as it checks a shard set. It names the features.npz digest
#: it describes; a sidecar of another features.npz is an error, not a silent mislabel.
TABLE_SOURCE = "features.json"


def write_feature_table(folder: str | Path, X: np.ndarray, keys: Sequence[str], records: Sequence[Any],
                        source: Mapping[str, Any] | None = None) -> Path:
    """Write a feature-table folder (``features.npz`` + ``metadata.jsonl``), atomically.

    ``source``: what made the features, as a shard set's feature source records it (``kind``,
    ``latent_reduce``, ``encoder`` ...; e.g. ``load_features(tokens_set).source``), written to
    ``features.json`` beside them.
    """
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
    blob = npz_bytes({"keys": np.asarray(list(map(str, keys)), dtype=str), "features": X})
    write_bytes(folder / "features.npz", blob)
    side = folder / TABLE_SOURCE
    if source is not None:
        made = {k: v for k, v in dict(source).items() if k in ("kind", "latent_reduce", "array", "encoder")}
        made["made_from"] = {k: source.get(k) for k in ("type", "path", "digest") if source.get(k) is not None}
        made["features_digest"] = "sha256:" + hashlib.sha256(blob).hexdigest()
        write_text(side, json.dumps(made, indent=1, sort_keys=True) + "\n")
    elif side.exists():
        side.unlink()  # a stale description of other features must not survive
    return folder


def load_feature_table(
    folder: str | Path, name: str | None = None, rejects: list[Reject] | None = None, expected_dim: int | None = None
) -> FeatureSet:
    """Read a feature-table folder; rows and metadata lines are matched by key.

    ``rejects``: lenient mode for ``apply`` (see the module doc); a metadata line without
    ``subject`` or ``modality`` is then kept with None there, so that only the probes whose
    slice needs the field refuse the sample. ``expected_dim``: the width the probes expect,
    the reference for "wrong width" when rows differ. Errors of the files themselves (missing,
    unreadable, not N x D) are raised in both modes: there is no row to reject.
    """
    folder = Path(folder)
    npz, meta = folder / "features.npz", folder / "metadata.jsonl"
    lenient = rejects is not None
    where = str(folder)
    try:
        blob = npz.read_bytes()
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            if "keys" not in z or "features" not in z:
                raise FeatureSourceError(f"{npz}: needs arrays 'keys' and 'features', has {sorted(z.files)}")
            keys = [str(k) for k in z["keys"]]
            X = z["features"]
    except FeatureSourceError:
        raise
    except (OSError, ValueError) as e:
        raise FeatureSourceError(f"{npz}: cannot read features: {e}") from e
    if X.ndim != 2 or X.shape[0] != len(keys):
        raise FeatureSourceError(f"{npz}: 'features' must be N x D with N = {len(keys)} keys, got shape {X.shape}")
    records: dict[str, dict[str, Any]] = {}
    invalid: dict[str, str] = {}
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
            if not lenient:
                raise FeatureSourceError(f"{meta}:{n}: not valid JSON: {e}") from e
            rejects.append(Reject(None, where, STEP_METADATA, f"{meta.name}:{n}: not valid JSON: {e}"))
            continue
        if not isinstance(rec, dict) or "key" not in rec:
            if not lenient:
                raise FeatureSourceError(f"{meta}:{n}: each line must be an object with a 'key'")
            rejects.append(Reject(None, where, STEP_METADATA, f"{meta.name}:{n}: not an object with a 'key'"))
            continue
        key = str(rec["key"])
        try:
            records[key] = _validate(rec, f"{meta}:{n}", lenient=lenient)
            invalid.pop(key, None)
        except FeatureSourceError as e:
            if not lenient:
                raise
            records.pop(key, None)
            invalid[key] = str(e)
    if not lenient:
        missing = [k for k in keys if k not in records]
        if missing:
            raise FeatureSourceError(f"{meta}: no metadata for {len(missing)} sample(s), e.g. {missing[:3]}")
        return FeatureSet(name or folder.name, X, keys, [records[k] for k in keys], _table_source(folder, blob))
    assert rejects is not None
    recs: list[dict[str, Any] | None] = []
    for k in keys:
        if k in records:
            recs.append(records[k])
            continue
        why = invalid.get(k, f"no line for this key in {meta.name}")
        rejects.append(Reject(k, where, STEP_METADATA, why))
        recs.append(None)
    Xk, kk, rk = screen_rows(where, keys, X, recs, rejects, expected_dim)
    return FeatureSet(name or folder.name, Xk, kk, rk, _table_source(folder, blob))


def _table_source(folder: Path, blob: bytes) -> dict[str, Any]:
    """Provenance of a feature table. Without a ``features.json`` sidecar its features' own kind
    and encoder are unknown, so ``apply`` cannot check them against a probe's (see
    apply.feature_mismatches); with one, they are checked as a shard set's would be."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    source: dict[str, Any] = {"type": "table", "kind": "feature-table", "path": str(folder), "digest": digest}
    side = folder / TABLE_SOURCE
    if side.exists():
        try:
            made = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FeatureSourceError(f"{side}: cannot read the feature table's description: {e}") from e
        if not isinstance(made, dict) or made.get("features_digest") != digest:
            raise FeatureSourceError(f"{side}: describes features {made.get('features_digest') if isinstance(made, dict) else '?'}, "
                                     f"but {folder / 'features.npz'} is {digest}; rewrite the table or remove the sidecar")
        source.update({k: made[k] for k in ("kind", "latent_reduce", "array", "encoder", "made_from") if k in made})
    return source


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


def _validate(rec: dict[str, Any], source: str, lenient: bool = False) -> dict[str, Any]:
    """Validate through g3n_shards.SampleMeta when it can, keeping the key and unknown columns
    (``lenient``: missing subject/modality allowed, see :func:`shardio.validate_record`)."""
    from . import shardio

    return shardio.validate_record(rec, source, allow_missing_identity=lenient)


def load_features(
    path: str | Path,
    name: str | None = None,
    array: str = "auto",
    latent_reduce: str = "flatten",
    rejects: list[Reject] | None = None,
    expected_dim: int | None = None,
) -> FeatureSet:
    """Open a shard set (folder with manifest.json) or a feature table (folder with features.npz).

    ``rejects`` / ``expected_dim``: lenient reading for ``apply`` (see the module doc).
    """
    p = Path(path)
    if (p / "manifest.json").exists():
        from . import shardio

        return shardio.load_shard_features(p, name=name, array=array, latent_reduce=latent_reduce,
                                           rejects=rejects, expected_dim=expected_dim)
    if (p / "features.npz").exists():
        return load_feature_table(p, name=name, rejects=rejects, expected_dim=expected_dim)
    raise FeatureSourceError(f"{p}: neither a shard set (manifest.json) nor a feature table (features.npz + metadata.jsonl)")


def parse_named(spec: str) -> tuple[str | None, str]:
    """``name=path`` -> (name, path); a bare path -> (None, path)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, path
    return None, spec
