"""Latent data: the one module that talks to g3n-shards (``latents`` sets in, synthetic ``latents`` out).

Training holds the whole latent set in memory as one float32 tensor (1200 x 32 x 4 bytes = 154 kB
per volume: the paper's 35k volumes are 5.4 GB), which makes the data cursor a plain
(epoch, position) pair and resume exact for any number of ranks. Samples whose latent has the
wrong shape are refused into the run's ``rejects.jsonl`` and skipped.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import g3n_shards as gs
import numpy as np
import torch
from tqdm import tqdm

from .config import BridgeConfig, DiTConfig


class DataError(ValueError):
    """The latent set cannot be used (wrong kind, no usable samples, shape not matching the model)."""


@dataclass
class LatentData:
    """A latent set in memory: (M, N, C) float32 latents, keys, metadata dicts and set provenance."""

    latents: torch.Tensor
    keys: list[str]
    metas: list[dict[str, Any]]
    vocab: dict[str, list[str]] = field(default_factory=dict)
    geometry: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] | None = None
    digest: str | None = None
    location: str | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def grid(self) -> tuple[int, int, int] | None:
        g = self.geometry.get("token_grid")
        return tuple(g) if g else None  # type: ignore[return-value]

    def check_model(self, cfg: DiTConfig) -> None:
        n, c = self.latents.shape[1:]
        if (n, c) != (cfg.num_tokens, cfg.channels):
            raise DataError(
                f"{self.location}: latents are {n} tokens x {c} channels, the model expects grid {cfg.grid} "
                f"= {cfg.num_tokens} tokens x {cfg.channels} channels"
            )
        if self.grid is not None and tuple(self.grid) != tuple(cfg.grid):
            raise DataError(f"{self.location}: token grid {self.grid} (manifest geometry) != model grid {cfg.grid}")


def load_latents(
    path: str | Path,
    keys: Sequence[str] | None = None,
    rejects: gs.RejectLog | None = None,
    progress: bool = True,
) -> LatentData:
    """Read a ``latents`` set (or the listed keys of it) into memory, checking shapes."""
    ss = gs.ShardSet.open(path, kind="latents")
    wanted = set(keys) if keys is not None else None
    if wanted is not None:
        missing = wanted - set(ss.keys())
        if missing:
            raise DataError(f"{path}: no samples with keys {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}")
    arrays, out_keys, metas = [], [], []
    shape: tuple[int, ...] | None = None
    geom = ss.manifest.geometry
    n_expected = geom.num_tokens
    it: Iterable[gs.Sample] = iter(ss)
    if progress:
        it = tqdm(it, total=len(ss), desc=f"read {Path(str(path)).name}", unit="latent", leave=False)
    for s in it:
        if wanted is not None and s.key not in wanted:
            continue
        a = s.arrays["latent"]
        reason = None
        if a.ndim != 2:
            reason = f"latent has shape {a.shape}, expected (tokens, channels)"
        elif n_expected is not None and a.shape[0] != n_expected:
            reason = f"latent has {a.shape[0]} tokens, the manifest grid {geom.token_grid} has {n_expected}"
        elif shape is not None and a.shape != shape:
            reason = f"latent shape {a.shape} differs from the set's {shape}"
        if reason:
            if rejects is None:
                raise DataError(f"{path}: sample {s.key!r}: {reason}")
            rejects.add(str(path), s.meta.subject, "load-latents", reason, key=s.key)
            continue
        shape = a.shape
        arrays.append(torch.from_numpy(np.array(a, dtype=np.float32, copy=True)))
        out_keys.append(s.key)
        metas.append(s.meta.model_dump(mode="json"))
    if not arrays:
        raise DataError(f"{path}: no usable latent samples")
    return LatentData(
        latents=torch.stack(arrays),
        keys=out_keys,
        metas=metas,
        vocab=dict(ss.manifest.vocab),
        geometry=ss.manifest.geometry.model_dump(mode="json"),
        tokenizer=ss.manifest.tokenizer.model_dump(mode="json") if ss.manifest.tokenizer else None,
        digest=ss.digest,
        location=str(path),
    )


def in_memory(latents: torch.Tensor, metas: Sequence[Mapping[str, Any]], grid: Sequence[int] | None = None) -> LatentData:
    """A LatentData from tensors (tests, notebooks); metadata is validated like a shard set's."""
    checked = [gs.SampleMeta.validate_record(dict(m), source=f"metas[{i}]").model_dump(mode="json") for i, m in enumerate(metas)]
    keys = [gs.sample_key(gs.SampleMeta(**m), suffix=str(i)) for i, m in enumerate(checked)]
    geometry = {"token_grid": list(grid), "channels": int(latents.shape[-1])} if grid else {}
    return LatentData(latents=latents.float(), keys=keys, metas=checked, geometry=geometry, location="<memory>")


#: ``element`` statistics: an element's std is at least this fraction of its channel's std.
ELEMENT_STD_FLOOR = 0.01


def normalisation_stats(
    latents: torch.Tensor, mode: str = "channel", eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the training latents (N, tokens, C), float64 accumulation.

    ``channel``: shape (C,), over every token of every latent. ``element``: shape (tokens, C), over
    latents only. Both broadcast against (B, tokens, C)."""
    x = latents.double()
    flat = x.reshape(-1, x.shape[-1])
    channel_std = flat.std(0, unbiased=False)
    if mode == "channel":
        return flat.mean(0).float(), channel_std.clamp_min(eps).float()
    if mode == "element":
        # floored: an element constant in training (an empty background) must not blow a new
        # latent's tiny difference there up to hundreds of units
        std = torch.maximum(x.std(0, unbiased=False), ELEMENT_STD_FLOOR * channel_std).clamp_min(eps)
        return x.mean(0).float(), std.float()
    raise ValueError(f"unknown normalisation {mode!r} (channel or element)")


@dataclass
class Pair:
    base: int
    follow: int
    record: dict[str, Any]


def build_pairs(data: LatentData, cfg: BridgeConfig, rejects: gs.RejectLog | None = None) -> list[Pair]:
    """(baseline, follow-up) pairs of one subject and modality from session metadata.

    The record holds the pair's condition fields: baseline diagnosis, sex, CDR, ``baseline_age`` and
    ``interval`` (follow-up age - baseline age, years). Sessions without an age cannot be ordered
    or paired: they are refused into rejects.jsonl. ``reverse_pairs`` adds each pair backwards.
    """
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, m in enumerate(data.metas):
        if m.get("age") is None:
            if rejects is not None:
                rejects.add(data.location, m.get("subject"), "pairs", "session has no age: cannot order visits", key=data.keys[i])
            continue
        groups[(m.get("cohort"), m["subject"], m.get("modality"))].append(i)
    pairs: list[Pair] = []
    for gkey in sorted(groups, key=lambda k: tuple("" if v is None else str(v) for v in k)):
        idx = sorted(groups[gkey], key=lambda i: (data.metas[i]["age"], data.keys[i]))
        cand = [(idx[0], j) for j in idx[1:]] if cfg.pairing == "baseline" else [
            (a, b) for n, a in enumerate(idx) for b in idx[n + 1 :]
        ]
        for a, b in cand:
            mb, mf = data.metas[a], data.metas[b]
            dt = float(mf["age"]) - float(mb["age"])
            if dt < cfg.min_interval or (cfg.max_interval is not None and dt > cfg.max_interval):
                continue
            pairs.append(Pair(a, b, _pair_record(mb, mf)))
            if cfg.reverse_pairs:
                pairs.append(Pair(b, a, _pair_record(mf, mb)))
    return pairs


def _pair_record(mb: Mapping[str, Any], mf: Mapping[str, Any]) -> dict[str, Any]:
    """The conditions of a (start, end) pair: the start session's fields, its age as ``baseline_age``
    and ``interval`` = end age - start age (negative for a reversed pair)."""
    rec = {k: v for k, v in mb.items() if k not in ("extra", "request")}
    rec.update(baseline_age=float(mb["age"]), interval=float(mf["age"]) - float(mb["age"]), follow_age=float(mf["age"]))
    return rec


def synthetic_writer(
    out_dir: str | Path,
    *,
    geometry: Mapping[str, Any],
    tokenizer: Mapping[str, Any] | None,
    generator: gs.ModelRef,
    producer_config: Mapping[str, Any],
    parents: Sequence[gs.ParentRef] = (),
    overwrite: bool = False,
) -> gs.ShardWriter:
    """A writer for synthetic latents: the training set's geometry and tokenizer (so a decoder can
    turn them into volumes) and this generator as ``generator``."""
    from . import __version__

    return gs.ShardWriter(
        out_dir,
        kind="latents",
        producer=gs.Producer(package="g3n-dit", version=__version__, config=dict(producer_config)),
        geometry=gs.Geometry(**{k: v for k, v in geometry.items() if k in gs.Geometry.model_fields}),
        parents=list(parents),
        tokenizer=gs.ModelRef(**tokenizer) if tokenizer else None,
        generator=generator,
        overwrite=overwrite,
    )


def meta_value(field_name: str, value: Any) -> Any:
    """A condition value in the type its SampleMeta field wants (vocabulary labels are strings:
    CDR '0.5' -> 0.5, tumour grade '4' -> 4, diagnosis 'AD' stays 'AD')."""
    from pydantic import TypeAdapter, ValidationError

    info = gs.SampleMeta.model_fields.get(field_name)
    if info is None or not isinstance(value, str):
        return value
    adapter = TypeAdapter(info.annotation)
    candidates: list[Any] = [value]
    for conv in (int, float):
        try:
            candidates.append(conv(value))
        except ValueError:
            pass
    for c in candidates:
        try:
            adapter.validate_python(c, strict=True)
            return c
        except ValidationError:
            continue
    return value  # let SampleMeta report it, naming the field


def synthetic_meta(fields: Mapping[str, Any], request: Mapping[str, Any], source: str) -> gs.SampleMeta:
    """Metadata of a generated latent: its condition fields, synthetic=True and the full request."""
    rec = {k: v for k, v in fields.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    rec["synthetic"] = True
    rec["request"] = dict(request)
    return gs.SampleMeta.validate_record(rec, source=source)
