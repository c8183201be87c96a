"""Local multi-process data-parallel training without a launcher (CPU/gloo or one node's GPUs).

The ``deepspeed`` launcher (or ``torchrun``) is the way to run on many GPUs and nodes. This
helper spawns ``world_size`` processes on this machine with the same environment contract
(MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) and calls :func:`g3n_mae.train.train` in each,
which is what the data-parallel equivalence test uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.multiprocessing as mp
from g3n_train.dist import free_port  # re-exported: tests and tools import it from here

from .config import MAEConfig


@dataclass(frozen=True)
class SourceSpec:
    """A picklable description of the training data: a shard set path or synthetic volumes."""

    shards: str | None = None
    synthetic: int = 0
    synthetic_seed: int = 0

    def open(self, img_size: tuple[int, int, int]):
        if self.shards:
            import g3n_shards as gs

            return gs.ShardSet.open(self.shards, kind="volumes", stored_dtype=True)
        from .data import InMemoryVolumes, brain_like_volumes

        return InMemoryVolumes(brain_like_volumes(self.synthetic, img_size, seed=self.synthetic_seed))




def _worker(rank: int, world_size: int, port: int, cfg_json: str, spec: SourceSpec, run_dir: str, resume: bool, threads: int,
            init: str | None = None, accept_checkpoint_config: bool = False) -> None:
    import torch

    from .train import train

    if threads:
        torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    cfg = MAEConfig.model_validate_json(cfg_json)
    try:
        train(cfg, spec.open(cfg.model.img_size), run_dir, resume=resume, log=(print if rank == 0 else (lambda s: None)),
              init=init, accept_checkpoint_config=accept_checkpoint_config)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(
    world_size: int, cfg: MAEConfig, spec: SourceSpec, run_dir: str | Path, resume: bool = False, threads: int = 1,
    start_method: str = "spawn", init: str | Path | None = None, accept_checkpoint_config: bool = False,
) -> None:
    """Train with ``world_size`` local processes; returns when all have finished.

    ``start_method="fork"`` skips re-importing torch in each child (much faster on a busy CPU
    machine); keep ``spawn`` when CUDA is initialised in the parent.
    """
    mp.start_processes(
        _worker, args=(world_size, free_port(), cfg.model_dump_json(), spec, str(run_dir), resume, threads,
                       None if init is None else str(init), accept_checkpoint_config),
        nprocs=world_size, join=True, start_method=start_method,
    )
