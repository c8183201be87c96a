"""Inputs as the measurements need them: z-space volumes and encoder features, from any set.

* A ``volumes`` set is read and brought to brain z-space from the intensity space its manifest
  records (:func:`g3n_eval.data.volume_space`, :func:`g3n_shards.intensity.to_zspace`); a set that
  records none is refused.
* A ``latents`` set (real or generated) is decoded by the tokenizer its manifest names, through
  the registry, to z-space volumes.
* Features: a ``tokens`` set or a feature table is read by g3n-probe as is; anything with
  volumes is decoded if needed and re-encoded by the MAE encoder (the paper's protocol for
  generated samples: decode, re-encode, probe).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from g3n_shards.intensity import ZScoreError, to_zspace
from g3n_tokenizer.errors import TokenizerError

from .data import InputError, Loaded, load_set, volume_space
from .models import MAEFeatures, TokenizerHandle


def set_kind(path: str | Path) -> str:
    p = Path(path)
    if (p / "manifest.json").is_file():
        from .data import open_set

        return open_set(p).kind
    if (p / "features.npz").is_file():
        return "feature-table"
    raise InputError(f"{p}: not a shard set (manifest.json) or a feature table (features.npz)")


class TokenizerCache:
    """Loads each tokenizer once; a ``latents`` set names its own tokenizer (registry ModelRef)."""

    def __init__(self, checkpoint: str | Path | None = None, name: str | None = None, device: str = "cpu") -> None:
        self.checkpoint, self.name, self.device = checkpoint, name, device
        self._cache: dict[str, TokenizerHandle] = {}

    def for_set(self, loaded: Any) -> TokenizerHandle:
        """The tokenizer of a Loaded set or a ShardSet (its manifest's ModelRef, unless --tokenizer)."""
        ref = loaded.manifest.tokenizer if loaded.manifest is not None else None
        target: Any = self.name or ref
        if target is None:
            raise InputError(f"{getattr(loaded, 'path', getattr(loaded, 'location', '?'))}: the latents manifest names "
                             f"no tokenizer; pass --tokenizer NAME")
        key = f"{target if isinstance(target, str) else target.name}|{self.checkpoint}"
        if key not in self._cache:
            try:
                self._cache[key] = TokenizerHandle(target, self.checkpoint, self.device)
            except TokenizerError as e:  # registry / checkpoint errors carry their own clear message
                where = getattr(loaded, "path", getattr(loaded, "location", "?"))
                raise InputError(f"{where}: cannot load its tokenizer: {e}") from e
        return self._cache[key]

    def provenance(self) -> list[dict[str, Any]]:
        return [h.ref for h in self._cache.values()]


def volumes_of(path: str | Path, tokenizers: TokenizerCache | None, limit: int | None = None,
               progress: bool = False, only: set[str] | None = None) -> Loaded:
    """z-space volumes of a ``volumes`` or ``latents`` set (decoded), in key order.

    ``only``: keep just these keys (before decoding, which is the costly part); keys absent
    from the set are simply not there, for the caller to report."""
    loaded = load_set(path, limit=limit)
    space = volume_space(loaded.manifest, path) if loaded.kind == "volumes" else None
    if only is not None:
        keep = [i for i, k in enumerate(loaded.keys) if k in only]
        loaded.keys = [loaded.keys[i] for i in keep]
        loaded.arrays = [loaded.arrays[i] for i in keep]
        loaded.metas = [loaded.metas[i] for i in keep]
    if loaded.kind == "volumes":
        loaded.arrays = [_zspace(a, space, path, k) for k, a in zip(loaded.keys, loaded.arrays)]
    elif loaded.kind == "latents":
        if tokenizers is None:
            raise InputError(f"{path}: a latents set needs a tokenizer to decode it (--tokenizer-checkpoint)")
        tok = tokenizers.for_set(loaded)
        out = []
        for s in tqdm(range(0, len(loaded), 4), desc=f"decode {Path(path).name}", disable=not progress):
            out.extend(tok.decode(loaded.arrays[s : s + 4]))
        loaded.arrays = out
        loaded.extra["tokenizer"] = tok.ref
    else:
        raise InputError(f"{path}: a {loaded.kind} set has no volumes; give a volumes or latents set")
    return loaded


def _zspace(volume: np.ndarray, space: str | None, path: str | Path, key: str) -> np.ndarray:
    try:
        return to_zspace(volume, str(space), key)
    except ZScoreError as e:  # no brain voxel, NaN/Inf: the set's sample, not this program, is at fault
        raise InputError(f"{path}: {e}") from None


def volume_batches(path: str | Path, tokenizers: TokenizerCache | None, limit: int | None = None,
                   batch_size: int = 4, progress: bool = False) -> Iterator[tuple[list[str], list[dict], list[np.ndarray]]]:
    """Stream (keys, metas, z-space volumes) in batches: a volumes set z-scored, a latents set decoded.
    Memory stays at one shard plus one batch, whatever the set's size."""
    from .data import iter_set, open_set

    ss = open_set(path)
    if ss.kind not in ("volumes", "latents"):
        raise InputError(f"{path}: a {ss.kind} set has no volumes; give a volumes or latents set")
    tok = space = None
    if ss.kind == "volumes":
        space = volume_space(ss.manifest, path)
    if ss.kind == "latents":
        if tokenizers is None:
            raise InputError(f"{path}: a latents set needs a tokenizer to decode it (--tokenizer-checkpoint)")
        tok = tokenizers.for_set(ss)
    total = min(len(ss), limit) if limit else len(ss)
    bar = tqdm(total=total, desc=f"{'decode' if tok else 'read'} {Path(path).name}", unit="vol", disable=not progress)
    buf: list[tuple[str, dict, np.ndarray]] = []

    def emit() -> tuple[list[str], list[dict], list[np.ndarray]]:
        keys, metas, arrs = [b[0] for b in buf], [b[1] for b in buf], [b[2] for b in buf]
        vols = tok.decode(arrs) if tok is not None else [_zspace(a, space, path, k) for k, a in zip(keys, arrs)]
        bar.update(len(buf))
        buf.clear()
        return keys, metas, vols

    for item in iter_set(path, None, limit):
        buf.append(item)
        if len(buf) >= batch_size:
            yield emit()
    if buf:
        yield emit()
    bar.close()


def features_of(path: str | Path, encoder: MAEFeatures | None, tokenizers: TokenizerCache | None,
                limit: int | None = None, progress: bool = False) -> tuple[Any, Loaded | None]:
    """A g3n_probe FeatureSet for ``path``; also the z-space volumes when they were made here."""
    from g3n_probe import from_arrays, load_features

    kind = set_kind(path)
    if kind in ("tokens", "feature-table"):
        return load_features(path), None
    if encoder is None:
        raise InputError(f"{path}: a {kind} set must be re-encoded: pass --encoder MAE_WEIGHTS")
    vols = volumes_of(path, tokenizers, limit, progress)
    X = encoder(vols.arrays)
    recs = [{**m, "key": k} for k, m in zip(vols.keys, vols.metas)]
    return from_arrays(X, recs, name=Path(path).name, keys=vols.keys), vols


def request_settings(metas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Generation settings recorded in synthetic samples' ``request`` (sampler, steps, guidance,
    precision, paired, seeds, checkpoint), summarised: a single value when all agree, else the distinct values."""
    reqs = [m.get("request") or {} for m in metas if m.get("synthetic")]
    out: dict[str, Any] = {"n_synthetic": len(reqs)}
    for field in ("stage", "sampler", "steps", "guidance", "precision", "paired", "checkpoint"):
        vals = [r.get(field) for r in reqs if field in r]
        uniq = []
        for v in vals:
            if v not in uniq:
                uniq.append(v)
        if uniq:
            out[field] = uniq[0] if len(uniq) == 1 else uniq
    seeds = sorted(int(r["seed"]) for r in reqs if isinstance(r.get("seed"), int))
    if seeds:
        distinct = sorted(set(seeds))  # paired runs reuse each seed once per request
        out["seeds"] = {"n": len(seeds), "distinct": len(distinct), "min": seeds[0], "max": seeds[-1],
                        "contiguous": distinct == list(range(seeds[0], seeds[0] + len(distinct)))}
    return out


def counts(values: Sequence[Any]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items(), key=lambda kv: str(kv[0]))}


def stack(volumes: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([np.asarray(v, np.float32) for v in volumes])
