"""Training data: a streaming, resumable, rank- and worker-split batch stream of z-scored volumes.

The stream reads from any *volume source* with the ``iter_split`` API of
``g3n_shards.ShardSet`` (a ``volumes`` shard set in production, :class:`InMemoryVolumes` in tests):
every (rank, worker) pair reads its own disjoint part of each epoch, and each sample carries a
``cursor`` that, passed back, resumes that part exactly where it stopped.

Design choices, and why:

* Batches are assembled *inside* each worker and the stream never ends (a worker rolls into
  its next epoch by itself). The ``DataLoader`` then serves whole batches round-robin from its
  workers, so the batch sequence is a pure function of (seed, per-worker cursors, which worker is
  next): that is what makes ``--resume`` exact. ``worker_offset`` rotates logical worker ids so
  that after a resume the worker that was due next is served first.
* Masking noise is drawn per sample from (seed, epoch, key) (:func:`masking.sample_noise`), never
  from the process RNG: masks do not depend on batch composition or on the number of ranks.
* Per-volume z-scoring over brain voxels (> 0) happens at load time, not on disk (docs/method.md
  §1); background stays 0. The stream only validates and batches the stored values; the loop
  z-scores the batch on the device (:func:`zscore_brain_torch`), which is what keeps the loader
  cheap enough for GPU-rate training.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from g3n_shards.intensity import zscore_brain as _zscore_brain

from .masking import sample_noise


class DataError(ValueError):
    """A sample cannot be used (wrong shape, empty brain); the message names the sample."""


class VolumeSample(Protocol):
    key: str
    arrays: dict[str, np.ndarray]
    cursor: Any


class VolumeSource(Protocol):
    def iter_split(
        self, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1, seed: int = 0,
        epoch: int = 0, shuffle: bool = True, cursor: Any = None,
    ) -> Iterator[VolumeSample]: ...

    def __len__(self) -> int: ...


# ---------------------------------------------------------------------------------------------
# in-memory source (tests, demos); same split semantics as a shard set
# ---------------------------------------------------------------------------------------------


@dataclass
class MemorySample:
    key: str
    arrays: dict[str, np.ndarray]
    cursor: dict
    meta: Any = None


@dataclass
class InMemoryVolumes:
    """Keyed volumes held in memory, split like a shard set.

    Epoch ``e`` visits a permutation drawn from (seed, e); split ``s = worker * world_size + rank``
    of ``S = world_size * num_workers`` takes positions ``s, s + S, ...``. With one worker, the
    union of the ranks' b-th batches is the single-process batch of ``world_size`` times the
    size, which is what the data-parallel equivalence test relies on.
    """

    volumes: dict[str, np.ndarray]
    keys_sorted: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.keys_sorted = sorted(self.volumes)

    def __len__(self) -> int:
        return len(self.keys_sorted)

    def iter_split(self, rank=0, world_size=1, worker=0, num_workers=1, seed=0, epoch=0, shuffle=True, cursor=None):
        n = len(self.keys_sorted)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        split, nsplit = worker * world_size + rank, world_size * num_workers
        mine = order[split::nsplit]
        start = 0
        if cursor is not None:
            if cursor.get("epoch") != epoch:
                raise DataError(f"cursor {cursor} is for another epoch than {epoch}")
            start = int(cursor["pos"])
        for pos in range(start, len(mine)):
            key = self.keys_sorted[mine[pos]]
            yield MemorySample(key, {"volume": self.volumes[key]}, {"epoch": epoch, "pos": pos + 1})


def brain_like_volumes(n: int, shape: tuple[int, int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Small synthetic brain-like volumes (ellipsoid brain, darker 'ventricles', smooth texture).

    For tests and the CPU demo only; the project's real synthetic cohort lives in g3n-data.
    Subject size and ventricle size vary smoothly so the MAE has structure to learn.
    """
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    out = {}
    for i in range(n):
        r = rng.uniform(0.7, 0.9, size=3)
        brain = (x / r[0]) ** 2 + (y / r[1]) ** 2 + (z / r[2]) ** 2 < 1.0
        v = rng.uniform(0.1, 0.35)
        vent = (x / v) ** 2 + ((y - 0.1) / (1.5 * v)) ** 2 + (z / v) ** 2 < 1.0
        k = rng.uniform(2, 5, size=3)
        ph = rng.uniform(0, 2 * np.pi, size=3)
        tex = np.sin(k[0] * np.pi * x + ph[0]) * np.sin(k[1] * np.pi * y + ph[1]) * np.sin(k[2] * np.pi * z + ph[2])
        vol = np.where(brain, 100.0 + 20.0 * tex + rng.normal(0, 2.0, size=shape), 0.0)
        vol = np.where(vent & brain, 30.0, vol)
        out[f"synth-{i:05d}"] = np.clip(vol, 0, None).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------


def check_volume(volume: np.ndarray, key: str = "?") -> None:
    """Refuse volumes that cannot be z-scored: NaN/Inf, or no brain voxel (> 0)."""
    v = np.asarray(volume)
    if not np.isfinite(v).all():
        raise DataError(f"sample {key}: volume contains NaN or Inf")
    if not (v > 0).any():
        raise DataError(f"sample {key}: no brain voxel (> 0) to z-score")


def zscore_brain(volume: np.ndarray, key: str = "?") -> np.ndarray:
    """Z-score over brain voxels (> 0); background stays 0: :func:`g3n_shards.intensity.zscore_brain`
    (the one numpy implementation), after this loader's checks (:class:`DataError`).

    Training and encoding use :func:`zscore_brain_torch` on the device (it matches this to float32
    precision, tested): the loader then only decodes, which keeps hundreds of 160x192x160 volumes
    per second within reach of a few CPU workers.
    """
    check_volume(volume, key)
    return _zscore_brain(volume, key)[0]


def zscore_brain_torch(x: torch.Tensor) -> torch.Tensor:
    """Batched z-score over brain voxels (> 0) of (N, C, X, Y, Z) volumes; float32 out, background 0."""
    x = x.float()
    brain = x > 0
    dims = tuple(range(1, x.ndim))
    n = brain.sum(dim=dims, keepdim=True).clamp_min(1)
    mean = torch.where(brain, x, 0.0).sum(dim=dims, keepdim=True) / n
    var = torch.where(brain, (x - mean) ** 2, 0.0).sum(dim=dims, keepdim=True) / n
    std = var.sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(brain, (x - mean) / std, 0.0)


# ---------------------------------------------------------------------------------------------
# the batch stream
# ---------------------------------------------------------------------------------------------


class VolumeBatchStream(IterableDataset):
    """Endless stream of batches ``{"volume", "noise", "keys", "worker", "cursor"}`` for one rank.

    Args:
        source: a volume source (``g3n_shards.ShardSet`` or :class:`InMemoryVolumes`).
        batch_size: volumes per batch (per rank).
        img_size: expected volume shape; a mismatch raises :class:`DataError` naming the key.
        num_tokens: tokens per volume (for the masking noise).
        rank, world_size: this process in the data-parallel group.
        seed, shuffle: epoch order.
        cursors: {logical worker: {"epoch", "cursor"}} from a checkpoint, or None for a fresh start.
        worker_offset: logical id of the worker the loader serves first (see module doc).
    """

    def __init__(
        self, source: VolumeSource, batch_size: int, img_size: tuple[int, int, int], num_tokens: int,
        rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
        cursors: dict[int, dict] | None = None, worker_offset: int = 0, rejects_path: str | Path | None = None,
    ):
        super().__init__()
        self.rejects_path = Path(rejects_path) if rejects_path is not None else None
        self.source, self.batch_size, self.img_size, self.num_tokens = source, batch_size, tuple(img_size), num_tokens
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.cursors = {int(k): v for k, v in (cursors or {}).items()}
        self.worker_offset = worker_offset

    def _load(self, sample: VolumeSample) -> np.ndarray:
        arrays = sample.arrays
        if "volume" not in arrays:
            raise DataError(f"sample {sample.key}: no 'volume' array (has {sorted(arrays)})")
        vol = np.asarray(arrays["volume"])
        if vol.ndim == 4 and vol.shape[-1] == 1:
            vol = vol[..., 0]
        if tuple(vol.shape) != self.img_size:
            raise DataError(f"sample {sample.key}: volume shape {tuple(vol.shape)} != model img_size {self.img_size}")
        check_volume(vol, sample.key)
        return vol  # as stored (float16 from shards): z-scored on the device by the training loop

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        nw = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.worker_offset) % nw
        state = self.cursors.get(worker)
        epoch = int(state["epoch"]) if state else 0
        cursor = state["cursor"] if state else None
        vols, noises, keys = [], [], []
        rejected: set[str] = set()
        while True:
            got = 0
            for s in self.source.iter_split(
                rank=self.rank, world_size=self.world_size, worker=worker, num_workers=nw, seed=self.seed,
                epoch=epoch, shuffle=self.shuffle, cursor=cursor,
            ):
                try:
                    vol = self._load(s)
                except DataError as e:
                    if self.rejects_path is None:
                        raise
                    if s.key not in rejected:  # skip it every epoch, log it once per reader
                        rejected.add(s.key)
                        self._reject(s.key, str(e))
                    continue
                got += 1
                vols.append(vol)
                noises.append(sample_noise(self.seed, epoch, s.key, self.num_tokens))
                keys.append(s.key)
                if len(vols) == self.batch_size:
                    yield {
                        "volume": torch.from_numpy(np.stack(vols)).unsqueeze(1),  # one copy, writable
                        "noise": torch.stack(noises),
                        "keys": keys,
                        "worker": worker,
                        "cursor": {"epoch": epoch, "cursor": s.cursor},
                    }
                    vols, noises, keys = [], [], []
            if got == 0 and cursor is None:
                raise DataError(
                    f"rank {self.rank} worker {worker}: no usable sample in its split ({len(self.source)} samples "
                    f"for {self.world_size} ranks x {nw} workers, {len(rejected)} rejected"
                    + (f", see {self.rejects_path})" if self.rejects_path else ")")
                )
            epoch, cursor = epoch + 1, None

    def _reject(self, key: str, reason: str) -> None:
        """Append one line to rejects.jsonl (flushed: a killed run keeps what it logged)."""
        self.rejects_path.parent.mkdir(parents=True, exist_ok=True)
        rec = {"path": None, "subject": None, "key": key, "step": "train", "reason": reason, "rank": self.rank}
        with open(self.rejects_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()


def make_loader(stream: VolumeBatchStream, num_workers: int) -> torch.utils.data.DataLoader:
    """Batches come pre-assembled; the loader only adds worker processes (round-robin, in order)."""
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, prefetch_factor=2 if num_workers else None,
        pin_memory=torch.cuda.is_available(),
    )
