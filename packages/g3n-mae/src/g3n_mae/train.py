"""MAE pretraining: read it top to bottom (nanoGPT style).

Setup (engine kind, processes, resume or warm start, model and engine, data, logs), then the loop,
one comment per phase. The training machinery is g3n-train's, shared by every stage:

* engines: ``torch`` (the model, + DDP with several processes, + AdamW; bf16 autocast on CUDA;
  no DeepSpeed import: unit tests use this path) and ``deepspeed`` (ZeRO stage from the config,
  DeepSpeed's bf16 mode on CUDA; launch many GPUs/nodes with the ``deepspeed`` launcher). Both
  hand over *consolidated* tensors keyed by parameter name, which is what makes checkpoints
  engine- and world-size-independent.
* the learning rate is a pure function of the step (linear warm-up, then cosine to ``min_lr``),
  so there is no scheduler state to save. Masking noise comes from the data stream (per sample,
  from seed/epoch/key), so resuming restores: weights, AdamW moments and step, data cursors and
  RNG states; on CPU with ``deterministic`` a resumed run's losses are bit-identical to an
  uninterrupted run's.
* a resume compares the requested config with the checkpoint's (``RESUME_MUTABLE`` may change;
  any other difference is refused unless ``accept_checkpoint_config``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from g3n_train import (
    Dist, Engine, EngineSpec, LRSchedule, NonFiniteLossError, TorchEngine, all_mean, barrier, build_engine, check_loss,
    deterministic_algorithms, gather, non_finite_tensors, resolve_engine, resolve_resume_config, rng_state,
    seed_everything, set_rng_state, setup_distributed, use_bf16,
)

from .checkpoint import (
    CheckpointError, atomic_write_text, export_model, find_latest, load_checkpoint, read_init_weights, save_checkpoint,
)
from .config import MAEConfig
from .data import VolumeBatchStream, VolumeSource, make_loader, zscore_brain_torch
from .flops import train_flops_per_volume
from .model import MAE3D

__all__ = ["NonFiniteLossError", "RESUME_MUTABLE", "TorchEngine", "TrainResult", "engine_spec", "lr_at", "train"]

#: Config fields a resume may change: how far the run goes and how it is executed and logged.
#: ``train.batch_size`` (per process) may change too when the global batch stays the same (N -> M processes).
RESUME_MUTABLE = (
    "train.total_steps", "train.engine", "train.zero_stage", "train.zero_bucket_size", "train.precision",
    "train.num_workers", "train.log_every", "train.ckpt_every", "train.keep_last", "train.tensorboard",
    "train.compile", "train.deterministic",
)


@dataclass
class TrainResult:
    steps: int
    losses: list[tuple[int, float]]
    last_checkpoint: Path | None
    volumes_per_s: float


def lr_at(step: int, cfg: MAEConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr`` at ``total_steps``."""
    t = cfg.train
    return LRSchedule(lr=t.lr, warmup_steps=t.warmup_steps, total_steps=t.total_steps, min_lr=t.min_lr)(step)


def engine_spec(cfg: MAEConfig, kind: str, device: torch.device) -> EngineSpec:
    """The MAE's requests of its engine: no weight decay on the mask token; fused AdamW on the torch
    engine; DeepSpeed's own bf16 mode (the volume stays fp32 and the reconstruction target keeps
    full precision: the patch embedding casts its input to the bf16 weights)."""
    t = cfg.train
    return EngineSpec(
        lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas), grad_clip=t.grad_clip, micro_batch_size=t.batch_size,
        bf16=use_bf16(t.precision, device), bf16_mode="deepspeed", fused=kind == "torch", no_decay_names=("mask_token",),
        zero_stage=t.zero_stage, zero_bucket_size=t.zero_bucket_size, compile=t.compile,
    )


@dataclass
class _Start:
    """Where a run starts: fresh, from a checkpoint of this run, or from warm-start weights."""

    ckpt_dir: Path | None = None
    ckpt_state: dict[str, Any] | None = None
    model_sd: dict[str, torch.Tensor] | None = None
    optim: dict[str, torch.Tensor] | None = None
    init_sd: dict[str, torch.Tensor] | None = None
    init_record: dict[str, Any] | None = None


@dataclass
class _Progress:
    """What the loop advances, and what a checkpoint records of it."""

    step: int = 0
    samples_seen: int = 0
    cursors: dict[int, Any] = field(default_factory=dict)
    next_worker: int = 0
    last_ckpt: Path | None = None
    last_loss: float = float("nan")
    lr: float = 0.0


def train(
    cfg: MAEConfig,
    source: VolumeSource,
    run_dir: str | Path,
    resume: bool = False,
    data_manifests: list[str] | None = None,
    stop_at: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] = print,
    init: str | Path | None = None,
    accept_checkpoint_config: bool = False,
) -> TrainResult:
    """Pretrain the MAE on ``source``; checkpoints and logs go to ``run_dir``.

    Args:
        cfg: full config. On ``resume`` it is compared with the checkpoint's: ``RESUME_MUTABLE``
            fields apply (logged); any other difference raises ``ResumeConfigError`` naming the
            fields, unless ``accept_checkpoint_config`` (then the checkpoint's values are kept, logged).
        source: volume source (a ``volumes`` ShardSet or an in-memory source).
        resume: continue from ``run_dir/checkpoints`` latest (start, saying so, if there is none; a
            run already at ``total_steps`` returns at once).
        data_manifests: digests of the training shard sets (recorded in checkpoints/model card).
        stop_at: stop after this global step (and checkpoint), e.g. to split a run into jobs.
        on_step: called as ``on_step(step, loss)`` after every step (tests use it to kill a run).
        init: warm start from these full MAE weights (weights file, export, checkpoint or run dir):
            loaded strictly into the new model before training; optimizer, schedule and step start
            fresh. The architecture must equal ``cfg.model`` (see ``read_init_weights``). A
            checkpoint found by ``resume`` wins (the init is then not applied), so a job that is
            restarted with the same command continues its run instead of starting over. The init's
            path and SHA-256 are recorded in every checkpoint's ``state.json`` and in the model card.
    """
    run_dir = Path(run_dir)
    main_log = log
    kind = resolve_engine(cfg.train.engine, log)
    d = setup_distributed(kind)
    if not d.is_main:
        log = lambda s: None  # noqa: E731 - one process speaks
    # ---- resume (the config is checked against the checkpoint's) or warm start -----------------
    cfg, start = _resume_or_init(cfg, run_dir, resume, init, accept_checkpoint_config, d, log)
    t = cfg.train
    with deterministic_algorithms(t.deterministic):
        # ---- model and engine: identical init on every rank, then per-rank random streams ------
        seed_everything(t.seed)
        model = MAE3D(cfg.model)
        if start.init_sd is not None:  # before the engine: DeepSpeed takes its fp32 masters from the module
            try:
                model.load_state_dict(start.init_sd, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"{start.init_record['path']}: --init weights do not match the model: {e}") from None
        engine = build_engine(kind, model, engine_spec(cfg, kind, d.device), d)
        seed_everything(t.seed + 1000 * d.rank + 1)
        progress = _restore(engine, start, cfg, d, log)
        if progress.step >= t.total_steps:
            return _finished(run_dir, start.ckpt_dir, progress.step, t.total_steps, log)
        # ---- data ---------------------------------------------------------------------------------
        stream = VolumeBatchStream(
            source, t.batch_size, cfg.model.img_size, cfg.model.num_patches, rank=d.rank, world_size=d.world_size,
            seed=t.seed, shuffle=t.shuffle, cursors=progress.cursors, worker_offset=progress.next_worker,
            rejects_path=run_dir / "rejects.jsonl",
        )
        batches = iter(make_loader(stream, t.num_workers))
        progress.cursors = {int(k): v for k, v in progress.cursors.items()}
        # ---- logs ---------------------------------------------------------------------------------
        metrics = _Metrics(run_dir, cfg, progress.step, d, main_log)
        log(f"g3n-mae train: engine={engine.name} world={d.world_size} device={d.device} bf16={engine.bf16} "
            f"params={_num_params(engine.module):,} tokens={cfg.model.num_patches} visible={cfg.model.num_visible}")
        loop = _Loop(cfg=cfg, d=d, engine=engine, batches=batches, progress=progress, metrics=metrics, run_dir=run_dir,
                     end=t.total_steps if stop_at is None else min(stop_at, t.total_steps), on_step=on_step, log=log,
                     state_extra={"data_manifests": data_manifests or [], "init": start.init_record})
        return _run_loop(loop)


@dataclass
class _Loop:
    cfg: MAEConfig
    d: Dist
    engine: Engine
    batches: Iterator[dict[str, Any]]
    progress: _Progress
    metrics: _Metrics
    run_dir: Path
    end: int
    on_step: Callable[[int, float], None] | None
    log: Callable[[str], None]
    state_extra: dict[str, Any]


def _run_loop(run: _Loop) -> TrainResult:
    """The training loop: batch, learning rate, forward, NaN guard, backward and update, log, checkpoint."""
    cfg, d, engine, p = run.cfg, run.d, run.engine, run.progress
    t = cfg.train
    global_batch = t.batch_size * d.world_size
    losses: list[tuple[int, float]] = []
    start_time = time.perf_counter()
    engine.module.train()
    while p.step < run.end:
        # the batch (data-stream masking noise rides with it) and this step's learning rate
        batch = next(run.batches)
        p.lr = lr_at(p.step, cfg)
        engine.set_lr(p.lr)
        volume = zscore_brain_torch(batch["volume"].to(d.device, non_blocking=True))
        noise = batch["noise"].to(d.device, non_blocking=True)
        # forward; a non-finite loss stops the run before it reaches the weights
        with engine.autocast():
            loss, _, _ = engine.model(volume, noise=noise)
        loss_val = all_mean(float(loss.detach()), d)
        check_loss(loss_val, p.step + 1, p.last_ckpt, "Lower lr, enable grad_clip or check the input data.")
        # backward and update (a non-finite gradient is not applied)
        engine.backward(loss)
        try:
            gnorm = engine.step()
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"step {p.step + 1}: {e}. Last good checkpoint: {p.last_ckpt or 'none'}") from None
        # bookkeeping: step, samples, data cursors
        p.step += 1
        p.samples_seen += global_batch
        p.cursors[int(batch["worker"])] = batch["cursor"]
        p.next_worker = (int(batch["worker"]) + 1) % max(1, t.num_workers)
        p.last_loss = loss_val
        losses.append((p.step, loss_val))
        if run.on_step is not None:
            run.on_step(p.step, loss_val)
        # log and checkpoint
        if d.is_main and (p.step % t.log_every == 0 or p.step == run.end):
            run.metrics.write(p, gnorm, global_batch)
        if p.step % t.ckpt_every == 0 or p.step == run.end:
            p.last_ckpt = _checkpoint(run)
    run.metrics.close()
    if p.step == t.total_steps and d.is_main and p.last_ckpt is not None:
        # the finished run's deliverable: plain safetensors + config + MODEL_CARD.md
        run.log(f"export {export_model(p.last_ckpt, run.run_dir / 'export')}")
    total = time.perf_counter() - start_time
    return TrainResult(p.step, losses, p.last_ckpt, len(losses) * global_batch / max(total, 1e-9))


# ---------------------------------------------------------------------------------------------
# setup helpers
# ---------------------------------------------------------------------------------------------


def _resume_or_init(cfg: MAEConfig, run_dir: Path, resume: bool, init: str | Path | None, accept: bool, d: Dist,
                    log: Callable[[str], None]) -> tuple[MAEConfig, _Start]:
    ckpt_root = run_dir / "checkpoints"
    ckpt_dir = find_latest(ckpt_root) if resume else None
    if resume and ckpt_dir is None:
        # a job started with --resume from its first run (a pipeline stage, a job script) starts
        # when there is nothing to continue yet
        log(f"resume: no checkpoint under {ckpt_root} yet; starting " + ("from --init" if init else "from scratch"))
    if ckpt_dir is not None:
        if init is not None:
            log(f"resume: continuing {ckpt_dir}; --init {init} not applied")
        model_sd, optim, state = load_checkpoint(ckpt_dir)
        cfg = _resume_config(cfg, state, accept, d, log, ckpt_dir)
        # provenance of the run's warm start carries over
        return cfg, _Start(ckpt_dir, state, model_sd, optim, init_record=state.get("init"))
    if init is not None:
        init_sd, record = read_init_weights(init, cfg.model)
        changed = "".join(f"; {k} {a} -> {b}" for k, (a, b) in record.get("objective_changed", {}).items())
        log(f"init: weights from {record['path']} (sha256 {record['sha256']}){changed}; optimizer and step fresh")
        return cfg, _Start(init_sd=init_sd, init_record=record)
    return cfg, _Start()


def _resume_config(cfg: MAEConfig, state: dict[str, Any], accept: bool, d: Dist, log: Callable[[str], None],
                   where: Path) -> MAEConfig:
    """The checkpoint's config with the allowed requested changes (see ``RESUME_MUTABLE``)."""
    saved = state["config"]
    mutable = list(RESUME_MUTABLE)
    saved_global = saved["train"]["batch_size"] * int(state.get("world_size", 1))
    if cfg.train.batch_size * d.world_size == saved_global:  # N -> M processes with the same global batch
        mutable.append("train.batch_size")
    merged = resolve_resume_config(cfg.model_dump(mode="json"), saved, mutable, accept, log, str(where), ignore=["preset"])
    return MAEConfig.model_validate(merged)


def _restore(engine: Engine, start: _Start, cfg: MAEConfig, d: Dist, log: Callable[[str], None]) -> _Progress:
    """Weights, AdamW state, step, data cursors and RNG streams from the checkpoint (if any)."""
    p = _Progress(last_ckpt=start.ckpt_dir)
    state = start.ckpt_state
    if state is None:
        return p
    engine.load_state(start.model_sd, start.optim)
    p.step, p.samples_seen = int(state["step"]), int(state.get("samples_seen", 0))
    t = cfg.train
    ranks = state["data"]["ranks"]
    if state.get("world_size") == d.world_size and state.get("num_workers") == t.num_workers:
        p.cursors = ranks[d.rank]["cursors"]
        p.next_worker = int(ranks[d.rank]["next_worker"])
        set_rng_state(state["rng"][d.rank])
    else:
        # N -> M processes: weights, optimizer and step carry over exactly; the data stream
        # cannot be re-split mid-epoch, so every rank starts the epoch after the furthest one.
        last_epoch = max(int(c["epoch"]) for r in ranks for c in r["cursors"].values()) if ranks else -1
        p.cursors = {w: {"epoch": last_epoch + 1, "cursor": None} for w in range(max(1, t.num_workers))}
        log(f"resume: {state.get('world_size')} -> {d.world_size} processes; data restarts at epoch {last_epoch + 1}")
    log(f"resumed from {start.ckpt_dir} at step {p.step}")
    return p


def _finished(run_dir: Path, ckpt_dir: Path | None, step: int, total: int, log: Callable[[str], None]) -> TrainResult:
    """A finished run resumed again (e.g. a pipeline stage killed after training, during a later
    command) has nothing left to train: make sure its deliverable exists and stop."""
    log(f"resume: {ckpt_dir} is at step {step}, total_steps {total}: finished already")
    if ckpt_dir is not None and not (run_dir / "export" / "model.safetensors").is_file():
        log(f"export {export_model(ckpt_dir, run_dir / 'export')}")
    return TrainResult(step, [], ckpt_dir, 0.0)


def _checkpoint(run: _Loop) -> Path:
    """Consolidate (a collective under ZeRO), refuse non-finite weights, rank 0 writes."""
    p, d, t = run.progress, run.d, run.cfg.train
    ckpt_root = run.run_dir / "checkpoints"
    model_sd, optim = run.engine.state()
    bad = non_finite_tensors(model_sd)
    if bad:  # never overwrite good checkpoints with broken weights
        raise NonFiniteLossError(f"step {p.step}: non-finite weights ({bad[:4]}); not saved. "
                                 f"Last good checkpoint: {p.last_ckpt or 'none'}")
    data_state = gather({"cursors": {str(k): v for k, v in p.cursors.items()}, "next_worker": p.next_worker}, d)
    rngs = gather(rng_state(), d)
    path = None
    if d.is_main:
        state = {
            "config": run.cfg.model_dump(mode="json"), "samples_seen": p.samples_seen, "world_size": d.world_size,
            "num_workers": t.num_workers, "engine": run.engine.name, "data": {"ranks": data_state}, "rng": rngs,
            **run.state_extra,
            "figures": {"loss": p.last_loss, "lr": p.lr, "step": p.step, "samples_seen": p.samples_seen},
        }
        path = save_checkpoint(ckpt_root, p.step, run.cfg.model, model_sd, optim, state, t.keep_last)
        run.log(f"checkpoint {path}")
    barrier(d)
    return path or ckpt_root / f"step_{p.step:08d}"


class _Metrics:
    """``metrics.jsonl`` (and TensorBoard when asked), written by rank 0."""

    def __init__(self, run_dir: Path, cfg: MAEConfig, step: int, d: Dist, log: Callable[[str], None]):
        self.path, self.log, self.tb = run_dir / "metrics.jsonl", log, None
        self.flops_per_volume = train_flops_per_volume(cfg.model)
        self.t0, self.window_start = time.perf_counter(), step
        if not d.is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.model_dump(mode="json"), indent=1))
        _truncate_metrics(self.path, step)
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=step if step else None)

    def write(self, p: _Progress, gnorm: float, global_batch: int) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        steps = p.step - self.window_start
        rec = {"step": p.step, "loss": p.last_loss, "lr": p.lr, "grad_norm": gnorm,
               "volumes_per_s": steps * global_batch / dt,
               "tflops_per_s": self.flops_per_volume * global_batch * steps / dt / 1e12, "samples_seen": p.samples_seen}
        self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "volumes_per_s"):
                self.tb.add_scalar(f"train/{k}", rec[k], p.step)
        self.t0, self.window_start = time.perf_counter(), p.step

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint (they came from the interrupted run)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _num_params(module: torch.nn.Module) -> int:
    """Full parameter count; under ZeRO-3 each local tensor is an empty shard (``ds_numel`` is the full size)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())
