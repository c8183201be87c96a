"""A nanoGPT-like training loop for the DiT (generation) and the longitudinal bridge.

Read :func:`train` top to bottom: the run's settings (checked against the checkpoint on resume),
its items (generation samples or longitudinal pairs, chosen once: ``g3n_dit.items``), conditions,
latent statistics, model, engine and EMA, then the loop with one comment per phase.

- The learning rate is a pure function of the step (warm-up + cosine), so "restoring the schedule"
  is restoring the step.
- Every random draw of a step (t, noise, condition dropout) comes from a CPU generator seeded by
  (seed, step, rank); the batch comes from a per-epoch permutation seeded by (seed, epoch) and a
  cursor (epoch, position). Resume is therefore bit-exact on the CPU and independent of the device;
  every rank's global RNG state is saved and restored as well.
- Latents are normalised per channel with statistics of the training set, stored in every
  checkpoint (sampling de-normalises with them).
- Engines (g3n-train's, shared by every stage): ``torch`` (one process, CPU or one GPU) and
  ``deepspeed`` (data parallel over ranks, launched with the ``deepspeed`` launcher; ZeRO stage 0,
  1 or 2). Both hand the optimizer state to the checkpoint *consolidated* by parameter name, so a
  checkpoint does not depend on the engine, the ZeRO stage or the number of ranks; DeepSpeed's own
  pickled checkpoints are not used.
- Resume: the requested settings are compared with the checkpoint's. ``RESUME_MUTABLE`` (how the
  run is executed and logged, and ``max_steps`` when passed) apply with a log line; any other
  difference is refused naming the fields, unless ``accept_checkpoint_config``.
- Warm start (``init``): raw and EMA weights from another run's checkpoint, fresh optimizer and
  step 0; see :func:`train`.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import g3n_shards as gs
import torch
from g3n_train import (
    Dist, Engine, EngineSpec, LRSchedule, barrier, build_engine, gather, resolve_resume_config, rng_state,
    setup_distributed,
)
from tqdm import tqdm

from .checkpoint import Checkpoint, CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from .conditions import Condition, ConditionError, CondBatch, cond_index, drop_conditions, encode, resolve_conditions
from .config import RunConfig, TrainConfig
from .data import LatentData, normalisation_stats
from .flow import autocast_for, resolve_precision
from .items import TrainingItems, next_batch, step_generator, training_items
from .model import DiT

__all__ = ["RESUME_MUTABLE", "TrainResult", "TrainingError", "check_init", "load_model", "lr_at", "next_batch", "train"]


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, resume against a different data set, ...)."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    losses: list[float] = field(default_factory=list)
    samples_per_s: float = 0.0


#: TrainConfig fields a resume takes from the caller rather than from the checkpoint: how the run
#: is executed and logged. ``max_steps`` too, when passed to :func:`train`.
RESUME_OVERRIDES = ("engine", "zero_stage", "precision", "num_threads", "log_every", "ckpt_every", "keep_last")
RESUME_MUTABLE = tuple(f"train.{k}" for k in (*RESUME_OVERRIDES, "max_steps"))


def lr_at(step: int, cfg: TrainConfig) -> float:
    return LRSchedule(lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio,
                      warmup_shift=0, constant=cfg.schedule == "constant")(step)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach().to(e.dtype), alpha=1 - decay)


def conditions_state(conds: Sequence[Condition]) -> list[dict[str, Any]]:
    return [{"spec": c.spec.model_dump(mode="json"), "vocab": list(c.vocab)} for c in conds]


def train(
    run_cfg: RunConfig,
    data: LatentData,
    run_dir: str | Path,
    *,
    resume: bool = True,
    max_steps: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    init: str | Path | None = None,
    accept_checkpoint_config: bool = False,
) -> TrainResult:
    """Train (or resume) a run in ``run_dir``. ``stop_after`` ends the call after that many steps
    without changing the schedule (used to test resume); ``max_steps`` overrides the config's (and,
    on resume, the checkpoint's).

    ``init`` warm-starts a new run from another run's checkpoint (a run folder: its latest; or a
    step folder): its raw weights go into the model and its EMA weights into the EMA copy, both
    strictly; optimizer, schedule and step start fresh. Task, model config, conditions and
    vocabularies must match (:func:`check_init`). The init's latent normalisation statistics are
    KEPT, not recomputed on the new latents: the network learned its velocity field in that
    normalised space, and a warm start is meant for latents of the same (at most briefly
    fine-tuned) tokenizer, whose statistics barely move; recomputing them would shift every
    input and target the network sees. (Keeping them is always possible: equal model configs give
    equal statistic shapes, and ``train.normalise`` must match.) A checkpoint in ``run_dir`` that
    ``resume`` continues wins over ``init`` (one log line), so a restarted job does not start over.
    The init's path, step and weight digests are recorded in every checkpoint (``state.json`` ``init``).

    ``accept_checkpoint_config``: on resume, keep the checkpoint's values where ``run_cfg`` differs
    in fields a resume cannot change (each logged) instead of refusing.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rejects = gs.RejectLog(run_dir / gs.REJECTS_NAME)
    # ---- settings: the checkpoint's on resume (allowed changes applied), or a warm start ---------
    if max_steps:  # recorded in the checkpoint, so a later resume keeps the extended schedule
        run_cfg = run_cfg.model_copy(update={"train": run_cfg.train.model_copy(update={"max_steps": max_steps})})
    run_cfg, ck, init_ck = _resume_or_init(run_cfg, data, run_dir, resume, init, max_steps, accept_checkpoint_config)
    tcfg = run_cfg.train
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    data.check_model(run_cfg.model)
    # ---- items (generation samples or longitudinal pairs) and their conditions ----------------
    items = training_items(run_cfg, data, rejects if ck is None else None)
    conds = ck.conditions() if ck is not None else resolve_conditions(run_cfg.conditions, items.records, data.vocab)
    if init_ck is not None:
        check_init(init_ck, run_cfg, conds)
    cond_all = _usable_conditions(items, conds, data, None if ck is not None else rejects)
    # ---- latent statistics: the checkpoint's, the init's, or this training set's ---------------
    norm = _statistics(ck, init_ck, data, items, tcfg)
    latents = (data.latents - norm[0]) / norm[1]
    # ---- model, engine and EMA ---------------------------------------------------------------
    torch.manual_seed(tcfg.seed)
    model = DiT(run_cfg.model, conds)
    start = ck or init_ck
    if start is not None:  # before the engine: DeepSpeed takes its fp32 masters from the module
        _load_strict(model, start.model, start.path, "raw")
    engine = _engine(model, tcfg, device)
    ema = copy.deepcopy(engine.module).eval().requires_grad_(False)
    if start is not None:
        _load_strict(ema, start.ema, start.path, "EMA")
    step, cursor = 0, {"epoch": 0, "pos": 0}
    if ck is not None:  # optimizer state, random streams and data cursor of the resumed run
        engine.load_state(ck.model, ck.optimizer_state(engine.module))
        ck.restore_rng(engine.dist.rank, engine.dist.world_size)
        step, cursor = ck.step, dict(ck.state["cursor"])
    state_base = {
        "run_config": run_cfg.model_dump(mode="json"),
        "conditions": conditions_state(conds),
        "data": {"digest": data.digest, "location": data.location, "geometry": data.geometry,
                 "tokenizer": data.tokenizer, "items": len(items.records)},
        "init": _init_record(ck, init_ck),
    }
    loop = _Loop(run_cfg=run_cfg, run_dir=run_dir, engine=engine, ema=ema, items=items, conds=conds,
                 cond_all=cond_all, latents=latents, norm=norm, state_base=state_base, step=step, cursor=cursor,
                 end=tcfg.max_steps if stop_after is None else min(tcfg.max_steps, step + stop_after), progress=progress)
    return _run_loop(loop)


@dataclass
class _Loop:
    run_cfg: RunConfig
    run_dir: Path
    engine: Engine
    ema: torch.nn.Module
    items: TrainingItems
    conds: list[Condition]
    cond_all: CondBatch
    latents: torch.Tensor
    norm: tuple[torch.Tensor, torch.Tensor]
    state_base: dict[str, Any]
    step: int
    cursor: dict[str, int]
    end: int
    progress: bool


def _run_loop(run: _Loop) -> TrainResult:
    """The loop: learning rate, batch, the step's random draws, loss, update, EMA, log, checkpoint."""
    tcfg, engine, d = run.run_cfg.train, run.engine, run.engine.dist
    dev = d.device
    per_rank = tcfg.batch_size // d.world_size
    n_items = len(run.items.records)
    losses: list[float] = []
    last_ckpt: Path | None = None
    bar = tqdm(total=run.end - run.step, desc=f"train {run.run_cfg.task}", unit="step", disable=not run.progress or d.rank != 0)
    t0, seen, window = time.perf_counter(), 0, []
    precision = resolve_precision(tcfg.precision, dev)  # logged with every record: "auto" differs by machine
    engine.module.train()
    while run.step < run.end:
        # learning rate, and this rank's slice of the next global batch
        lr = lr_at(run.step, tcfg)
        engine.set_lr(lr)
        idx, run.cursor = next_batch(n_items, tcfg.batch_size, run.cursor, tcfg.seed)
        idx = idx[d.rank * per_rank : (d.rank + 1) * per_rank]
        # the step's random draws (time, noise, condition dropout) from its own generator
        gen = step_generator(tcfg.seed, run.step, d.rank)
        cond = drop_conditions(run.conds, cond_index(run.cond_all, idx), gen)
        cond = {k: (v.to(dev), p.to(dev)) for k, (v, p) in cond.items()}
        # forward: the items' loss (flow matching or the bridge), in the run's precision
        with autocast_for(dev, precision):
            loss = run.items.loss(engine.module, run.latents, idx, cond, gen, dev)
        if not torch.isfinite(loss):
            raise TrainingError(f"{run.run_dir}: non-finite loss {loss.item()} at step {run.step}; stopping")
        # backward, update, EMA
        engine.backward(loss)
        engine.step()
        ema_update(run.ema, engine.module, tcfg.ema_decay)
        # bookkeeping, log, checkpoint
        run.step += 1
        seen += tcfg.batch_size
        lv = float(loss.detach())
        losses.append(lv)
        window.append(lv)
        bar.update(1)
        if run.step % tcfg.log_every == 0 or run.step == run.end:
            rec = {"step": run.step, "loss": sum(window) / len(window), "lr": lr,
                   "samples_per_s": seen / max(1e-9, time.perf_counter() - t0), "epoch": run.cursor["epoch"],
                   "precision": precision}
            window = []
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
            if d.rank == 0:
                with open(run.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
        if run.step % tcfg.ckpt_every == 0 or run.step == run.end:
            last_ckpt = _save(run)
    bar.close()
    elapsed = time.perf_counter() - t0
    return TrainResult(run.run_dir, run.step, last_ckpt, losses, seen / elapsed if elapsed > 0 else 0.0)


# ---------------------------------------------------------------------------------------------
# setup helpers
# ---------------------------------------------------------------------------------------------


def _resume_or_init(run_cfg: RunConfig, data: LatentData, run_dir: Path, resume: bool, init: str | Path | None,
                    max_steps: int | None, accept: bool) -> tuple[RunConfig, Checkpoint | None, Checkpoint | None]:
    """(the settings to run with, the checkpoint resumed, the warm-start checkpoint)."""
    if not (resume and list_checkpoints(run_dir)):
        return run_cfg, None, (load_checkpoint(init, with_train_state=False) if init is not None else None)
    ck = load_checkpoint(run_dir)
    if init is not None:
        _log(f"resume: continuing {ck.path}; --init {init} not applied")
    saved = ck.state["run_config"]
    requested = run_cfg.model_dump(mode="json")
    if not max_steps:  # the checkpoint's schedule length unless max_steps is passed
        requested["train"]["max_steps"] = saved["train"]["max_steps"]
    merged = resolve_resume_config(requested, saved, RESUME_MUTABLE, accept, _log, str(ck.path))
    saved_digest = ck.state.get("data", {}).get("digest")
    if saved_digest and data.digest and saved_digest != data.digest:
        raise TrainingError(f"{run_dir}: resuming on latent set {data.digest}, the run was trained on {saved_digest}")
    return RunConfig.model_validate(merged), ck, None


def _usable_conditions(items: TrainingItems, conds: Sequence[Condition], data: LatentData,
                       rejects: gs.RejectLog | None) -> CondBatch:
    """Keep the items whose condition values the model can encode (the others are logged as
    rejects when the run starts); their encoded conditions."""
    requests = [{c.name: r.get(c.spec.field) for c in conds} for r in items.records]
    keep = []
    for i, r in enumerate(requests):
        try:
            encode(conds, [r])
        except ConditionError as e:
            if rejects is not None:
                rejects.add(data.location, items.records[i].get("subject"), "conditions", str(e), key=items.reject_key(i))
            continue
        keep.append(i)
    if not keep:
        raise TrainingError(f"{data.location}: no training {items.what} with usable conditions")
    items.keep(keep)
    return encode(conds, [requests[i] for i in keep])


def _statistics(ck: Checkpoint | None, init_ck: Checkpoint | None, data: LatentData, items: TrainingItems,
                tcfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    if ck is not None:
        return ck.norm_mean, ck.norm_std
    norm = normalisation_stats(data.latents[items.statistics_indices()], tcfg.normalise)
    if init_ck is None:
        return norm
    # the init's statistics are kept: see train's docstring
    shift = float(((norm[0] - init_ck.norm_mean).abs() / init_ck.norm_std).max())
    _log(f"init: weights and latent statistics from {init_ck.path} (step {init_ck.step}; the new latents' "
         f"mean differs from them by at most {shift:.3g} std); optimizer and step fresh")
    return init_ck.norm_mean, init_ck.norm_std


def _load_strict(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path, which: str) -> None:
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: {which} weights do not match the model: {e}") from None


def _engine(model: DiT, tcfg: TrainConfig, device: str | torch.device | None) -> Engine:
    """The torch engine runs one process (CPU or one GPU); DeepSpeed spans the launcher's ranks,
    each taking ``batch_size / world_size`` of every global batch."""
    if tcfg.engine == "deepspeed":
        d = setup_distributed("deepspeed", device=device)
        if tcfg.batch_size % d.world_size:
            raise TrainingError(f"batch_size {tcfg.batch_size} is not divisible by world size {d.world_size}")
    else:
        d = Dist(device=_select_device(device))
    spec = EngineSpec(lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=tuple(tcfg.betas), grad_clip=tcfg.grad_clip,
                      micro_batch_size=tcfg.batch_size // d.world_size, fused=True, zero_stage=tcfg.zero_stage,
                      ddp=False)
    return build_engine(tcfg.engine, model, spec, d)


def _init_record(ck: Checkpoint | None, init_ck: Checkpoint | None) -> dict[str, Any] | None:
    if ck is not None:  # a resumed run keeps its provenance
        return ck.state.get("init")
    if init_ck is None:
        return None
    return {"path": str(init_ck.path.resolve()), "step": init_ck.step, "model_sha256": init_ck.digest("raw"),
            "ema_sha256": init_ck.digest("ema")}


def _save(run: _Loop) -> Path | None:
    """Consolidate the optimizer state and the RNG streams (collectives: every rank), rank 0 writes."""
    d = run.engine.dist
    optim = run.engine.state()[1]
    rngs = gather(rng_state(), d)
    path = None
    if d.rank == 0:
        state = {**run.state_base, "cursor": run.cursor, "rng": rngs}
        path = save_checkpoint(run.run_dir, run.step, run.engine.module.state_dict(), run.ema.state_dict(), optim,
                               run.norm, state, keep_last=run.run_cfg.train.keep_last)
    barrier(d)  # no rank runs ahead (or exits) before the checkpoint is in place
    return path


def _differences(theirs: Any, ours: Any, where: str) -> list[str]:
    """``"where.field: A in the init, B in this run"`` for every differing leaf of two JSON values."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return [d for k in sorted(set(theirs) | set(ours)) for d in _differences(theirs.get(k), ours.get(k), f"{where}.{k}")]
    return [] if theirs == ours else [f"{where}: {theirs!r} in the init, {ours!r} in this run"]


def check_init(init: Checkpoint, run_cfg: RunConfig, conds: Sequence[Condition]) -> None:
    """Refuse a warm start whose network does not mean the same thing in the new run.

    The task (generation or longitudinal), the model config, the resolved conditions (names and
    order, specs, vocabularies: they index the embedding tables), ``train.normalise`` (the
    init's latent statistics are kept, so their kind must be the run's) and, for a bridge, what
    its output means (``bridge.target``, ``bridge.per_year``) must be equal. Every difference is
    named, with the checkpoint's path.
    """
    saved = init.run_config
    if saved.task != run_cfg.task:
        raise CheckpointError(f"{init.path}: --init is a {saved.task} checkpoint; this run trains {run_cfg.task} "
                              f"(use a {run_cfg.task} run as init)")
    by_name = lambda cs: {c.name: {**c.spec.model_dump(mode="json"), "vocab": list(c.vocab)} for c in cs}  # noqa: E731
    diff = _differences(saved.model.model_dump(mode="json"), run_cfg.model.model_dump(mode="json"), "model")
    old, new = init.conditions(), list(conds)
    if [c.name for c in old] != [c.name for c in new]:
        diff.append(f"conditions: {[c.name for c in old]} in the init, {[c.name for c in new]} in this run")
    diff += _differences(by_name(old), by_name(new), "conditions")
    diff += _differences(saved.train.normalise, run_cfg.train.normalise, "train.normalise")
    if saved.bridge is not None and run_cfg.bridge is not None:
        for name in ("target", "per_year"):
            diff += _differences(getattr(saved.bridge, name), getattr(run_cfg.bridge, name), f"bridge.{name}")
    if diff:
        raise CheckpointError(f"{init.path}: --init does not match this run: " + "; ".join(diff))


def _log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        tqdm.write(msg)


def _select_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_model(ck_path: str | Path, weights: str = "ema", device: str | torch.device | None = None):
    """(model in eval mode, conditions, (mean, std), checkpoint) for sampling and forecasting."""
    ck = load_checkpoint(ck_path, with_train_state=False)
    conds = ck.conditions()
    model = DiT(ck.run_config.model, conds)
    try:
        model.load_state_dict(ck.weights(weights), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ck.path}: weights do not match the recorded config: {e}") from None
    dev = _select_device(device)
    return model.to(dev).eval(), conds, (ck.norm_mean.to(dev), ck.norm_std.to(dev)), ck
