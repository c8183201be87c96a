"""The one module that talks to g3n-shards: read features and metadata out of a shard set.

``tokens`` sets give the stored ``mean`` (1152-vector per volume) or, when only ``tokens`` is
stored, their mean over tokens (method.md §4). ``latents`` sets give the projected tokens,
flattened (1200 x 32 = 38,400 values) or averaged over tokens (32 values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import g3n_shards as gs

from .features import FeatureSet, FeatureSourceError

TOKEN_ARRAYS = ("auto", "mean", "tokens")
LATENT_REDUCE = ("flatten", "mean")


def validate_record(rec: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate a metadata mapping with ``SampleMeta`` (keeping its ``key``); errors name ``source``."""
    body = {k: v for k, v in rec.items() if k != "key"}
    try:
        meta = gs.SampleMeta.validate_record(body, source=source)
    except gs.MetadataError as e:
        raise FeatureSourceError(str(e)) from None
    out = meta.model_dump()
    if "key" in rec:
        out["key"] = str(rec["key"])
    return out


def _feature(kind: str, arrays: dict[str, np.ndarray], array: str, latent_reduce: str, where: str) -> np.ndarray:
    if kind == "tokens":
        if array in ("auto", "mean") and "mean" in arrays:
            return np.asarray(arrays["mean"], dtype=np.float32).reshape(-1)
        if array in ("auto", "tokens") and "tokens" in arrays:
            return np.asarray(arrays["tokens"], dtype=np.float32).mean(axis=0)
        raise FeatureSourceError(f"{where}: no {array!r} array (has {sorted(arrays)})")
    if kind == "latents":
        lat = np.asarray(arrays["latent"], dtype=np.float32)
        if latent_reduce == "flatten":
            return lat.reshape(-1)
        # mean over tokens: the channel axis is last for (N, C) token sequences.
        return lat.reshape(-1, lat.shape[-1]).mean(axis=0)
    raise FeatureSourceError(f"{where}: shard kind {kind!r} carries no features (use a tokens or latents set)")


def load_shard_features(
    path: str | Path, name: str | None = None, array: str = "auto", latent_reduce: str = "flatten", progress: bool = True
) -> FeatureSet:
    """Read one feature vector per sample from a ``tokens`` or ``latents`` shard set."""
    if array not in TOKEN_ARRAYS:
        raise ValueError(f"array must be one of {TOKEN_ARRAYS}, got {array!r}")
    if latent_reduce not in LATENT_REDUCE:
        raise ValueError(f"latent_reduce must be one of {LATENT_REDUCE}, got {latent_reduce!r}")
    try:
        ss = gs.ShardSet.open(path)
    except gs.ShardError as e:
        raise FeatureSourceError(str(e)) from None
    kind = ss.manifest.kind
    if kind not in ("tokens", "latents"):
        raise FeatureSourceError(f"{path}: is a {kind!r} shard set; probes need 'tokens' or 'latents'")
    keys: list[str] = []
    rows: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    try:
        for s in tqdm(ss, total=len(ss), desc=f"read {Path(str(path)).name}", unit="sample", disable=not progress):
            v = _feature(kind, s.arrays, array, latent_reduce, f"{path}:{s.key}")
            if rows and v.shape != rows[0].shape:
                raise FeatureSourceError(f"{path}:{s.key}: feature length {v.shape[0]} differs from {rows[0].shape[0]}")
            keys.append(s.key)
            rows.append(v)
            rec = s.meta.model_dump()
            rec["key"] = s.key
            records.append(rec)
    except gs.ShardError as e:
        raise FeatureSourceError(str(e)) from None
    if not rows:
        raise FeatureSourceError(f"{path}: shard set holds no samples")
    source = {
        "type": "shards",
        "path": str(path),
        "kind": kind,
        "digest": ss.manifest.digest,
        "array": array if kind == "tokens" else "latent",
        "latent_reduce": latent_reduce if kind == "latents" else None,
    }
    return FeatureSet(name or Path(str(path)).name, np.stack(rows), keys, records, source)
