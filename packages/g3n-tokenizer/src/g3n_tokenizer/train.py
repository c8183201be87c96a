"""Tokenizer training: a nanoGPT-like loop with early stopping on a held-out validation split.

* Only the tokenizer's ``train_module`` is optimised (MAE-CNN: projection + CNN decoder; the
  frozen encoder runs under ``no_grad`` outside it; AutoencoderKL: the whole autoencoder).
* AdamW, weight decay on matrices only; gradient clipping; bf16 autocast on CUDA (config).
* Engines: plain torch (default, CPU/GPU) or DeepSpeed (``engine: deepspeed``; ZeRO stage from the
  config, launched with the ``deepspeed`` launcher for several GPUs), as in g3n-mae.
* Each epoch ends with the validation loss = the configured voxel loss of the deterministic
  reconstruction ``decode(encode(x))`` on the validation subjects. The best epoch is written to
  ``<out>/tokenizer.safetensors`` (that file *is* the tokenizer); ``<out>/last.safetensors`` plus
  ``train_state.safetensors`` (AdamW moments and step per named parameter, the same keys for both
  engines, consolidated from ZeRO partitions) / ``train_state.json`` allow ``resume``, which then
  continues with the same per-step losses as an uninterrupted run (CPU, either engine). The JSON
  also holds every rank's random-number state at the end of the epoch (python, numpy, torch CPU
  and CUDA generators, via g3n-mae's ``rng_state``), which resume restores, so stochastic training
  (AutoencoderKL's reparameterised latent sample) continues the same random stream. Training
  stops after ``patience`` epochs without improvement, at ``max_epochs``, or on a non-finite loss.
* Warm start (``init``): the trainable module starts from another checkpoint of the same tokenizer
  and config (``TorchTokenizer.load_init``) with a fresh optimizer and epoch 0; resume (state
  present) wins over it. The init's path and SHA-256 go into ``train_state.json`` and the
  metadata of the checkpoints written (``init``).
* Everything is written atomically (no pickle); ``train_state.json`` is written last and records
  the SHA-256 of the two tensor files it belongs with; ``metrics.jsonl`` has one line per epoch.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import g3n_shards as gs
from g3n_mae.checkpoint import rng_state, set_rng_state
from g3n_mae.train import DeepSpeedEngine as MaeDeepSpeedEngine
from g3n_mae.train import Dist as MaeDist

from .base import TorchTokenizer, voxel_loss
from .checkpoint import atomic_save_safetensors, atomic_write_text, file_sha256
from .config import TrainConfig
from .data import iter_batches, split_subjects
from .errors import CheckpointError

BEST_NAME = "tokenizer.safetensors"
LAST_NAME = "last.safetensors"
STATE_NAME = "train_state.json"
OPTIM_NAME = "train_state.safetensors"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/Inf; the best checkpoint so far is intact."""


@dataclass
class TrainResult:
    checkpoint: Path
    digest: str
    best_val: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    splits: dict[str, list[str]] = field(default_factory=dict)


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices/kernels only (nanoGPT); never on biases or norms."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.precision == "auto" else cfg.precision == "bf16"


class TorchEngine:
    name = "torch"

    def __init__(self, module: torch.nn.Module, cfg: TrainConfig, device: torch.device):
        self.module, self.cfg, self.device = module, cfg, device
        self.bf16 = use_bf16(cfg, device)
        self.optimizer = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))

    def step(self, inputs: torch.Tensor, target: torch.Tensor) -> float:
        self.module.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, _ = self.module(inputs, target)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"training loss is {float(loss)}")
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def optim_state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, p in self.module.named_parameters():
            st = self.optimizer.state.get(p)
            if st:
                out[f"exp_avg/{name}"] = st["exp_avg"].detach().cpu()
                out[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].detach().cpu()
                out[f"step/{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(()).cpu()
        return out

    def load_optim_state(self, optim: dict[str, torch.Tensor]) -> None:
        for name, p in self.module.named_parameters():
            if f"exp_avg/{name}" in optim:
                self.optimizer.state[p] = {
                    "step": optim[f"step/{name}"].clone().float(),
                    "exp_avg": optim[f"exp_avg/{name}"].to(p.device, p.dtype).clone(),
                    "exp_avg_sq": optim[f"exp_avg_sq/{name}"].to(p.device, p.dtype).clone(),
                }


class _DeepSpeedStateIO(MaeDeepSpeedEngine):
    """g3n-mae's DeepSpeed state consolidation (``full_state`` / ``load_full_state``) over an
    engine built here.

    g3n-mae's engine already knows how to read and write AdamW moments, step and fp32 masters by
    parameter name for ZeRO-0 (plain or bf16-wrapped optimizer) and ZeRO-1/2 (flat partitions,
    including DeepSpeed 0.19's lazily linked second param group); reusing it keeps one copy of
    that version-sensitive code. Only its state methods are used: its ``forward``/``step`` assume
    the MAE's signature, so it is kept private rather than being the tokenizer's engine.
    """

    def __init__(self, engine: Any):
        # no super().__init__(): that would build a second DeepSpeed engine; these three attributes
        # are all the state methods read (``dist`` only for ZeRO-3, which the tokenizer refuses)
        self.engine = engine
        self.module = engine.module
        self.dist = MaeDist(rank=torch.distributed.get_rank() if torch.distributed.is_initialized() else 0)


class DeepSpeedEngine:
    """DeepSpeed over the trainable module only (the frozen encoder is never cast or partitioned).

    bf16 comes from ``torch.autocast`` around the forward (as in the torch engine), not from
    DeepSpeed's bf16 mode, so the module keeps fp32 weights and a checkpoint is the fp32 master
    copy. ZeRO stages 0-2 (optimizer state/gradient partitioning) are supported; stage 3 would
    partition the weights themselves, which a 44 M-parameter decoder does not need.
    """

    name = "deepspeed"

    def __init__(self, module: torch.nn.Module, cfg: TrainConfig, device: torch.device):
        import deepspeed

        if cfg.zero_stage > 2:
            raise ValueError(f"zero_stage {cfg.zero_stage}: the tokenizer trainer supports ZeRO stages 0-2")
        self.cfg, self.device = cfg, device
        self.bf16 = use_bf16(cfg, device)
        if not torch.distributed.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29511")
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        ds_cfg = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "steps_per_print": 10**9,
        }
        opt = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds_cfg)
        self.module = self.engine.module
        self._state_io = _DeepSpeedStateIO(self.engine)

    def step(self, inputs: torch.Tensor, target: torch.Tensor) -> float:
        self.engine.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, _ = self.engine(inputs, target)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"training loss is {float(loss)}")
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach())

    def optim_state(self) -> dict[str, torch.Tensor]:
        """AdamW moments and step keyed by parameter name, consolidated from ZeRO's flat partitions.

        The same keys as :meth:`TorchEngine.optim_state` (``exp_avg/<name>``, ``exp_avg_sq/<name>``,
        ``step/<name>``), so the file does not depend on the engine, ZeRO stage or world size.
        Under ZeRO-1/2 consolidation is a collective: every rank must call this, not only rank 0.
        """
        return self._state_io.full_state()[1]

    def load_optim_state(self, optim: dict[str, torch.Tensor]) -> None:
        """Restore the moments and step, and make the module's current weights the fp32 masters.

        Call it after the resumed weights are in ``self.module``: under ZeRO-1/2 the optimizer
        updates a separate fp32 master copy and writes it back over the module's parameters after
        every step, so weights copied only into the module would be lost at the first step.
        """
        with torch.no_grad():
            current = {n: p.detach().clone() for n, p in self.module.named_parameters()}
            current.update({n: b.detach().clone() for n, b in self.module.named_buffers()})
        self._state_io.load_full_state(current, optim)


def build_engine(module: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    if cfg.engine == "torch":
        return TorchEngine(module, cfg, device)
    if cfg.engine == "deepspeed":
        return DeepSpeedEngine(module, cfg, device)
    raise ValueError(f"unknown engine {cfg.engine!r} (torch | deepspeed)")


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def validation_loss(tok: TorchTokenizer, ss: gs.ShardSet, keys: list[str], batch_size: int, loss_kind: str) -> float:
    """Mean voxel loss of decode(encode(x)) over ``keys`` (deterministic: no posterior sampling)."""
    assert tok.geometry.shape is not None
    total, n = 0.0, 0
    for b in iter_batches(ss, keys, batch_size, tok.geometry.shape):
        x = b.volumes.to(tok.device)
        recon = tok.decode(tok.encode(x))
        total += float(voxel_loss(loss_kind, recon, x)) * len(b.keys)
        n += len(b.keys)
    if n == 0:
        raise ValueError(f"{ss.location}: the validation split is empty")
    return total / n


def _tokenizer_state_with(tok: TorchTokenizer, module_state: dict[str, torch.Tensor]) -> None:
    """Put fp32 master weights (e.g. from DeepSpeed) back into the tokenizer's trainable module."""
    with torch.no_grad():
        own = tok.train_module.state_dict()
        for k, v in module_state.items():
            own[k].copy_(v.to(own[k].dtype))


def _check_resume_files(out: Path, state: dict[str, Any]) -> None:
    """Refuse to resume from a mixed set of files.

    ``last.safetensors``, ``train_state.safetensors`` and ``train_state.json`` are each replaced
    atomically, but one after the other, with the JSON last; a run killed in between leaves newer
    weights/moments beside an older JSON, which would silently re-run an epoch from the wrong
    state. The JSON records the SHA-256 of the two tensor files it belongs with (older runs' JSON
    lacks the record and is accepted as before).
    """
    for name, digest in (state.get("resume_files") or {}).items():
        path = out / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; {out / STATE_NAME} needs it to resume")
        if file_sha256(path) != digest:
            raise CheckpointError(f"{path}: does not match {out / STATE_NAME} (the run was stopped while saving "
                                  f"epoch {state.get('epoch')}); restart the run without resume")


def _gather_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state (JSON-able), in rank order; a collective when ``world > 1``."""
    own = rng_state()
    if world == 1:
        return [own]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, own)
    return out


def _restore_rng(rngs: Any, rank: int, world: int) -> None:
    """Continue this rank's saved random stream; with another world size (or a state written before
    RNG states were saved) the run keeps the fresh ``cfg.seed`` streams instead."""
    if isinstance(rngs, list) and len(rngs) == world:
        set_rng_state(rngs[rank])
    elif rngs is not None and rank == 0:
        tqdm.write(f"resume: RNG states of {len(rngs)} processes, now {world}; random streams restart from the seed")


def train_tokenizer(tok: TorchTokenizer, volumes: gs.ShardSet, cfg: TrainConfig, out_dir: str | Path,
                    splits: dict[str, list[str]] | None = None, loss_kind: str = "mse", resume: bool = False,
                    progress: bool = True, init: str | Path | None = None) -> TrainResult:
    """Train ``tok`` on the train split of ``volumes``; early-stop on the val split. See module doc.

    ``init``: a tokenizer checkpoint to warm-start the trainable module from (ignored, with one
    log line, when ``resume`` finds a run to continue, so a restarted job does not start over)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    assert tok.geometry.shape is not None
    shape = tuple(tok.geometry.shape)
    if volumes.manifest.geometry.shape is not None and tuple(volumes.manifest.geometry.shape) != shape:
        raise ValueError(f"{volumes.location}: volumes of shape {tuple(volumes.manifest.geometry.shape)}, "
                         f"tokenizer expects {shape}")
    if splits is None:
        splits = split_subjects(volumes.metadata(), {"val": cfg.val_fraction}, seed=cfg.seed)
    train_keys, val_keys = list(splits.get("train", [])), list(splits.get("val", []))
    if not train_keys or not val_keys:
        raise ValueError(f"{volumes.location}: need training and validation samples (train {len(train_keys)}, val {len(val_keys)})")
    if not tok.volume_geometry:
        from .base import volume_geometry_from

        tok.volume_geometry = volume_geometry_from(volumes.manifest.geometry)
    resuming = resume and (out / STATE_NAME).is_file()
    init_record = None
    if init is not None and not resuming:  # before the engine: ZeRO-1/2 copy the module's weights as fp32 masters
        init_record = tok.load_init(init)
    _seed(cfg.seed)
    device = tok.device
    engine = build_engine(tok.train_module, cfg, device)
    tok.bf16 = engine.bf16
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    state: dict[str, Any] = {"epoch": 0, "best_val": math.inf, "best_epoch": -1, "bad_epochs": 0, "history": [], "step": 0,
                             "init": init_record}
    if init_record is not None and rank == 0:
        tqdm.write(f"init: {tok.name} trainable weights from {init_record['path']} (sha256 {init_record['sha256']})")
    if resuming:
        if init is not None and rank == 0:
            tqdm.write(f"resume: continuing {out}; --init {init} not applied")
        state = json.loads((out / STATE_NAME).read_text())
        _check_resume_files(out, state)
        last = type(tok).from_checkpoint(out / LAST_NAME)
        _tokenizer_state_with(tok, last.train_module.state_dict())
        from safetensors.torch import load_file

        engine.load_optim_state(load_file(str(out / OPTIM_NAME)))
        # last: loading above draws no random numbers, but keep the restored streams untouched
        _restore_rng(state.get("rng"), rank, world)
    state.pop("rng", None)  # written afresh each epoch, not carried in ``state``
    data_manifest = volumes.manifest.digest
    metrics_path = out / "metrics.jsonl"
    stopped_early = False
    train_set = set(train_keys)
    resume_files: dict[str, str] = {}
    provenance = {"init": json.dumps(state["init"], sort_keys=True)} if state.get("init") else {}
    while state["epoch"] < cfg.max_epochs:
        epoch = state["epoch"]
        t0, losses = time.time(), []
        batches = iter_batches(volumes, train_set, cfg.batch_size, shape, shuffle=True, seed=cfg.seed, epoch=epoch,
                               rank=rank, world_size=world, drop_last=False)
        bar = tqdm(batches, desc=f"{tok.name} epoch {epoch}", unit="batch", disable=not progress, leave=False)
        for i, b in enumerate(bar):
            if cfg.steps_per_epoch is not None and i >= cfg.steps_per_epoch:
                break
            x = b.volumes.to(device)
            losses.append(engine.step(tok.train_inputs(x), x))
            state["step"] += 1
            if i % cfg.log_every == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        val = validation_loss(tok, volumes, val_keys, cfg.batch_size, loss_kind)
        if not math.isfinite(val):
            raise NonFiniteLossError(f"validation loss is {val} at epoch {epoch}")
        improved = val < state["best_val"] - cfg.min_delta
        row = {"epoch": epoch, "step": state["step"], "train_loss": float(np.mean(losses)) if losses else None,
               "val_loss": val, "improved": improved, "seconds": round(time.time() - t0, 3)}
        state["history"].append(row)
        optim = engine.optim_state()  # on every rank: a collective under ZeRO-1/2
        rngs = _gather_rng_states(world)  # every rank's stream as it enters the next epoch
        if rank == 0:
            if improved:
                tok.save(out / BEST_NAME, extra={"epoch": str(epoch), "val_loss": repr(val), "data_manifest": data_manifest,
                                                 **provenance})
            resume_files[LAST_NAME] = tok.save(out / LAST_NAME, extra={"epoch": str(epoch), **provenance})
            atomic_save_safetensors(optim, out / OPTIM_NAME, {"format": "g3n-tokenizer-optimizer"})
            resume_files[OPTIM_NAME] = file_sha256(out / OPTIM_NAME)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # rank 0's files are complete before anyone reads them
        if improved:
            state.update(best_val=val, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        if rank == 0:
            atomic_write_text(out / STATE_NAME, json.dumps({**state, "config": cfg.model_dump(mode="json"),
                                                             "tokenizer": tok.name, "splits": {k: len(v) for k, v in splits.items()},
                                                             "data_manifest": data_manifest,
                                                             "resume_files": resume_files, "rng": rngs}, indent=1))
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if progress:
            tl = "n/a" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
            tqdm.write(f"[{tok.name}] epoch {epoch}: train {tl} val {val:.4f}"
                       + (" *" if improved else f" (no improvement {state['bad_epochs']}/{cfg.patience})"))
        if state["bad_epochs"] >= cfg.patience:
            stopped_early = True
            break
    best = out / BEST_NAME
    best_tok = type(tok).from_checkpoint(best, map_location=device)
    return TrainResult(checkpoint=best, digest=best_tok.checkpoint_digest or "", best_val=state["best_val"],
                       best_epoch=state["best_epoch"], epochs_run=state["epoch"], stopped_early=stopped_early,
                       history=state["history"], splits=splits)
