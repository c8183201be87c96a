"""A nanoGPT-like training loop for the DiT (generation) and the longitudinal bridge.

- The learning rate is a pure function of the step (warm-up + cosine), so "restoring the schedule"
  is restoring the step.
- Every random draw of a step (t, noise, condition dropout) comes from a CPU generator seeded by
  (seed, step, rank); the batch comes from a per-epoch permutation seeded by (seed, epoch) and a
  cursor (epoch, position). Resume is therefore bit-exact on the CPU and independent of the device;
  the global torch RNG state is saved and restored as well.
- Latents are normalised per channel with statistics of the training set, stored in every
  checkpoint (sampling de-normalises with them).
- Engines: ``torch`` (one process, CPU or one GPU) and ``deepspeed`` (data parallel over ranks,
  launched with the ``deepspeed`` launcher; ZeRO stage 0, 1 or 2). Both hand the optimizer state
  to the checkpoint as *consolidated* per-parameter AdamW tensors in torch's own numbering, so a
  checkpoint does not depend on the engine, the ZeRO stage or the number of ranks (ZeRO-1/2
  partitions are gathered on save and re-partitioned on load); DeepSpeed's own pickled
  checkpoints are not used.
- Warm start (``init``): raw and EMA weights from another run's checkpoint, fresh optimizer and
  step 0; see :func:`train`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import g3n_shards as gs
import torch
from tqdm import tqdm

from .bridge import bridge_loss
from .checkpoint import (
    IMPLEMENTATION_KEYS,
    Checkpoint,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    restore_rng,
    save_checkpoint,
)
from .conditions import Condition, ConditionError, CondBatch, cond_index, drop_conditions, encode, resolve_conditions
from .config import RunConfig, TrainConfig
from .data import LatentData, Pair, build_pairs, normalisation_stats
from .flow import autocast_for, flow_matching_loss, resolve_precision
from .model import DiT


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, resume against a different data set, ...)."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    losses: list[float] = field(default_factory=list)
    samples_per_s: float = 0.0


#: TrainConfig fields a resume takes from the caller rather than from the checkpoint.
RESUME_OVERRIDES = ("engine", "zero_stage", "precision", "num_threads", "log_every", "ckpt_every", "keep_last")


def lr_at(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """nanoGPT: weight decay on matrices only (dim >= 2), never on biases or null vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach().to(e.dtype), alpha=1 - decay)


def conditions_state(conds: Sequence[Condition]) -> list[dict[str, Any]]:
    return [{"spec": c.spec.model_dump(mode="json"), "vocab": list(c.vocab)} for c in conds]


def usable_records(
    conds: Sequence[Condition], requests: Sequence[dict[str, Any]], on_reject: Callable[[int, str], None]
) -> list[int]:
    """Indices whose condition values the model can encode; the others go to ``on_reject``."""
    ok = []
    for i, r in enumerate(requests):
        try:
            encode(conds, [r])
        except ConditionError as e:
            on_reject(i, str(e))
            continue
        ok.append(i)
    return ok


def adamw(groups: list[dict[str, Any]], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW for both engines, fused (one kernel over all parameters instead of a loop of small
    ops) on the CPU and CUDA: on the CPU demo's generator that is 3.5 % more samples/s, where the
    loop took 6 % of a step."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type in ("cpu", "cuda") or None)


class TorchEngine:
    """One process: plain AdamW, gradient clipping, optional bf16 autocast."""

    rank, world_size = 0, 1

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
        self.module = model.to(device)
        self.device = device
        self.cfg = cfg
        self.optimizer = adamw(param_groups(model, cfg.weight_decay), cfg, device)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def backward_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        """AdamW state as checkpoint tensors + JSON param groups (see :func:`optimizer_to_tensors`)."""
        return optimizer_to_tensors(self.optimizer)

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
        optimizer_from_tensors(self.optimizer, tensors, groups)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: DeepSpeed's default bucket (5e8 elements); ZeRO-2 allocates a gradient buffer this large per
#: rank, so it is capped at the model's size (2 GB of buffer for a 1 M-parameter test model is waste).
DEFAULT_ZERO_BUCKET = 500_000_000


class DeepSpeedEngine:
    """Data parallel over the ranks the ``deepspeed`` launcher started (or one CPU/GPU process).

    fp32 master weights (bf16 through autocast) and our torch AdamW as the client optimizer.
    ZeRO stage 0 keeps that AdamW intact; stages 1 and 2 give each rank a flat slice of the
    optimizer state (and, at 2, of the gradients). Checkpoints always hold the consolidated,
    per-parameter state in the torch engine's numbering: :meth:`optimizer_state` gathers the
    slices (a collective: every rank calls it) and :meth:`load_optimizer_state` scatters them
    back, so a run may resume on another world size, stage or engine. ZeRO-3 is not offered:
    the DiT fits one GPU, and the EMA update reads full parameters every step.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device | None):
        import deepspeed
        import torch.distributed as dist

        if cfg.zero_stage not in (0, 1, 2):
            raise TrainingError(f"zero_stage {cfg.zero_stage}: the DiT trainer supports ZeRO stages 0, 1 and 2")
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if cfg.batch_size % self.world_size:
            raise TrainingError(f"batch_size {cfg.batch_size} is not divisible by world size {self.world_size}")
        if device is None:
            device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if torch.cuda.is_available() else torch.device("cpu")
        self.device = device
        self.cfg = cfg
        model = model.to(device)
        groups = param_groups(model, cfg.weight_decay)
        # torch's optimizer state_dict numbers parameters through the groups in order: keep that
        # order to name the consolidated ZeRO state the same way
        self._ordered = [p for g in groups for p in g["params"]]
        self._group_sizes = [len(g["params"]) for g in groups]
        opt = adamw(groups, cfg, device)
        bucket = int(min(DEFAULT_ZERO_BUCKET, max(1, sum(p.numel() for p in self._ordered))))
        ds_config = {
            "train_batch_size": cfg.batch_size,
            "train_micro_batch_size_per_gpu": cfg.batch_size // self.world_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        self.module = self.engine.module
        self.optimizer = opt
        if self.engine.optimizer is not opt and getattr(self.engine.optimizer, "optimizer", None) is not opt:
            raise TrainingError(f"DeepSpeed wrapped the optimizer in {type(self.engine.optimizer).__name__}; expected plain AdamW")
        self.partitioned = self.engine.optimizer is not opt and hasattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state")
        if cfg.zero_stage and not self.partitioned:
            raise TrainingError(
                f"zero_stage {cfg.zero_stage}: DeepSpeed returned {type(self.engine.optimizer).__name__}, which does not "
                "expose the per-parameter fragments needed to consolidate the optimizer state for checkpoints"
            )

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def backward_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def _relink(self, create: bool = False) -> None:
        """(Re)attach per-parameter views of ZeRO's flat AdamW state.

        DeepSpeed 0.19 links them lazily after the first step, for the first param group only, so
        the no-decay group would read as empty; a fresh engine (being resumed) has no state at
        all, and ``create`` gives every flat slice zero state for the scatter to write into.
        """
        zero = self.engine.optimizer
        if create:
            for group in self.optimizer.param_groups:
                for flat in group["params"]:
                    st = self.optimizer.state[flat]
                    if "exp_avg" not in st:
                        st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()

    def _group_hparams(self) -> list[dict[str, Any]]:
        """JSON-able hyper-parameters per group, with torch's numbering of the module's parameters
        (ZeRO replaced each group's parameter list by one flat slice, so it cannot be read off)."""
        out, start = [], 0
        for g, n in zip(self.optimizer.param_groups, self._group_sizes):
            hp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
            hp["params"] = list(range(start, start + n))
            start += n
            out.append(hp)
        return out

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        """Consolidated AdamW state in :func:`optimizer_to_tensors`'s format. Collective under ZeRO:
        every rank must call it (each contributes its slice through an all-reduce)."""
        if not self.partitioned:
            return optimizer_to_tensors(self.optimizer)
        from deepspeed.utils import safe_get_full_optimizer_state

        self._relink()
        steps = [st["step"] for st in self.optimizer.state.values() if "step" in st]
        step = float(steps[0]) if steps else 0.0
        tensors: dict[str, torch.Tensor] = {}
        for pid, p in enumerate(self._ordered):
            moments = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
            if any(v is None for v in moments.values()):
                continue  # no step taken yet: torch's state_dict has no entry either
            tensors[f"optim.{pid}.step"] = torch.tensor(step, dtype=torch.float32)
            for k, v in moments.items():
                tensors[f"optim.{pid}.{k}"] = v.detach().float().cpu().contiguous()
        return tensors, self._group_hparams()

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
        """Scatter consolidated AdamW state (from any engine, stage or world size) into this engine."""
        if not self.partitioned:
            optimizer_from_tensors(self.optimizer, tensors, groups)
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        saved = [len(g["params"]) for g in groups]
        if saved != self._group_sizes:
            raise CheckpointError(f"optimizer state has groups of {saved} parameters; this model has {self._group_sizes}")
        self._relink(create=True)
        step = None
        for pid, p in enumerate(self._ordered):
            if f"optim.{pid}.exp_avg" not in tensors:
                continue
            for k in ("exp_avg", "exp_avg_sq"):
                v = tensors[f"optim.{pid}.{k}"]
                if tuple(v.shape) != tuple(p.shape):
                    raise CheckpointError(f"optimizer state {k} of parameter {pid} has shape {tuple(v.shape)}, expected {tuple(p.shape)}")
                safe_set_full_optimizer_state(p, v.to(p.device, torch.float32), k)
            step = float(tensors[f"optim.{pid}.step"])
        for st in self.optimizer.state.values():  # one AdamW state per flat slice: one step count
            if "step" in st:
                st["step"] = torch.tensor(step if step is not None else 0.0)
        for g, saved_g in zip(self.optimizer.param_groups, groups):
            g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved_g.items() if k not in ("params", *IMPLEMENTATION_KEYS)})


def _differences(theirs: Any, ours: Any, where: str) -> list[str]:
    """``"where.field: A in the init, B in this run"`` for every differing leaf of two JSON values."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return [d for k in sorted(set(theirs) | set(ours)) for d in _differences(theirs.get(k), ours.get(k), f"{where}.{k}")]
    return [] if theirs == ours else [f"{where}: {theirs!r} in the init, {ours!r} in this run"]


def check_init(init: Checkpoint, run_cfg: RunConfig, conds: Sequence[Condition]) -> None:
    """Refuse a warm start whose network does not mean the same thing in the new run.

    The task (generation or longitudinal), the model config, the resolved conditions (names and
    order, specs, vocabularies: they index the embedding tables) and ``train.normalise`` (the
    init's latent statistics are kept, so their kind must be the run's) must be equal. Every
    difference is named, with the checkpoint's path.
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
    if diff:
        raise CheckpointError(f"{init.path}: --init does not match this run: " + "; ".join(diff))


def _log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        tqdm.write(msg)


def _select_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


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
) -> TrainResult:
    """Train (or resume) a run in ``run_dir``. ``stop_after`` ends the call after that many steps
    without changing the schedule (used to test resume); ``max_steps`` overrides the config's.

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
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rejects = gs.RejectLog(run_dir / gs.REJECTS_NAME)
    ck = init_ck = None
    if resume and list_checkpoints(run_dir):
        ck = load_checkpoint(run_dir)
        if init is not None:
            _log(f"resume: continuing {ck.path}; --init {init} not applied")
        # architecture, conditions, data recipe and optimisation come from the checkpoint; only how
        # the run is executed and logged may change on resume (e.g. CPU torch -> GPUs with DeepSpeed)
        saved = ck.run_config
        run_cfg = saved.model_copy(
            update={"train": saved.train.model_copy(update={k: getattr(run_cfg.train, k) for k in RESUME_OVERRIDES})}
        )
        saved_digest = ck.state.get("data", {}).get("digest")
        if saved_digest and data.digest and saved_digest != data.digest:
            raise TrainingError(f"{run_dir}: resuming on latent set {data.digest}, the run was trained on {saved_digest}")
    elif init is not None:
        init_ck = load_checkpoint(init, with_train_state=False)
    if max_steps:  # recorded in the checkpoint, so a later resume keeps the extended schedule
        run_cfg = run_cfg.model_copy(update={"train": run_cfg.train.model_copy(update={"max_steps": max_steps})})
    tcfg = run_cfg.train
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    longitudinal = run_cfg.task == "longitudinal"
    data.check_model(run_cfg.model)

    # ---- items and their conditions -------------------------------------------------
    pairs: list[Pair] = []
    if longitudinal:
        assert run_cfg.bridge is not None
        pairs = build_pairs(data, run_cfg.bridge, rejects if ck is None else None)
        records = [p.record for p in pairs]
    else:
        records = list(data.metas)
    if ck is not None:
        conds = ck.conditions()
    else:
        conds = resolve_conditions(run_cfg.conditions, records, data.vocab)
    if init_ck is not None:
        check_init(init_ck, run_cfg, conds)
    requests = [{c.name: r.get(c.spec.field) for c in conds} for r in records]

    def _reject(i: int, reason: str) -> None:
        if ck is not None:  # logged when the run started; a resume does not log it again
            return
        key = data.keys[pairs[i].base] if longitudinal else data.keys[i]
        rejects.add(data.location, records[i].get("subject"), "conditions", reason, key=key)

    keep = usable_records(conds, requests, _reject)
    if not keep:
        raise TrainingError(f"{data.location}: no training {'pairs' if longitudinal else 'samples'} with usable conditions")
    requests = [requests[i] for i in keep]
    if longitudinal:
        pairs = [pairs[i] for i in keep]
        base_idx = torch.tensor([p.base for p in pairs])
        follow_idx = torch.tensor([p.follow for p in pairs])
    else:
        item_idx = torch.tensor(keep)
    cond_all: CondBatch = encode(conds, requests)
    n_items = len(requests)

    # ---- normalisation, model, engine ---------------------------------------------------
    if ck is not None:
        norm = (ck.norm_mean, ck.norm_std)
    else:
        used = torch.unique(torch.cat([base_idx, follow_idx])) if longitudinal else item_idx
        norm = normalisation_stats(data.latents[used], tcfg.normalise)
        if init_ck is not None:  # the init's statistics are kept: see the docstring
            shift = float(((norm[0] - init_ck.norm_mean).abs() / init_ck.norm_std).max())
            norm = (init_ck.norm_mean, init_ck.norm_std)
            _log(f"init: weights and latent statistics from {init_ck.path} (step {init_ck.step}; the new latents' "
                 f"mean differs from them by at most {shift:.3g} std); optimizer and step fresh")
    latents = (data.latents - norm[0]) / norm[1]

    torch.manual_seed(tcfg.seed)
    model = DiT(run_cfg.model, conds)
    if ck is not None:
        model.load_state_dict(ck.model, strict=True)
    elif init_ck is not None:
        try:
            model.load_state_dict(init_ck.model, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{init_ck.path}: raw weights do not match the model: {e}") from None
    dev = _select_device(device)
    engine = DeepSpeedEngine(model, tcfg, None if device is None else dev) if tcfg.engine == "deepspeed" else TorchEngine(model, tcfg, dev)
    dev = engine.device
    ema = copy.deepcopy(engine.module).eval().requires_grad_(False)
    step, cursor = 0, {"epoch": 0, "pos": 0}
    if ck is not None:
        ema.load_state_dict(ck.ema, strict=True)
        assert ck.train is not None
        engine.load_optimizer_state(ck.train, ck.state["optimizer_param_groups"])
        restore_rng(ck.train)
        step, cursor = ck.step, dict(ck.state["cursor"])
    elif init_ck is not None:
        try:
            ema.load_state_dict(init_ck.ema, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{init_ck.path}: EMA weights do not match the model: {e}") from None
    init_record = ck.state.get("init") if ck is not None else None  # a resumed run keeps its provenance
    if init_ck is not None:
        init_record = {"path": str(init_ck.path.resolve()), "step": init_ck.step,
                       "model_sha256": init_ck.digest("raw"), "ema_sha256": init_ck.digest("ema")}

    state_base = {
        "run_config": run_cfg.model_dump(mode="json"),
        "conditions": conditions_state(conds),
        "data": {
            "digest": data.digest,
            "location": data.location,
            "geometry": data.geometry,
            "tokenizer": data.tokenizer,
            "items": n_items,
        },
        "init": init_record,
    }
    metrics_path = run_dir / "metrics.jsonl"
    rank, world = engine.rank, engine.world_size
    per_rank = tcfg.batch_size // world

    def save(at: int) -> Path | None:
        optim_state = engine.optimizer_state()  # collective under ZeRO: every rank gathers
        path = None
        if rank == 0:
            path = save_checkpoint(
                run_dir, at, engine.module.state_dict(), ema.state_dict(), None, norm,
                {**state_base, "cursor": cursor}, keep_last=tcfg.keep_last, optimizer_state=optim_state,
            )  # fmt: skip
        if world > 1:  # no rank runs ahead (or exits) before the checkpoint is in place
            import torch.distributed as dist

            dist.barrier()
        return path

    end = tcfg.max_steps if stop_after is None else min(tcfg.max_steps, step + stop_after)
    losses: list[float] = []
    last_ckpt: Path | None = None
    bar = tqdm(total=end - step, desc=f"train {run_cfg.task}", unit="step", disable=not progress or rank != 0)
    t0, seen, window = time.perf_counter(), 0, []
    precision = resolve_precision(tcfg.precision, dev)  # logged with every record: "auto" differs by machine
    engine.module.train()
    while step < end:
        lr = lr_at(step, tcfg)
        engine.set_lr(lr)
        idx, cursor = next_batch(n_items, tcfg.batch_size, cursor, tcfg.seed)
        idx = idx[rank * per_rank : (rank + 1) * per_rank]
        gen = step_generator(tcfg.seed, step, rank)
        cond = drop_conditions(conds, cond_index(cond_all, idx), gen)
        cond = {k: (v.to(dev), p.to(dev)) for k, (v, p) in cond.items()}
        with autocast_for(dev, precision):
            if longitudinal:
                assert run_cfg.bridge is not None
                xb, xf = latents[base_idx[idx]].to(dev), latents[follow_idx[idx]].to(dev)
                loss = bridge_loss(engine.module, xb, xf, cond, gen, run_cfg.bridge)
            else:
                loss = flow_matching_loss(engine.module, latents[item_idx[idx]].to(dev), cond, gen,
                                          tcfg.time_sampling, tcfg.time_mean, tcfg.time_std)
        if not torch.isfinite(loss):
            raise TrainingError(f"{run_dir}: non-finite loss {loss.item()} at step {step}; stopping")
        engine.backward_step(loss)
        ema_update(ema, engine.module, tcfg.ema_decay)
        step += 1
        seen += tcfg.batch_size
        lv = float(loss.detach())
        losses.append(lv)
        window.append(lv)
        bar.update(1)
        if step % tcfg.log_every == 0 or step == end:
            rate = seen / max(1e-9, time.perf_counter() - t0)
            rec = {"step": step, "loss": sum(window) / len(window), "lr": lr, "samples_per_s": rate, "epoch": cursor["epoch"],
                   "precision": precision}
            window = []
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        if step % tcfg.ckpt_every == 0 or step == end:
            last_ckpt = save(step)
    bar.close()
    elapsed = time.perf_counter() - t0
    return TrainResult(run_dir, step, last_ckpt, losses, seen / elapsed if elapsed > 0 else 0.0)


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
