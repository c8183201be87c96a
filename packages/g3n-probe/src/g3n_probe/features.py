"""Feature sets: a matrix of per-volume features, their sample keys and metadata.

The panel core only sees :class:`FeatureSet` (defined in :mod:`g3n_probe.featureset`, re-exported
here). Two sources make one:

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import npz_bytes, write_bytes, write_text
from .featureset import FeatureSet, FeatureSourceError, _as_record, from_arrays, screen_rows
from .rejects import STEP_METADATA, Reject

__all__ = ["FeatureSet", "FeatureSourceError", "TABLE_SOURCE", "from_arrays", "load_feature_table", "load_features",
           "parse_named", "screen_rows", "write_feature_table"]


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
