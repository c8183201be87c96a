"""One engine interface, two implementations: plain torch here, DeepSpeed in ``deepspeed_engine``.

An engine owns the model's wrapper (DDP, ``torch.compile`` or DeepSpeed), the AdamW optimizer,
gradient clipping and the precision; the stage's loop owns everything else::

    with engine.autocast():
        loss = stage_loss(engine.model, batch)     # engine.model: the wrapper to call forward on
    engine.backward(loss)
    grad_norm = engine.step()                      # clip, refuse a non-finite gradient, update
    model_sd, optim = engine.state()               # consolidated: keys are parameter names

``state`` / ``load_state`` move full fp32 tensors keyed by parameter name (optimizer:
``exp_avg/<name>``, ``exp_avg_sq/<name>``, ``step/<name>``, see ``g3n_train.optim_state``),
whatever DDP or ZeRO partitioned, so a checkpoint loads into either engine on any world size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from .dist import Dist
from .guard import NonFiniteLossError

log = logging.getLogger("g3n_train")


@dataclass(frozen=True)
class EngineSpec:
    """What a stage asks of its engine (the stage maps its own config onto this)."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float = 0.0  # max global gradient norm; 0 disables clipping
    micro_batch_size: int = 1  # per process and step (DeepSpeed's config needs it)
    bf16: bool = False
    #: how bf16 is applied: ``autocast`` around the forward (fp32 weights everywhere), or
    #: ``deepspeed``: DeepSpeed's bf16 mode (bf16 weights, fp32 masters; torch engine: autocast)
    bf16_mode: Literal["autocast", "deepspeed"] = "autocast"
    fused: bool = False  # fused AdamW (one kernel) when the parameters are on the CPU or a GPU
    no_decay_names: tuple[str, ...] = ()  # parameters whose name contains one of these: no weight decay
    zero_stage: int = 0
    zero_bucket_size: int | None = None  # None: DeepSpeed's default (5e8), capped at the model's size
    compile: bool = False  # torch.compile the torch engine's model
    ddp: bool = True  # torch engine with several processes: wrap in DistributedDataParallel


class Engine(Protocol):
    name: str
    dist: Dist
    module: torch.nn.Module
    model: Any
    bf16: bool

    def autocast(self) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> float: ...
    def zero_grad(self) -> None: ...
    def set_lr(self, lr: float) -> None: ...
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]: ...
    def load_state(self, model_sd: dict[str, torch.Tensor], optim: dict[str, torch.Tensor]) -> None: ...


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16) and oneDNN may use
    it (``ONEDNN_MAX_CPU_ISA`` not capped below those). Elsewhere bf16 autocast is emulated: a 3D
    convolution runs tens of times slower than in fp32 (measured on a 2-core AVX2-only EPYC)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if cap != "ALL" and "AMX" not in cap and "BF16" not in cap:
        return False
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto``: bf16 on CUDA, fp32 elsewhere; ``bf16-native``: bf16 on CUDA and on CPUs that
    multiply bf16 in hardware (``cpu_has_native_bf16``), fp32 elsewhere; ``fp32`` / ``bf16`` as asked."""
    if precision == "auto":
        return device.type == "cuda"
    if precision == "bf16-native":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return precision == "bf16"


def resolve_engine(name: str, log_line: Callable[[str], None] | None = None) -> str:
    """``auto``: DeepSpeed when it is installed, else plain torch (saying so).

    Only DeepSpeed's *absence* (an ``ImportError``) falls back; any other error while importing
    it (a broken install, an incompatible torch) propagates instead of hiding behind "torch".
    """
    if name != "auto":
        return name
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        (log_line or log.info)(f"engine auto: DeepSpeed is not importable ({e}); using plain torch")
        return "torch"
    return "deepspeed"


def param_groups(module: torch.nn.Module, weight_decay: float, no_decay_names: tuple[str, ...] = ()) -> list[dict]:
    """Weight decay on matrices and kernels only (nanoGPT): not on biases, norms, or parameters
    named in ``no_decay_names`` (e.g. the MAE's mask token). Order: the module's, decay first."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not any(n in name for n in no_decay_names) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(module: torch.nn.Module, spec: EngineSpec, device: torch.device) -> torch.optim.AdamW:
    fused = spec.fused and device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(module, spec.weight_decay, spec.no_decay_names), lr=spec.lr,
                             betas=tuple(spec.betas), fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def optimizer_state_by_name(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW moments and step of each parameter that has state, keyed by parameter name."""
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        st = optimizer.state.get(p)
        if st:
            out[f"exp_avg/{name}"] = st["exp_avg"].detach().cpu()
            out[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].detach().cpu()
            out[f"step/{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(()).cpu()
    return out


def load_optimizer_state_by_name(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                 optim: dict[str, torch.Tensor]) -> None:
    """The inverse of :func:`optimizer_state_by_name`, into ``optimizer``'s own kernel (a fused
    one keeps its step beside the parameters; an unfused one on the CPU)."""
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for name, p in module.named_parameters():
        if f"exp_avg/{name}" in optim:
            step = optim[f"step/{name}"].clone().float()
            optimizer.state[p] = {
                "step": step.to(p.device) if on_device else step,
                "exp_avg": optim[f"exp_avg/{name}"].to(p.device, p.dtype).clone(),
                "exp_avg_sq": optim[f"exp_avg_sq/{name}"].to(p.device, p.dtype).clone(),
            }


def _fp32_cpu(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.float() if t.is_floating_point() else t


class TorchEngine:
    """Plain torch: the model (+ DDP with several processes, + ``torch.compile``), AdamW,
    gradient clipping, bf16 autocast."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, spec: EngineSpec, d: Dist):
        self.spec, self.dist = spec, d
        self.module = model.to(d.device)
        self.model: Any = self.module
        if d.world_size > 1 and spec.ddp:
            ids = [d.device.index] if d.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        if spec.compile:
            self.model = torch.compile(self.model)
        self.optimizer = make_adamw(self.module, spec, d.device)
        self.bf16 = spec.bf16

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, refuse a non-finite gradient (raises :class:`NonFiniteLossError`, nothing applied),
        update, clear the gradients; returns the gradient norm before clipping."""
        clip = self.spec.grad_clip if self.spec.grad_clip > 0 else float("inf")
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
        set_lr(self.optimizer, lr)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model_sd = {k: _fp32_cpu(v) for k, v in self.module.state_dict().items()}
        return model_sd, optimizer_state_by_name(self.module, self.optimizer)

    def load_state(self, model_sd: dict[str, torch.Tensor], optim: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(model_sd, strict=True)
        load_optimizer_state_by_name(self.module, self.optimizer, optim)


def build_engine(kind: str, model: torch.nn.Module, spec: EngineSpec, d: Dist) -> Engine:
    """``torch`` or ``deepspeed`` (see :func:`resolve_engine` for ``auto``)."""
    if kind == "torch":
        return TorchEngine(model, spec, d)
    if kind == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, spec, d)
    raise ValueError(f"unknown engine {kind!r} (torch | deepspeed)")
