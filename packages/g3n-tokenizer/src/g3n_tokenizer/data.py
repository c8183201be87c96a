"""Volumes for tokenizer training and evaluation: subject-grouped splits and z-scored batches.

Volumes stream from a ``volumes`` shard set (``g3n_shards.ShardSet``); nothing is held in memory
beyond one shard and one batch, so the paper corpus trains the same way as the test fixture.
Splits are by *subject* (no subject's sessions or modalities on both sides of a split) and are a
pure function of (subjects, seed), so the sweep's test split is the same for every arm.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

import g3n_shards as gs

from .interface import zscore_brain


def split_subjects(metadata: dict[str, gs.SampleMeta], fractions: dict[str, float], seed: int = 0) -> dict[str, list[str]]:
    """Keys per split, grouped by subject. ``fractions`` e.g. {"test": 0.2, "val": 0.1}; the rest is "train".

    Each named split gets ``round(fraction * n_subjects)`` subjects (at least one when the fraction
    is positive and more than one subject is left for training), drawn from a seeded permutation.
    """
    subjects = sorted({m.subject for m in metadata.values()})
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    assign: dict[str, str] = {}
    pos = 0
    for name, frac in fractions.items():
        if not 0 <= frac < 1:
            raise ValueError(f"split fraction {name}={frac} must be in [0, 1)")
        k = int(round(frac * len(subjects)))
        if frac > 0:
            k = max(k, 1)
        k = min(k, len(subjects) - pos - 1)  # always leave a training subject
        if frac > 0 and k < 1:
            raise ValueError(f"too few subjects ({len(subjects)}) for the splits {fractions}")
        for s in order[pos:pos + k]:
            assign[s] = name
        pos += k
    out: dict[str, list[str]] = {name: [] for name in [*fractions, "train"]}
    for key in sorted(metadata):
        out[assign.get(metadata[key].subject, "train")].append(key)
    return out


@dataclass
class Batch:
    keys: list[str]
    volumes: torch.Tensor  # (B, 1, X, Y, Z) z-scored
    mean: list[float]
    std: list[float]
    metas: list[gs.SampleMeta]


def check_volume_set(ss: gs.ShardSet, shape: tuple[int, int, int]) -> None:
    g = ss.manifest.geometry
    if g.shape is not None and tuple(g.shape) != tuple(shape):
        raise ValueError(f"{ss.location}: volumes of shape {tuple(g.shape)}, the tokenizer expects {tuple(shape)}")


def iter_batches(ss: gs.ShardSet, keys: Iterable[str] | None, batch_size: int, shape: tuple[int, int, int],
                 shuffle: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> Iterator[Batch]:
    """Z-scored batches of the samples in ``keys`` (all when None), this rank's share of the set."""
    wanted = None if keys is None else set(keys)
    buf: list[tuple[str, np.ndarray, float, float, gs.SampleMeta]] = []
    for s in ss.iter_split(rank=rank, world_size=world_size, seed=seed, epoch=epoch, shuffle=shuffle):
        if wanted is not None and s.key not in wanted:
            continue
        vol = s.arrays["volume"]
        if tuple(vol.shape) != tuple(shape):
            raise ValueError(f"{ss.location}: sample {s.key}: volume shape {tuple(vol.shape)} != tokenizer shape {tuple(shape)}")
        z, mean, std = zscore_brain(vol, s.key)
        buf.append((s.key, z, mean, std, s.meta))
        if len(buf) == batch_size:
            yield _collate(buf)
            buf = []
    if buf and not drop_last:
        yield _collate(buf)


def _collate(buf: list[tuple[str, np.ndarray, float, float, gs.SampleMeta]]) -> Batch:
    return Batch(keys=[b[0] for b in buf], volumes=torch.from_numpy(np.stack([b[1] for b in buf]))[:, None],
                 mean=[b[2] for b in buf], std=[b[3] for b in buf], metas=[b[4] for b in buf])
