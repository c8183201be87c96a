"""What the DiT trains on, chosen once per run: generation items or longitudinal pairs.

Both kinds answer the same questions, so the training loop never asks which one it has:

- ``records``: per item, the metadata its conditions are read from;
- ``reject_key(i)``: the data key a rejected item is logged under;
- ``keep(indices)``: keep only the items whose conditions the model can encode (``records`` too);
- ``statistics_indices()``: the latents the normalisation statistics come from;
- ``loss(module, latents, idx, cond, gen, device)``: the training loss of the items ``idx``.

Batches come from a per-epoch permutation seeded by (seed, epoch) and a cursor (epoch, position);
every random draw of a step comes from a generator seeded by (seed, step, rank): resume is
bit-exact on the CPU and independent of the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import g3n_shards as gs
import torch

from .bridge import bridge_loss
from .conditions import CondBatch
from .config import RunConfig
from .data import LatentData, Pair, build_pairs
from .flow import flow_matching_loss


class TrainingItems(Protocol):
    records: list[dict[str, Any]]

    def reject_key(self, i: int) -> str: ...
    def keep(self, indices: Sequence[int]) -> None: ...
    def statistics_indices(self) -> torch.Tensor: ...
    def loss(self, module: torch.nn.Module, latents: torch.Tensor, idx: torch.Tensor, cond: CondBatch,
             gen: torch.Generator, device: torch.device) -> torch.Tensor: ...


class GenerationItems:
    """One latent per item: conditional flow matching from noise."""

    what = "samples"

    def __init__(self, run_cfg: RunConfig, data: LatentData):
        self.tcfg, self.data = run_cfg.train, data
        self.records = list(data.metas)
        self.index = torch.arange(len(self.records))

    def reject_key(self, i: int) -> str:
        return self.data.keys[i]

    def keep(self, indices: Sequence[int]) -> None:
        self.records = [self.records[i] for i in indices]
        self.index = torch.tensor(list(indices))

    def statistics_indices(self) -> torch.Tensor:
        return self.index

    def loss(self, module, latents, idx, cond, gen, device):
        t = self.tcfg
        return flow_matching_loss(module, latents[self.index[idx]].to(device), cond, gen, t.time_sampling, t.time_mean,
                                  t.time_std)


class LongitudinalItems:
    """(baseline, follow-up) pairs of one subject: the bridge from baseline to follow-up."""

    what = "pairs"

    def __init__(self, run_cfg: RunConfig, data: LatentData, rejects: gs.RejectLog | None):
        assert run_cfg.bridge is not None
        self.bridge, self.data = run_cfg.bridge, data
        self.pairs: list[Pair] = build_pairs(data, run_cfg.bridge, rejects)
        self.records = [p.record for p in self.pairs]
        self._index()

    def _index(self) -> None:
        self.base = torch.tensor([p.base for p in self.pairs])
        self.follow = torch.tensor([p.follow for p in self.pairs])

    def reject_key(self, i: int) -> str:
        return self.data.keys[self.pairs[i].base]

    def keep(self, indices: Sequence[int]) -> None:
        self.pairs = [self.pairs[i] for i in indices]
        self.records = [self.records[i] for i in indices]
        self._index()

    def statistics_indices(self) -> torch.Tensor:
        return torch.unique(torch.cat([self.base, self.follow]))

    def loss(self, module, latents, idx, cond, gen, device):
        xb, xf = latents[self.base[idx]].to(device), latents[self.follow[idx]].to(device)
        return bridge_loss(module, xb, xf, cond, gen, self.bridge)


def training_items(run_cfg: RunConfig, data: LatentData, rejects: gs.RejectLog | None) -> TrainingItems:
    """The run's items; ``rejects`` logs unusable pairs (None on resume: logged when the run started)."""
    if run_cfg.task == "longitudinal":
        return LongitudinalItems(run_cfg, data, rejects)
    return GenerationItems(run_cfg, data)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8191 + rank)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def next_batch(n: int, batch: int, cursor: dict[str, int], seed: int) -> tuple[torch.Tensor, dict[str, int]]:
    """The next ``batch`` item indices from the cursor; an epoch's tail continues into the next."""
    epoch, pos = int(cursor["epoch"]), int(cursor["pos"])
    out: list[torch.Tensor] = []
    need = batch
    while need:
        perm = epoch_permutation(n, seed, epoch)
        take = perm[pos : pos + need]
        out.append(take)
        need -= len(take)
        pos += len(take)
        if pos >= n:
            epoch, pos = epoch + 1, 0
    return torch.cat(out), {"epoch": epoch, "pos": pos}
