"""Tokenizer training: a nanoGPT-like loop with early stopping on a held-out validation split.

* Only the tokenizer's ``train_module`` is optimised (MAE-CNN: projection + CNN decoder; the
  frozen encoder runs under ``no_grad`` outside it; AutoencoderKL: the whole autoencoder).
* AdamW, weight decay on matrices only; gradient clipping; bf16 autocast on CUDA (config).
* Engines (g3n-train's, shared by every stage): plain torch (default, CPU/GPU) or DeepSpeed
  (``engine: deepspeed``; ZeRO stage 0-2 from the config, launched with the ``deepspeed`` launcher
  for several GPUs).
* Each epoch ends with the validation loss = the configured voxel loss of the deterministic
  reconstruction ``decode(encode(x))`` on the validation subjects. The best epoch is written to
  ``<out>/tokenizer.safetensors`` (that file *is* the tokenizer); ``<out>/last.safetensors`` plus
  ``train_state.safetensors`` (AdamW moments and step per named parameter, the same keys for both
  engines, consolidated from ZeRO partitions) / ``train_state.json`` allow ``resume``, which then
  continues with the same per-step losses as an uninterrupted run (CPU, either engine). The JSON
  also holds every rank's random-number state at the end of the epoch (python, numpy, torch CPU
  and CUDA generators, via g3n-train's ``rng_state``), which resume restores, so stochastic training
  (AutoencoderKL's reparameterised latent sample) continues the same random stream. Training
  stops after ``patience`` epochs without improvement, at ``max_epochs``, or on a non-finite loss.
  A resume compares the requested settings with the run's (``RESUME_MUTABLE`` may change, logged;
  any other difference is refused naming the fields, unless ``accept_checkpoint_config``).
* ``freeze`` keeps named parts of the trainable module fixed (MAE-CNN ``proj``: a decoder-only
  fine-tune leaves every latent as it was); ``flip_axes`` mirrors training volumes at random.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import g3n_shards as gs
from g3n_train import (
    Dist, Engine, EngineSpec, NonFiniteLossError, barrier, build_engine as build_train_engine, gather,
    resolve_resume_config, rng_state, set_rng_state, setup_distributed, use_bf16,
)

from .base import TorchTokenizer, voxel_loss
from .checkpoint import atomic_save_safetensors, atomic_write_text, file_sha256, read_header
from .config import TrainConfig
from .data import iter_batches, split_subjects
from .errors import CheckpointError

__all__ = ["NonFiniteLossError", "RESUME_MUTABLE", "TrainResult", "build_engine", "freeze_parts", "random_flips",
           "train_step", "train_tokenizer", "validation_loss"]

BEST_NAME = "tokenizer.safetensors"
LAST_NAME = "last.safetensors"
STATE_NAME = "train_state.json"
OPTIM_NAME = "train_state.safetensors"

#: TrainConfig fields a resume may change: how long to go on and how the run is executed and logged.
RESUME_MUTABLE = ("train.max_epochs", "train.patience", "train.engine", "train.zero_stage", "train.precision",
                  "train.log_every")


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


def build_engine(module: torch.nn.Module, cfg: TrainConfig, d: Dist) -> Engine:
    """The engine over the trainable module only (the frozen encoder is never cast or partitioned).

    bf16 is ``torch.autocast`` around the forward on either engine (not DeepSpeed's bf16 mode), so
    the module keeps fp32 weights and a checkpoint is the fp32 master copy. ZeRO stages 0-2
    (optimizer state / gradient partitioning); stage 3 would partition the weights themselves,
    which a 44 M-parameter decoder does not need.
    """
    if cfg.engine == "deepspeed" and cfg.zero_stage > 2:
        raise ValueError(f"zero_stage {cfg.zero_stage}: the tokenizer trainer supports ZeRO stages 0-2")
    spec = EngineSpec(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), grad_clip=cfg.grad_clip,
                      micro_batch_size=cfg.batch_size, bf16=use_bf16(cfg.precision, d.device), zero_stage=cfg.zero_stage)
    return build_train_engine(cfg.engine, module, spec, d)


def freeze_parts(module: torch.nn.Module, prefixes: tuple[str, ...]) -> int:
    """Keep the parameters named ``prefix`` or ``prefix.*`` out of training; returns how many
    values that freezes. A prefix that names nothing is an error listing the module's parts."""
    n = 0
    for prefix in prefixes:
        hit = [p for name, p in module.named_parameters() if name == prefix or name.startswith(prefix + ".")]
        if not hit:
            parts = sorted({name.split(".")[0] for name, _ in module.named_parameters()})
            raise ValueError(f"freeze {prefix!r}: no such part of the trainable module (its parts: {', '.join(parts)})")
        for p in hit:
            p.requires_grad_(False)
            n += p.numel()
    return n


def random_flips(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Mirror each volume of ``x`` (B, 1, X, Y, Z) along each of ``axes`` with probability 1/2.

    Draws from torch's global generator, which the trainer seeds and checkpoints with every epoch,
    so a resumed run flips the same volumes as an uninterrupted one."""
    for a in axes:
        pick = torch.rand(x.shape[0]) < 0.5
        if pick.any():
            x = x.clone()
            x[pick] = x[pick].flip(a + 2)
    return x


def train_step(engine: Engine, tok: TorchTokenizer, x: torch.Tensor, flip_axes: tuple[int, ...] = ()) -> float:
    """One optimizer step on volumes ``x`` (randomly mirrored along ``flip_axes``); returns the
    loss (a non-finite one raises, nothing applied)."""
    x = random_flips(x, flip_axes)
    engine.module.train()
    with engine.autocast():
        loss, _ = engine.model(tok.train_inputs(x), x)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"training loss is {float(loss)}")
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


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


def train_tokenizer(tok: TorchTokenizer, volumes: gs.ShardSet, cfg: TrainConfig, out_dir: str | Path,
                    splits: dict[str, list[str]] | None = None, loss_kind: str = "mse", resume: bool = False,
                    progress: bool = True, init: str | Path | None = None,
                    accept_checkpoint_config: bool = False) -> TrainResult:
    """Train ``tok`` on the train split of ``volumes``; early-stop on the val split. See module doc.

    ``init``: a tokenizer checkpoint to warm-start the trainable module from (ignored, with one
    log line, when ``resume`` finds a run to continue, so a restarted job does not start over).
    ``accept_checkpoint_config``: on resume, keep the run's own values where ``cfg`` differs in
    fields a resume cannot change (logged) instead of refusing."""
    # ---- setup: data splits, resume (settings checked against the run's) or warm start ------
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape, train_keys, val_keys, splits = _splits(tok, volumes, cfg, splits)
    d = setup_distributed(cfg.engine, device=tok.device)
    say = tqdm.write if d.is_main else (lambda s: None)
    saved = _read_resume_state(out, tok, cfg, accept_checkpoint_config, say) if resume and (out / STATE_NAME).is_file() else None
    if saved is not None:
        cfg = TrainConfig.model_validate(saved.pop("_config"))
        if init is not None:
            say(f"resume: continuing {out}; --init {init} not applied")
    init_record = None
    if init is not None and saved is None:  # before the engine: ZeRO-1/2 copy the module's weights as fp32 masters
        init_record = tok.load_init(init)
        say(f"init: {tok.name} trainable weights from {init_record['path']} (sha256 {init_record['sha256']})")
    # ---- engine, then the saved weights, optimizer state and random streams --------------------
    frozen = freeze_parts(tok.train_module, cfg.freeze)
    if frozen:
        say(f"freeze: {frozen} of {sum(p.numel() for p in tok.train_module.parameters())} trainable-module "
            f"parameters kept as they are ({', '.join(cfg.freeze)})")
    _seed(cfg.seed)
    engine = build_engine(tok.train_module, cfg, d)
    tok.bf16 = engine.bf16
    state: dict[str, Any] = {"epoch": 0, "best_val": math.inf, "best_epoch": -1, "bad_epochs": 0, "history": [],
                             "step": 0, "init": init_record}
    if saved is not None:
        state = _restore(tok, engine, out, saved, d, say)
    # ---- epochs: train, validate, checkpoint, early stopping -----------------------------------
    run = _Run(tok=tok, engine=engine, volumes=volumes, cfg=cfg, d=d, out=out, shape=shape, train_keys=set(train_keys),
               val_keys=val_keys, splits=splits, loss_kind=loss_kind, progress=progress, state=state)
    stopped_early = False
    while state["epoch"] < cfg.max_epochs:
        _epoch(run)
        if state["bad_epochs"] >= cfg.patience:
            stopped_early = True
            break
    best = out / BEST_NAME
    best_tok = type(tok).from_checkpoint(best, map_location=tok.device)
    return TrainResult(checkpoint=best, digest=best_tok.checkpoint_digest or "", best_val=state["best_val"],
                       best_epoch=state["best_epoch"], epochs_run=state["epoch"], stopped_early=stopped_early,
                       history=state["history"], splits=splits)


@dataclass
class _Run:
    tok: TorchTokenizer
    engine: Engine
    volumes: gs.ShardSet
    cfg: TrainConfig
    d: Dist
    out: Path
    shape: tuple[int, ...]
    train_keys: set[str]
    val_keys: list[str]
    splits: dict[str, list[str]]
    loss_kind: str
    progress: bool
    state: dict[str, Any]
    resume_files: dict[str, str] = field(default_factory=dict)
    rngs: list[dict[str, Any]] = field(default_factory=list)


def _epoch(run: _Run) -> None:
    """One epoch: the training steps, the validation loss, the checkpoint files, the log line."""
    tok, cfg, state, d = run.tok, run.cfg, run.state, run.d
    epoch = state["epoch"]
    # train: this rank's share of the shuffled train split (at most steps_per_epoch batches)
    t0, losses = time.time(), []
    batches = iter_batches(run.volumes, run.train_keys, cfg.batch_size, run.shape, shuffle=True, seed=cfg.seed,
                           epoch=epoch, rank=d.rank, world_size=d.world_size, drop_last=False)
    bar = tqdm(batches, desc=f"{tok.name} epoch {epoch}", unit="batch", disable=not run.progress, leave=False)
    for i, b in enumerate(bar):
        if cfg.steps_per_epoch is not None and i >= cfg.steps_per_epoch:
            break
        losses.append(train_step(run.engine, tok, b.volumes.to(tok.device), cfg.flip_axes))
        state["step"] += 1
        if i % cfg.log_every == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    # validate
    val = validation_loss(tok, run.volumes, run.val_keys, cfg.batch_size, run.loss_kind)
    if not math.isfinite(val):
        raise NonFiniteLossError(f"validation loss is {val} at epoch {epoch}")
    improved = val < state["best_val"] - cfg.min_delta
    row = {"epoch": epoch, "step": state["step"], "train_loss": float(np.mean(losses)) if losses else None,
           "val_loss": val, "improved": improved, "seconds": round(time.time() - t0, 3)}
    state["history"].append(row)
    # checkpoint: best and last weights, optimizer state, then the JSON that ties them together
    _save_epoch(run, epoch, val, improved)
    if improved:
        state.update(best_val=val, best_epoch=epoch, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch + 1
    if d.is_main:
        atomic_write_text(run.out / STATE_NAME, json.dumps(
            {**state, "config": cfg.model_dump(mode="json"), "tokenizer": tok.name,
             "splits": {k: len(v) for k, v in run.splits.items()}, "data_manifest": run.volumes.manifest.digest,
             "resume_files": run.resume_files, "rng": run.rngs}, indent=1))
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    if run.progress:
        tl = "n/a" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
        tqdm.write(f"[{tok.name}] epoch {epoch}: train {tl} val {val:.4f}"
                   + (" *" if improved else f" (no improvement {state['bad_epochs']}/{cfg.patience})"))


def _save_epoch(run: _Run, epoch: int, val: float, improved: bool) -> None:
    """Consolidate the optimizer state and RNG streams (collectives), rank 0 writes the tensor files."""
    provenance = {"init": json.dumps(run.state["init"], sort_keys=True)} if run.state.get("init") else {}
    optim = run.engine.state()[1]  # on every rank: a collective under ZeRO-1/2
    run.rngs = gather(rng_state(), run.d)  # every rank's stream as it enters the next epoch
    if run.d.is_main:
        if improved:
            run.tok.save(run.out / BEST_NAME, extra={"epoch": str(epoch), "val_loss": repr(val),
                                                     "data_manifest": run.volumes.manifest.digest, **provenance})
        run.resume_files[LAST_NAME] = run.tok.save(run.out / LAST_NAME, extra={"epoch": str(epoch), **provenance})
        run.resume_files[OPTIM_NAME] = atomic_save_safetensors(optim, run.out / OPTIM_NAME,
                                                               {"format": "g3n-tokenizer-optimizer"})
    barrier(run.d)  # rank 0's files are complete before anyone reads them


# ---------------------------------------------------------------------------------------------
# setup helpers
# ---------------------------------------------------------------------------------------------


def _splits(tok: TorchTokenizer, volumes: gs.ShardSet, cfg: TrainConfig, splits: dict[str, list[str]] | None):
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
    return shape, train_keys, val_keys, splits


def _seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _read_resume_state(out: Path, tok: TorchTokenizer, cfg: TrainConfig, accept: bool, say) -> dict[str, Any]:
    """The saved state, its files checked, the settings compared (``_config``: the ones to run with).

    The tokenizer and its architecture must be the run's (the tokenizer is already built from the
    caller's settings, so they cannot be taken from the checkpoint); ``RESUME_MUTABLE`` training
    fields may change; other training fields are refused or, with ``accept``, the run's are kept.
    """
    state = json.loads((out / STATE_NAME).read_text())
    _check_resume_files(out, state)
    header = read_header(out / LAST_NAME)
    resolve_resume_config({"tokenizer": tok.name, "model": tok.config_dict()},
                          {"tokenizer": header.get("tokenizer"), "model": header["config"]}, [], log=say,
                          where=str(out), acceptable=False)
    requested = {"train": cfg.model_dump(mode="json")}
    merged = resolve_resume_config(requested, {"train": state.get("config", requested["train"])}, RESUME_MUTABLE,
                                   accept, say, str(out))
    state["_config"] = merged["train"]
    return state


def _restore(tok: TorchTokenizer, engine: Engine, out: Path, state: dict[str, Any], d: Dist, say) -> dict[str, Any]:
    """Last epoch's weights into the trainable module, then the optimizer state (the module's
    weights become the fp32 masters), then the random streams; returns the training state."""
    last = type(tok).from_checkpoint(out / LAST_NAME)
    with torch.no_grad():
        own = tok.train_module.state_dict()
        for k, v in last.train_module.state_dict().items():
            own[k].copy_(v.to(own[k].dtype))
        current = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        current.update({n: b.detach().clone() for n, b in engine.module.named_buffers()})
    from safetensors.torch import load_file

    engine.load_state(current, load_file(str(out / OPTIM_NAME)))
    # last: loading above draws no random numbers, but keep the restored streams untouched
    rngs = state.pop("rng", None)
    if isinstance(rngs, list) and len(rngs) == d.world_size:
        set_rng_state(rngs[d.rank])
    elif rngs is not None:
        # another world size (or a state written before RNG states were saved): fresh cfg.seed streams
        say(f"resume: RNG states of {len(rngs)} processes, now {d.world_size}; random streams restart from the seed")
    for k in ("_config", "config", "tokenizer", "splits", "data_manifest", "resume_files"):
        state.pop(k, None)
    return state


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
