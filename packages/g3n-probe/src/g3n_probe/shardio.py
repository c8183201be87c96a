"""The one module that talks to g3n-shards: read features and metadata out of a shard set.

``tokens`` sets give the stored ``mean`` (1152-vector per volume) or, when only ``tokens`` is
stored, their mean over tokens (docs/method.md §4). ``latents`` sets give the projected tokens,
flattened (1200 x 32 = 38,400 values) or averaged over tokens (32 values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import g3n_shards as gs

from .featureset import FeatureSet, FeatureSourceError, screen_rows
from .rejects import STEP_FEATURES, Reject

TOKEN_ARRAYS = ("auto", "mean", "tokens")
LATENT_REDUCE = ("flatten", "mean")


#: identity fields ``apply`` lets a record lack: only the probes whose slice needs one refuse it
IDENTITY_FIELDS = {"subject": "unknown", "modality": "T1"}  # field -> placeholder for validation


def validate_record(rec: dict[str, Any], source: str, allow_missing_identity: bool = False) -> dict[str, Any]:
    """Validate a metadata mapping with ``SampleMeta`` (keeping its ``key``); errors name ``source``.

    ``allow_missing_identity`` (``apply``): a missing or null ``subject``/``modality`` is not an
    error; every other field is still validated (through a placeholder) and the field comes back
    None, so an ``all`` probe can still score a volume of unknown modality and a ``T1`` probe
    records why it cannot.
    """
    body = {k: v for k, v in rec.items() if k != "key"}
    absent = [f for f in IDENTITY_FIELDS if body.get(f) in (None, "")] if allow_missing_identity else []
    for f in absent:
        body[f] = IDENTITY_FIELDS[f]
    try:
        meta = gs.SampleMeta.validate_record(body, source=source)
    except gs.MetadataError as e:
        raise FeatureSourceError(str(e)) from None
    out = meta.model_dump()
    for f in absent:
        out[f] = None
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
    path: str | Path,
    name: str | None = None,
    array: str = "auto",
    latent_reduce: str = "flatten",
    progress: bool = True,
    rejects: list[Reject] | None = None,
    expected_dim: int | None = None,
) -> FeatureSet:
    """Read one feature vector per sample from a ``tokens`` or ``latents`` shard set.

    ``rejects``: lenient mode for ``apply`` (a sample without the array, or with a row of another
    width or with NaN/Inf, is recorded there and left out); ``expected_dim`` is then the reference
    width. Errors of the set itself (unreadable, wrong kind, corrupt shard) are raised in both modes.
    """
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
            rec = s.meta.model_dump()
            rec["key"] = s.key
            try:
                v = _feature(kind, s.arrays, array, latent_reduce, f"{path}:{s.key}")
            except FeatureSourceError as e:
                if rejects is None:
                    raise
                rejects.append(Reject(s.key, str(path), STEP_FEATURES, str(e), rec.get("subject")))
                continue
            if rejects is None and rows and v.shape != rows[0].shape:
                raise FeatureSourceError(f"{path}:{s.key}: feature length {v.shape[0]} differs from {rows[0].shape[0]}")
            keys.append(s.key)
            rows.append(v)
            records.append(rec)
    except gs.ShardError as e:
        raise FeatureSourceError(str(e)) from None
    if len(ss) == 0:
        raise FeatureSourceError(f"{path}: shard set holds no samples")
    source = {
        "type": "shards",
        "path": str(path),
        "kind": kind,
        "digest": ss.manifest.digest,
        "array": array if kind == "tokens" else "latent",
        "latent_reduce": latent_reduce if kind == "latents" else None,
    }
    model = ss.manifest.encoder if kind == "tokens" else ss.manifest.tokenizer
    if model is not None:
        # the network that made the features: apply refuses a probe trained on another one's
        source["encoder"] = {"role": "encoder" if kind == "tokens" else "tokenizer", "name": model.name,
                             "checkpoint_digest": model.checkpoint_digest}
    label = name or Path(str(path)).name
    if rejects is None:
        if not rows:
            raise FeatureSourceError(f"{path}: shard set holds no samples")
        return FeatureSet(label, np.stack(rows), keys, records, source)
    X, keys, recs = screen_rows(str(path), keys, rows, records, rejects, expected_dim)
    return FeatureSet(label, X, keys, recs, source)
