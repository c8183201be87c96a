"""Conditions: resolved specs, encoding of labels into tensors, and their embeddings.

A batch of conditions is a ``CondBatch``: for each condition name a value tensor and a boolean
``present`` mask. Categorical values are vocabulary indices, continuous values are floats. A
condition whose label is missing (None) is *not present* and is embedded by its own learned null
embedding, exactly as when it is dropped for classifier-free guidance: missing is never a class.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ConditionSpec

#: name -> (values, present). values: long (B,) for categorical, float (B,) for continuous.
CondBatch = dict[str, tuple[torch.Tensor, torch.Tensor]]


class ConditionError(ValueError):
    """A condition value is not usable (unknown label, not a number, unknown condition name)."""


def label_of(value: Any) -> str:
    """A categorical label as the shard contract spells vocabularies (``str(value)``: CDR 0.5 ->
    '0.5', CDR 1.0 -> '1.0'); booleans as 'true' / 'false'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _as_number(text: str) -> float | None:
    try:
        x = float(text)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Condition:
    """A ConditionSpec with its vocabulary resolved (categorical) -- what the model is built from."""

    spec: ConditionSpec
    vocab: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def categorical(self) -> bool:
        return self.spec.kind == "categorical"

    def index(self, value: Any) -> int:
        """Position of a label; numeric labels also match by value (CDR '1' finds '1.0')."""
        label = label_of(value)
        if label in self.vocab:
            return self.vocab.index(label)
        x = _as_number(label)
        if x is not None:
            for i, v in enumerate(self.vocab):
                if _as_number(v) == x:
                    return i
        raise ConditionError(f"condition {self.name!r}: label {label!r} is not in its vocabulary {list(self.vocab)}")

    def number(self, value: Any) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ConditionError(f"condition {self.name!r}: {value!r} is not a number") from None
        if not math.isfinite(x):
            raise ConditionError(f"condition {self.name!r}: {value!r} is not finite")
        return x


def resolve_conditions(
    specs: Sequence[ConditionSpec],
    records: Iterable[Mapping[str, Any]] = (),
    manifest_vocab: Mapping[str, Sequence[str]] | None = None,
) -> list[Condition]:
    """Vocabularies: the spec's own, else the manifest's ``vocab[field]``, else the sorted labels seen
    in ``records`` (dicts keyed by metadata field). Data decides, code does not."""
    records = list(records)
    out = []
    for spec in specs:
        if spec.kind == "continuous":
            out.append(Condition(spec))
            continue
        if spec.vocab is not None:
            vocab = [label_of(v) for v in spec.vocab]
        elif manifest_vocab and spec.field in manifest_vocab:
            vocab = [label_of(v) for v in manifest_vocab[spec.field]]
        else:
            vocab = sorted({label_of(r[spec.field]) for r in records if r.get(spec.field) is not None})
        if len(set(vocab)) != len(vocab):
            raise ConditionError(f"condition {spec.name!r}: duplicate labels in vocabulary {vocab}")
        out.append(Condition(spec, tuple(vocab)))
    return out


def encode(conditions: Sequence[Condition], requests: Sequence[Mapping[str, Any]]) -> CondBatch:
    """Encode one mapping per sample (condition name -> raw value or None) into a CondBatch.

    Keys that name no condition are refused (a typo must not silently become 'unconditioned').
    """
    names = {c.name for c in conditions}
    for r in requests:
        unknown = set(r) - names
        if unknown:
            raise ConditionError(f"unknown condition(s) {sorted(unknown)}; this model knows {sorted(names)}")
    batch: CondBatch = {}
    for c in conditions:
        present = torch.tensor([r.get(c.name) is not None for r in requests], dtype=torch.bool)
        if c.categorical:
            vals = torch.tensor(
                [c.index(r[c.name]) if r.get(c.name) is not None else len(c.vocab) for r in requests],
                dtype=torch.long,
            )
        else:
            vals = torch.tensor(
                [c.number(r[c.name]) if r.get(c.name) is not None else 0.0 for r in requests], dtype=torch.float32
            )
        batch[c.name] = (vals, present)
    return batch


def records_to_requests(conditions: Sequence[Condition], records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Map metadata records (keyed by field) to condition requests (keyed by condition name)."""
    return [{c.name: r.get(c.spec.field) for c in conditions} for r in records]


def decode_request(conditions: Sequence[Condition], batch: CondBatch, i: int) -> dict[str, Any]:
    """Inverse of ``encode`` for sample ``i`` (labels back as strings, missing as None)."""
    out: dict[str, Any] = {}
    for c in conditions:
        vals, present = batch[c.name]
        if not bool(present[i]):
            out[c.name] = None
        elif c.categorical:
            out[c.name] = c.vocab[int(vals[i])]
        else:
            out[c.name] = float(vals[i])
    return out


def cond_to(batch: CondBatch, device: torch.device | str) -> CondBatch:
    return {k: (v.to(device), p.to(device)) for k, (v, p) in batch.items()}


def cond_repeat(batch: CondBatch, n: int) -> CondBatch:
    """Repeat a CondBatch n times along the batch (for stacked guidance passes)."""
    return {k: (v.repeat(n), p.repeat(n)) for k, (v, p) in batch.items()}


def cond_index(batch: CondBatch, idx: torch.Tensor | slice) -> CondBatch:
    return {k: (v[idx], p[idx]) for k, (v, p) in batch.items()}


def drop_conditions(
    conditions: Sequence[Condition], batch: CondBatch, generator: torch.Generator
) -> CondBatch:
    """Classifier-free-guidance dropout: each condition independently becomes null with its
    ``drop_prob`` (random draws on the CPU generator so that resume is exact on any device)."""
    out: CondBatch = {}
    for c in conditions:
        vals, present = batch[c.name]
        keep = torch.rand(present.shape[0], generator=generator) >= c.spec.drop_prob
        out[c.name] = (vals, present & keep.to(present.device))
    return out


def sinusoid(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT/ADM sinusoidal features of a (B,) tensor -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class CategoricalEmbedder(nn.Module):
    """A table with one row per class plus its own null row (the last)."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        idx = torch.where(present, values, torch.full_like(values, self.num_classes))
        return self.table(idx)


class ContinuousEmbedder(nn.Module):
    """A normalised value through sinusoidal features (several octaves) and a small MLP; a learned
    null vector replaces it when the value is missing or dropped."""

    def __init__(self, hidden: int, center: float, scale: float, num_freqs: int = 8):
        super().__init__()
        self.center, self.scale = float(center), float(scale)
        # octaves 2^0 .. 2^(n-1) (times pi/2) of the normalised value resolve both coarse and fine differences
        self.register_buffer(
            "freqs", (math.pi / 2) * 2.0 ** torch.arange(num_freqs, dtype=torch.float32), persistent=False
        )
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.null = nn.Parameter(torch.randn(hidden) * 0.02)

    def forward(self, values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        u = ((values.float() - self.center) / self.scale)[:, None]
        feats = torch.cat([u, torch.sin(u * self.freqs), torch.cos(u * self.freqs)], dim=-1)
        emb = self.mlp(feats.to(self.mlp[0].weight.dtype))
        return torch.where(present[:, None], emb, self.null.to(emb.dtype)[None])


class ConditionEmbedder(nn.Module):
    """Sum of every condition's embedding (the caller adds the timestep embedding)."""

    def __init__(self, conditions: Sequence[Condition], hidden: int):
        super().__init__()
        self.names = [c.name for c in conditions]
        self.embedders = nn.ModuleDict()
        for c in conditions:
            if c.categorical:
                self.embedders[c.name] = CategoricalEmbedder(len(c.vocab), hidden)
            else:
                self.embedders[c.name] = ContinuousEmbedder(hidden, c.spec.center, c.spec.scale)

    def forward(self, cond: CondBatch, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(batch_size, like.shape[-1], device=like.device, dtype=like.dtype)
        for name in self.names:
            if name not in cond:
                raise ConditionError(f"condition batch lacks {name!r} (has {sorted(cond)})")
            vals, present = cond[name]
            out = out + self.embedders[name](vals.to(like.device), present.to(like.device)).to(like.dtype)
        return out
