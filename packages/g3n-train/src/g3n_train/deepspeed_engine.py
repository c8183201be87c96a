"""The DeepSpeed engine: ``deepspeed.initialize`` behind :class:`g3n_train.engine.Engine`.

ZeRO stage 0 keeps the client AdamW (wrapped, with bf16, in DeepSpeed's fp32-master optimizer);
stages 1-2 give each rank a flat slice of the optimizer state (and, at 2, of the gradients);
stage 3 partitions the weights too. :meth:`DeepSpeedEngine.state` gathers every slice into full
tensors keyed by parameter name (a collective: every rank calls it) and
:meth:`DeepSpeedEngine.load_state` scatters them back, so a checkpoint does not depend on the
engine, the ZeRO stage or the world size. DeepSpeed's own (pickled) checkpoints are not used.

Consolidation reads DeepSpeed internals, listed in :data:`PRIVATE_ATTRIBUTES` (a fast test checks
they exist on the installed version; the dependency is bounded to the tested minor release).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .dist import Dist
from .engine import EngineSpec, make_adamw, set_lr

#: DeepSpeed 5e8-element default bucket; ZeRO allocates buffers this large per rank, so it is
#: capped at the model's size (2 GB of buffer for a 1 M-parameter test model is waste).
DEFAULT_ZERO_BUCKET = 500_000_000

#: DeepSpeed internals this module reads: (module, class, attribute or method). ZeRO-1/2
#: (``DeepSpeedZeroOptimizer``) keeps fp32 flat partitions and links per-parameter views of their
#: AdamW state lazily; ZeRO-3 keeps its flat partitions elsewhere; ZeRO-0 with bf16 wraps AdamW in
#: an optimizer over fp32 master copies. ``tests/test_deepspeed_attributes.py`` checks each one
#: exists in the installed DeepSpeed's source, so an upgrade that renames one fails loudly.
PRIVATE_ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "single_partition_of_fp32_groups"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "_lazy_init_hp_params_optimizer_state"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "_hp_optimizer_states_linked"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "update_lp_params"),
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "fp32_partitioned_groups_flat"),
    ("deepspeed.runtime.fp16.unfused_optimizer", "FP16_UnfusedOptimizer", "fp16_groups"),
    ("deepspeed.runtime.fp16.unfused_optimizer", "FP16_UnfusedOptimizer", "fp32_groups"),
)

#: The fragment helpers (``deepspeed.utils``) that gather and scatter full tensors.
FRAGMENT_HELPERS = ("safe_get_full_fp32_param", "safe_set_full_fp32_param", "safe_get_full_optimizer_state",
                    "safe_set_full_optimizer_state")


def deepspeed_config(spec: EngineSpec, num_params: int) -> dict[str, Any]:
    """Our spec -> a DeepSpeed config dict (no separate JSON file to keep in sync)."""
    # capped at the model's size, rounded up to even (ZeRO-1/2 want a multiple of their alignment, 2)
    bucket = spec.zero_bucket_size or int(min(DEFAULT_ZERO_BUCKET, max(2, num_params + num_params % 2)))
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": {"stage": spec.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
        "bf16": {"enabled": spec.bf16 and spec.bf16_mode == "deepspeed"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed behind the engine interface; consolidates ZeRO-partitioned state on save."""

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, spec: EngineSpec, d: Dist):
        import deepspeed

        self.spec, self.dist = spec, d
        self.bf16 = spec.bf16
        model = model.to(d.device)
        num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        client = make_adamw(model, spec, d.device)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=deepspeed_config(spec, num_params))
        self.module: torch.nn.Module = self.engine.module
        self.model: Any = self.engine
        if spec.zero_stage in (1, 2) and not hasattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
            raise RuntimeError(
                f"zero_stage {spec.zero_stage}: DeepSpeed returned {type(self.engine.optimizer).__name__}, which does "
                "not expose the per-parameter fragments needed to consolidate the optimizer state for checkpoints"
            )

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when asked for in ``autocast`` mode; DeepSpeed's bf16 mode casts by itself
        (the input stays fp32: the first layer casts it to its bf16 weights, targets keep full precision)."""
        on = self.bf16 and self.spec.bf16_mode == "autocast"
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=on)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        gn = self.engine.get_global_grad_norm()
        return float(gn) if gn is not None else float("nan")

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def set_lr(self, lr: float) -> None:
        set_lr(self.engine.optimizer, lr)

    # ---- consolidation ----------------------------------------------------------------------

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
        """(Re)attach per-parameter views of the flat AdamW state (the DeepSpeed 0.19 workaround).

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
        """id(module param) -> fp32 master, for DeepSpeed's unfused bf16 optimizer (ZeRO-0 + bf16),
        whose AdamW state is keyed by the masters and which has no fragment mapping."""
        opt = self.engine.optimizer
        if not (hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups")):
            return {}
        return {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lg, hg)}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Full fp32 weights and AdamW state by parameter name. Collective under ZeRO."""
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
        persistent = set(self.module.state_dict())  # non-persistent buffers are not state
        for name, b in self.module.named_buffers():
            if name in persistent:
                model_sd[name] = b.detach().cpu().float() if b.is_floating_point() else b.detach().cpu()
        return model_sd, optim

    def load_state(self, model_sd: dict[str, torch.Tensor], optim: dict[str, torch.Tensor]) -> None:
        """Scatter full weights and AdamW state (from any engine, stage or world size) into this
        engine; the weights become the fp32 masters too (ZeRO writes the masters back over the
        module's parameters after every step, so weights copied only into the module would be lost)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        inner = self._inner_optimizer()
        self._relink_optimizer_state(create=any(k.startswith("exp_avg/") for k in optim))
        masters = self._masters()
        on_device = any(g.get("fused") or g.get("capturable") for g in inner.param_groups)
        step = None
        with torch.no_grad():
            for name, b in self.module.named_buffers():
                if name in model_sd:  # non-persistent buffers are not saved
                    b.copy_(model_sd[name].to(b.dtype))
            for name, p in self.module.named_parameters():
                value = model_sd[name].to(p.device)
                if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
                    safe_set_full_fp32_param(p, value)
                    if f"exp_avg/{name}" in optim:
                        for key in ("exp_avg", "exp_avg_sq"):
                            safe_set_full_optimizer_state(p, optim[f"{key}/{name}"].to(p.device, torch.float32), key)
                else:  # ZeRO-0: a torch optimizer over the params, or over fp32 masters of bf16 params
                    master = masters.get(id(p), p)
                    p.copy_(value.to(p.dtype))
                    master.copy_(value.to(master.dtype))
                    if f"exp_avg/{name}" in optim:
                        st = {k: optim[f"{k}/{name}"].to(master.device, master.dtype).clone() for k in ("exp_avg", "exp_avg_sq")}
                        st["step"] = optim[f"step/{name}"].clone().float()
                        if on_device:  # a fused AdamW keeps its step beside the parameters
                            st["step"] = st["step"].to(master.device)
                        inner.state[master] = st
                if f"step/{name}" in optim:
                    step = float(optim[f"step/{name}"])
        if step is not None:  # ZeRO keeps one AdamW state per flat partition: set its step count
            for st in inner.state.values():
                if "step" in st:
                    old = st["step"]
                    st["step"] = torch.tensor(step, device=old.device) if torch.is_tensor(old) else step
        self._sync_working_copies(model_sd)

    def _sync_working_copies(self, model_sd: dict[str, torch.Tensor]) -> None:
        opt = self.engine.optimizer
        if hasattr(opt, "update_lp_params"):  # ZeRO-1/2 and bf16: working copies follow the fp32 masters
            opt.update_lp_params()
        elif any(hasattr(p, "ds_id") for p in self.module.parameters()):  # ZeRO-3: gathered working copies
            import deepspeed

            for name, p in self.module.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if self.dist.rank == 0:
                        p.data.copy_(model_sd[name].to(p.device, p.dtype))
