"""MAE pretraining loop: read it top to bottom (nanoGPT style).

One loop, two engines that share it:

* ``torch``: the model (wrapped in DDP when there are several processes) + torch AdamW; bf16
  autocast on CUDA. No DeepSpeed import, no JIT-compiled ops: unit tests use this path.
* ``deepspeed``: ``deepspeed.initialize`` with a config built from ours (ZeRO stage, bf16 on
  CUDA, gradient clipping); on CPU DeepSpeed uses its CPU accelerator and gloo. Launch on many
  GPUs/nodes with the ``deepspeed`` launcher (it sets RANK/WORLD_SIZE/LOCAL_RANK).

Both expose ``forward / backward / step / set_lr / full_state / load_full_state``; the last two
move *consolidated* tensors keyed by parameter name, which is what makes checkpoints
engine- and world-size-independent.

The learning rate is a pure function of the step (linear warm-up, then cosine to ``min_lr``), set
on the optimizer every step, so there is no scheduler state to save. Masking noise comes from
the data stream (per sample, from seed/epoch/key), so resuming restores: weights, AdamW moments
and step, data cursors, and RNG states; on CPU with ``deterministic`` the resumed run's losses
are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import (
    CheckpointError, atomic_write_text, export_model, find_latest, load_checkpoint, read_init_weights, rng_state,
    save_checkpoint, set_rng_state,
)
from .config import MAEConfig, ModelConfig
from .data import VolumeBatchStream, VolumeSource, make_loader, zscore_brain_torch
from .model import MAE3D, train_flops_per_volume


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss became NaN or Inf; the last good checkpoint is intact."""


# ---------------------------------------------------------------------------------------------
# distributed setup
# ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(engine: str) -> Dist:
    """Join the process group described by the launcher's environment (or stay single-process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if engine == "deepspeed":
        import deepspeed

        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("WORLD_SIZE", str(world))
            os.environ.setdefault("LOCAL_RANK", str(local_rank))
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank, world, local_rank, device)


def resolve_engine(name: str) -> str:
    """``auto``: DeepSpeed when importable, else plain torch."""
    if name != "auto":
        return name
    try:
        import deepspeed  # noqa: F401

        return "deepspeed"
    except Exception:
        return "torch"


def use_bf16(cfg: MAEConfig, device: torch.device) -> bool:
    if cfg.train.precision == "auto":
        return device.type == "cuda"
    return cfg.train.precision == "bf16"


# ---------------------------------------------------------------------------------------------
# optimisation helpers
# ---------------------------------------------------------------------------------------------


def lr_at(step: int, cfg: MAEConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr`` at ``total_steps``."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / (t.warmup_steps + 1)
    span = max(1, t.total_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (nanoGPT); not on biases, norms or the mask token."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "mask_token" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: MAEConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW; ``fused`` (one kernel for all parameters instead of a loop of small ops) for
    parameters on a GPU or the CPU."""
    t = cfg.train
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas), fused=fused or None)


# ---------------------------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------------------------


class TorchEngine:
    """Plain torch: model (+ DDP), AdamW, grad clipping, bf16 autocast on CUDA."""

    name = "torch"

    def __init__(self, model: MAE3D, cfg: MAEConfig, d: Dist):
        self.cfg, self.dist = cfg, d
        self.module = model.to(d.device)
        self.model: torch.nn.Module = self.module
        if d.world_size > 1:
            ids = [d.device.index] if d.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.optimizer = make_optimizer(self.module, cfg, fused=d.device.type in ("cpu", "cuda"))
        self.bf16 = use_bf16(cfg, d.device)

    def forward(self, volume: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, _, _ = self.model(volume, noise=noise)
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        gn = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip))
        if not math.isfinite(gn):  # a finite loss can still give Inf gradients: do not apply them
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"gradient norm is {gn}; the update was not applied")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gn

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model_sd = {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
        optim: dict[str, torch.Tensor] = {}
        for name, p in self.module.named_parameters():
            st = self.optimizer.state.get(p)
            if st:
                optim[f"exp_avg/{name}"] = st["exp_avg"].detach().cpu()
                optim[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].detach().cpu()
                optim[f"step/{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(()).cpu()
        return model_sd, optim

    def load_full_state(self, model_sd: dict[str, torch.Tensor], optim: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(model_sd, strict=True)
        on_device = bool(self.optimizer.defaults.get("fused") or self.optimizer.defaults.get("capturable"))
        for name, p in self.module.named_parameters():
            if f"exp_avg/{name}" in optim:
                step = optim[f"step/{name}"].clone().float()
                self.optimizer.state[p] = {
                    "step": step.to(p.device) if on_device else step,  # fused AdamW keeps its step with the parameters
                    "exp_avg": optim[f"exp_avg/{name}"].to(p.device, p.dtype).clone(),
                    "exp_avg_sq": optim[f"exp_avg_sq/{name}"].to(p.device, p.dtype).clone(),
                }


def deepspeed_config(cfg: MAEConfig, bf16: bool) -> dict[str, Any]:
    """Our config -> a DeepSpeed config dict (no separate JSON file to keep in sync)."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage, "reduce_bucket_size": t.zero_bucket_size,
                              "allgather_bucket_size": t.zero_bucket_size},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed engine behind the same interface; consolidates ZeRO-partitioned state on save."""

    name = "deepspeed"

    def __init__(self, model: MAE3D, cfg: MAEConfig, d: Dist):
        import deepspeed

        self.cfg, self.dist = cfg, d
        self.bf16 = use_bf16(cfg, d.device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=make_optimizer(model, cfg), config=deepspeed_config(cfg, self.bf16)
        )
        self.module: MAE3D = self.engine.module

    def forward(self, volume: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        # the volume stays fp32: the patch embedding casts its input to the (bf16) weights, and the
        # reconstruction target keeps full precision
        loss, _, _ = self.engine(volume, noise=noise)
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        gn = self.engine.get_global_grad_norm()
        return float(gn) if gn is not None else float("nan")

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def set_lr(self, lr: float) -> None:
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        opt = self.engine.optimizer
        return getattr(opt, "optimizer", opt)

    def _flat_partitions(self) -> list[torch.Tensor]:
        """This rank's flat fp32 partitions, the tensors ZeRO's inner AdamW keeps its state under
        (ZeRO-1/2: one per param group; ZeRO-3: one per sub-group, absent from ``param_groups``
        outside ``step``). Empty for ZeRO-0, whose AdamW is keyed by the (master) parameters."""
        opt = self.engine.optimizer
        if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
            return list(opt.fp32_partitioned_groups_flat)
        if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
            return list(opt.single_partition_of_fp32_groups)
        return []

    def _relink_optimizer_state(self, create: bool = False) -> None:
        """(Re)attach per-parameter views of the flat AdamW state.

        DeepSpeed 0.19 links them lazily after the first ``step`` of the *first* param group only
        (ZeRO-1/2), so with two groups (decay / no decay) the second group's views stay empty; and
        before any step there is no state at all (a fresh engine being resumed, any stage).
        ``create`` makes zero state for every flat partition so ``safe_set_full_optimizer_state``
        has somewhere to write (AdamW treats a zero state with step 0 exactly as a fresh one).
        """
        opt = self.engine.optimizer
        inner = self._inner_optimizer()
        if create:
            for flat in self._flat_partitions():
                st = inner.state[flat]
                if "exp_avg" not in st:
                    st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        if opt is not inner and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-3 reads state directly
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def _masters(self) -> dict[int, torch.Tensor]:
        """id(module param) -> fp32 master copy, for DeepSpeed's unfused bf16/fp16 optimizer (ZeRO-0 + bf16),
        whose AdamW state is keyed by the masters and which has no fragment mapping."""
        opt = self.engine.optimizer
        if not (hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups")):
            return {}
        return {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lg, hg)}

    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        model_sd, optim = {}, {}
        self._relink_optimizer_state()
        masters = self._masters()
        inner = self._inner_optimizer()
        steps = [s["step"] for s in inner.state.values() if "step" in s]
        step = float(steps[0]) if steps else 0.0
        for name, p in self.module.named_parameters():  # collective under ZeRO-3: every rank calls
            master = masters.get(id(p), p)
            full = safe_get_full_fp32_param(p)
            model_sd[name] = (full if full is not None else master.detach()).float().cpu()
            for key in ("exp_avg", "exp_avg_sq"):
                s = safe_get_full_optimizer_state(p, key)
                if s is None and master in inner.state:
                    s = inner.state[master].get(key)
                if s is not None:
                    optim[f"{key}/{name}"] = s.detach().float().cpu()
            if f"exp_avg/{name}" in optim:
                optim[f"step/{name}"] = torch.tensor(step, dtype=torch.float32)
        for name, b in self.module.named_buffers():
            model_sd[name] = b.detach().float().cpu()
        return model_sd, optim

    def load_full_state(self, model_sd: dict[str, torch.Tensor], optim: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        inner = self._inner_optimizer()
        self._relink_optimizer_state(create=any(k.startswith("exp_avg/") for k in optim))
        masters = self._masters()
        step = None
        with torch.no_grad():
            for name, b in self.module.named_buffers():
                b.copy_(model_sd[name].to(b.dtype))
            for name, p in self.module.named_parameters():
                value = model_sd[name].to(p.device)
                if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
                    safe_set_full_fp32_param(p, value)
                    if f"exp_avg/{name}" in optim:
                        for key in ("exp_avg", "exp_avg_sq"):
                            safe_set_full_optimizer_state(p, optim[f"{key}/{name}"].to(p.device), key)
                else:  # ZeRO-0: a torch optimizer over the params, or over fp32 masters of bf16 params
                    master = masters.get(id(p), p)
                    p.copy_(value.to(p.dtype))
                    master.copy_(value.to(master.dtype))
                    if f"exp_avg/{name}" in optim:
                        inner.state[master] = {
                            k: optim[f"{k}/{name}"].to(master.device, master.dtype).clone() for k in ("exp_avg", "exp_avg_sq")
                        }
                        inner.state[master]["step"] = optim[f"step/{name}"].clone().float()
                if f"step/{name}" in optim:
                    step = float(optim[f"step/{name}"])
        if step is not None:  # ZeRO keeps one AdamW state per flat partition: set its step count
            for st in inner.state.values():
                if "step" in st:
                    st["step"] = torch.tensor(step) if torch.is_tensor(st["step"]) else step
        opt = self.engine.optimizer
        if hasattr(opt, "update_lp_params"):  # ZeRO-1/2 and bf16: working copies follow the fp32 masters
            opt.update_lp_params()
        elif any(hasattr(p, "ds_id") for p in self.module.parameters()):  # ZeRO-3: gathered working copies
            import deepspeed

            for name, p in self.module.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if self.dist.rank == 0:
                        p.data.copy_(model_sd[name].to(p.device, p.dtype))


def build_engine(kind: str, model: MAE3D, cfg: MAEConfig, d: Dist):
    if kind == "torch":
        return TorchEngine(model, cfg, d)
    if kind == "deepspeed":
        return DeepSpeedEngine(model, cfg, d)
    raise ValueError(f"unknown engine {kind!r} (torch | deepspeed)")


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    losses: list[tuple[int, float]]
    last_checkpoint: Path | None
    volumes_per_s: float


def _num_params(module: torch.nn.Module) -> int:
    """Full parameter count; under ZeRO-3 each local tensor is an empty shard (``ds_numel`` is the full size)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())


def _all_mean(x: float, d: Dist) -> float:
    if d.world_size == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / d.world_size


def _gather(obj: Any, d: Dist) -> list[Any]:
    if d.world_size == 1:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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
) -> TrainResult:
    """Pretrain the MAE on ``source``; checkpoints and logs go to ``run_dir``.

    Args:
        cfg: full config; on ``resume`` the *model* config comes from the checkpoint.
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
    ckpt_root = run_dir / "checkpoints"
    engine_kind = resolve_engine(cfg.train.engine)
    d = setup_distributed(engine_kind)
    t = cfg.train

    # ---- resume: architecture from the checkpoint ------------------------------------------
    ckpt_dir, ckpt_state, model_sd, optim_sd = None, None, None, None
    init_sd, init_record = None, None
    if resume:
        ckpt_dir = find_latest(ckpt_root)
        if ckpt_dir is None and d.is_main:
            # as g3n-tokenizer and g3n-dit do: a job started with --resume from its first run (a
            # pipeline stage, a job script) starts when there is nothing to continue yet
            log(f"resume: no checkpoint under {ckpt_root} yet; starting " + ("from --init" if init else "from scratch"))
    if ckpt_dir is not None:
        if init is not None and d.is_main:
            log(f"resume: continuing {ckpt_dir}; --init {init} not applied")
        model_sd, optim_sd, ckpt_state = load_checkpoint(ckpt_dir)
        saved_model = ModelConfig.model_validate(ckpt_state["config"]["model"])
        if saved_model != cfg.model and d.is_main:
            log(f"resume: using the model config stored in {ckpt_dir} (differs from the given one)")
        cfg = cfg.model_copy(update={"model": saved_model})
        init_record = ckpt_state.get("init")  # provenance of the run's warm start carries over
    elif init is not None:
        init_sd, init_record = read_init_weights(init, cfg.model)
        if d.is_main:
            changed = "".join(f"; {k} {a} -> {b}" for k, (a, b) in init_record.get("objective_changed", {}).items())
            log(f"init: weights from {init_record['path']} (sha256 {init_record['sha256']}){changed}; "
                "optimizer and step fresh")

    # ---- determinism and model -------------------------------------------------------------
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, source, run_dir, d, engine_kind, ckpt_dir, ckpt_state, model_sd, optim_sd,
                      data_manifests, stop_at, on_step, log, init_sd, init_record)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(cfg, source, run_dir, d, engine_kind, ckpt_dir, ckpt_state, model_sd, optim_sd, data_manifests,
           stop_at, on_step, log, init_sd=None, init_record=None) -> TrainResult:
    """The body of :func:`train` (split out so global switches are restored on any exit)."""
    t = cfg.train
    ckpt_root = run_dir / "checkpoints"
    _seed_everything(t.seed)  # identical init on every rank
    model = MAE3D(cfg.model)
    if init_sd is not None:  # before the engine: DeepSpeed takes its fp32 masters from the module
        try:
            model.load_state_dict(init_sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{init_record['path']}: --init weights do not match the model: {e}") from None
    engine = build_engine(engine_kind, model, cfg, d)
    _seed_everything(t.seed + 1000 * d.rank + 1)  # per-rank streams after init

    step, samples_seen, epoch_cursors, next_worker = 0, 0, {}, 0
    if ckpt_state is not None:
        engine.load_full_state(model_sd, optim_sd)
        step, samples_seen = int(ckpt_state["step"]), int(ckpt_state.get("samples_seen", 0))
        same_topology = ckpt_state.get("world_size") == d.world_size and ckpt_state.get("num_workers") == t.num_workers
        ranks = ckpt_state["data"]["ranks"]
        if same_topology:
            epoch_cursors = ranks[d.rank]["cursors"]
            next_worker = int(ranks[d.rank]["next_worker"])
            set_rng_state(ckpt_state["rng"][d.rank])
        else:
            # N -> M processes: weights, optimizer and step carry over exactly; the data stream
            # cannot be re-split mid-epoch, so every rank starts the epoch after the furthest one.
            last_epoch = max(int(c["epoch"]) for r in ranks for c in r["cursors"].values()) if ranks else -1
            epoch_cursors = {w: {"epoch": last_epoch + 1, "cursor": None} for w in range(max(1, t.num_workers))}
            if d.is_main:
                log(f"resume: {ckpt_state.get('world_size')} -> {d.world_size} processes; data restarts at epoch {last_epoch + 1}")
        if d.is_main:
            log(f"resumed from {ckpt_dir} at step {step}")
    if step >= t.total_steps:
        # a finished run resumed again (e.g. a pipeline stage killed after training, during a later
        # command) has nothing left to train: make sure its deliverable exists and stop
        if d.is_main:
            log(f"resume: {ckpt_dir} is at step {step}, total_steps {t.total_steps}: finished already")
            if not (run_dir / "export" / "model.safetensors").is_file():
                log(f"export {export_model(ckpt_dir, run_dir / 'export')}")
        return TrainResult(step, [], ckpt_dir, 0.0)

    # ---- data --------------------------------------------------------------------------------
    stream = VolumeBatchStream(
        source, t.batch_size, cfg.model.img_size, cfg.model.num_patches, rank=d.rank, world_size=d.world_size,
        seed=t.seed, shuffle=t.shuffle, cursors=epoch_cursors, worker_offset=next_worker,
        rejects_path=run_dir / "rejects.jsonl",
    )
    batches = iter(make_loader(stream, t.num_workers))
    nw = max(1, t.num_workers)
    cursors = {int(k): v for k, v in epoch_cursors.items()}

    # ---- logging -----------------------------------------------------------------------------
    tb = None
    metrics_path = run_dir / "metrics.jsonl"
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.model_dump(mode="json"), indent=1))
        _truncate_metrics(metrics_path, step)
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(run_dir / "tb"), purge_step=step if step else None)
        log(f"g3n-mae train: engine={engine.name} world={d.world_size} device={d.device} bf16={use_bf16(cfg, d.device)} "
            f"params={_num_params(engine.module):,} tokens={cfg.model.num_patches} "
            f"visible={cfg.model.num_visible}")

    global_batch = t.batch_size * d.world_size
    flops_per_step = train_flops_per_volume(cfg.model) * global_batch
    losses: list[tuple[int, float]] = []
    last_ckpt = ckpt_dir
    last_loss, lr = float("nan"), lr_at(step, cfg)
    t0, window_steps, start_time = time.perf_counter(), 0, time.perf_counter()
    end = t.total_steps if stop_at is None else min(stop_at, t.total_steps)

    def checkpoint() -> Path:
        model_sd_, optim_ = engine.full_state()  # collective under ZeRO-3
        bad = [k for k, v in model_sd_.items() if not torch.isfinite(v).all()]
        if bad:  # never overwrite good checkpoints with broken weights
            raise NonFiniteLossError(f"step {step}: non-finite weights ({bad[:4]}); not saved. "
                                     f"Last good checkpoint: {last_ckpt or 'none'}")
        data_state = _gather({"cursors": {str(k): v for k, v in cursors.items()}, "next_worker": next_worker}, d)
        rngs = _gather(rng_state(), d)
        path = None
        if d.is_main:
            state = {
                "config": cfg.model_dump(mode="json"), "samples_seen": samples_seen, "world_size": d.world_size,
                "num_workers": t.num_workers, "engine": engine.name, "data": {"ranks": data_state}, "rng": rngs,
                "data_manifests": data_manifests or [], "init": init_record,
                "figures": {"loss": last_loss, "lr": lr, "step": step, "samples_seen": samples_seen},
            }
            path = save_checkpoint(ckpt_root, step, cfg.model, model_sd_, optim_, state, t.keep_last)
            log(f"checkpoint {path}")
        if d.world_size > 1:
            dist.barrier()
        return path or ckpt_root / f"step_{step:08d}"

    # ---- train -------------------------------------------------------------------------------
    engine.module.train()
    while step < end:
        batch = next(batches)
        lr = lr_at(step, cfg)
        engine.set_lr(lr)
        volume = zscore_brain_torch(batch["volume"].to(d.device, non_blocking=True))
        noise = batch["noise"].to(d.device, non_blocking=True)
        loss = engine.forward(volume, noise)
        loss_val = _all_mean(float(loss.detach()), d)
        if not math.isfinite(loss_val):
            raise NonFiniteLossError(
                f"step {step + 1}: loss is {loss_val} (non-finite); training stopped without updating the weights. "
                f"Last good checkpoint: {last_ckpt or 'none'}. Lower lr, enable grad_clip or check the input data."
            )
        engine.backward(loss)
        try:
            gnorm = engine.step()
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"step {step + 1}: {e}. Last good checkpoint: {last_ckpt or 'none'}") from None
        step += 1
        samples_seen += global_batch
        cursors[int(batch["worker"])] = batch["cursor"]
        next_worker = (int(batch["worker"]) + 1) % nw
        last_loss = loss_val
        losses.append((step, loss_val))
        window_steps += 1
        if on_step is not None:
            on_step(step, loss_val)

        if d.is_main and (step % t.log_every == 0 or step == end):
            dt = time.perf_counter() - t0
            vps = window_steps * global_batch / max(dt, 1e-9)
            rec = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": gnorm, "volumes_per_s": vps,
                   "tflops_per_s": flops_per_step * window_steps / max(dt, 1e-9) / 1e12, "samples_seen": samples_seen}
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if tb is not None:
                for k in ("loss", "lr", "grad_norm", "volumes_per_s"):
                    tb.add_scalar(f"train/{k}", rec[k], step)
            t0, window_steps = time.perf_counter(), 0
        if step % t.ckpt_every == 0 or step == end:
            last_ckpt = checkpoint()

    if tb is not None:
        tb.close()
    if step == t.total_steps and d.is_main and last_ckpt is not None:
        # the finished run's deliverable: plain safetensors + config + MODEL_CARD.md
        log(f"export {export_model(last_ckpt, run_dir / 'export')}")
    total = time.perf_counter() - start_time
    return TrainResult(step, losses, last_ckpt, len(losses) * global_batch / max(total, 1e-9))


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint (they came from the interrupted run)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))
