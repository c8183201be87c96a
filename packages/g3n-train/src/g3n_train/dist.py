"""Distributed setup: join the process group a launcher describes, or stay one process.

The ``deepspeed`` launcher and ``torchrun`` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; a stage started without one runs as rank 0 of 1. The DeepSpeed engine always needs
a process group (even of one), the torch engine only with several processes.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """Where this process stands: its rank, the world size, its local rank and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_distributed(engine: str, device: torch.device | str | None = None) -> Dist:
    """Join the launcher's process group (DeepSpeed: always, a group of one without a launcher).

    ``device``: where this process computes; default ``cuda:LOCAL_RANK`` when CUDA is available,
    else the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if engine == "deepspeed" and not dist.is_initialized():
        import deepspeed

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()) if world == 1 else "29500")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        deepspeed.init_distributed(dist_backend=backend)
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank, world, local_rank, device)


def all_mean(x: float, d: Dist) -> float:
    """The mean of ``x`` over the ranks (a collective when there are several)."""
    if d.world_size == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / d.world_size


def gather(obj: Any, d: Dist) -> list[Any]:
    """Every rank's ``obj`` (JSON-able), in rank order (a collective when there are several)."""
    if d.world_size == 1:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()
