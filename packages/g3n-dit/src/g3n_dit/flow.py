"""Flow matching: the linear interpolant, its velocity loss, per-condition guidance, ODE samplers.

Convention (as willisma/SiT): t = 0 is Gaussian noise x0, t = 1 is data x1,
x_t = (1 - t) x0 + t x1, target velocity x1 - x0, loss = mean squared error.

Per-condition classifier-free guidance -- the exact formula
-----------------------------------------------------------
Let A be the *always-on* conditions (drop probability 0 in training, e.g. modality: the model
never saw them null, so they are kept in every term and never guided), and g_1..g_K the other
conditions in config order. With S_k = A ∪ {g_1..g_k} (each restricted to the conditions the
sample actually requests) and v_k = v(x, t | S_k)::

    v = v_0 + sum_{k=1..K} w_k (v_k - v_{k-1})

a telescoping (chained) decomposition: w_k scales the change of velocity caused by adding g_k.
Consequences, all tested: every w_k = 0 gives v_0, the unconditional velocity (only A kept);
every w_k = 1 gives v_K, the fully conditional velocity; every w_k = w gives the standard
v_0 + w (v_K - v_0). Guidance acts on all channels. Consecutive conditions with the same scale
share one pass (their terms telescope), so equal scales cost exactly two network passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext

import torch

from .conditions import CondBatch, Condition

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t and the target velocity x1 - x0 for per-sample times t (B,)."""
    tt = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
    return (1 - tt) * x0 + tt * x1, x1 - x0


def sample_times(n: int, generator: torch.Generator, scheme: str = "uniform", mean: float = 0.0,
                 std: float = 1.0) -> torch.Tensor:
    """Training times in (0, 1). ``uniform``: t ~ U(0, 1). ``logit_normal``: t = sigmoid(N(mean, std))
    (Esser et al. 2024, SD3), which spends the steps on middle times, where the velocity depends most
    on the conditions; near t = 0 it is nearly the same for every condition, near t = 1 it is easy."""
    if scheme == "uniform":
        return torch.rand(n, generator=generator)
    if scheme == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    raise ValueError(f"time sampling {scheme!r}: expected uniform or logit_normal")


def flow_matching_loss(
    model: torch.nn.Module, x1: torch.Tensor, cond: CondBatch, generator: torch.Generator,
    time_sampling: str = "uniform", time_mean: float = 0.0, time_std: float = 1.0,
) -> torch.Tensor:
    """Velocity MSE with t from :func:`sample_times` and x0 ~ N(0, I) drawn on the CPU generator
    (exact resume and identical draws on any device)."""
    b = x1.shape[0]
    t = sample_times(b, generator, time_sampling, time_mean, time_std).to(x1.device)
    x0 = torch.randn(x1.shape, generator=generator).to(x1.device, x1.dtype)
    xt, target = interpolate(x0, x1, t)
    pred = model(xt, t, cond)
    return torch.mean((pred.float() - target.float()) ** 2)


def guidance_groups(
    conditions: Sequence[Condition], cond: CondBatch, scales: Mapping[str, float]
) -> tuple[list[str], list[tuple[list[str], float]]]:
    """Split conditions into always-on ones and consecutive groups of equal guidance scale.

    Conditions absent from every sample are skipped: adding them changes nothing.
    """
    always = [c.name for c in conditions if c.spec.always_on]
    groups: list[tuple[list[str], float]] = []
    for c in conditions:
        if c.spec.always_on or not bool(cond[c.name][1].any()):
            continue
        w = float(scales[c.name])
        if groups and groups[-1][1] == w:
            groups[-1][0].append(c.name)
        else:
            groups.append(([c.name], w))
    return always, groups


def mask_to(cond: CondBatch, keep: set[str]) -> CondBatch:
    """Keep the named conditions as they are; every other condition becomes null."""
    return {k: (v, p if k in keep else torch.zeros_like(p)) for k, (v, p) in cond.items()}


def guided_velocity(
    model: torch.nn.Module,
    conditions: Sequence[Condition],
    x: torch.Tensor,
    t: torch.Tensor,
    cond: CondBatch,
    scales: Mapping[str, float],
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """The guided velocity of the module docstring; all passes are stacked into one batch."""
    always, groups = guidance_groups(conditions, cond, scales)
    if not groups:
        return model(x, t, mask_to(cond, set(always)), context)
    if len(groups) == 1 and groups[0][1] == 1.0:
        return model(x, t, mask_to(cond, set(always) | set(groups[0][0])), context)
    keep_sets = [set(always)]
    for names, _ in groups:
        keep_sets.append(keep_sets[-1] | set(names))
    n = len(keep_sets)
    b = x.shape[0]
    stacked: CondBatch = {}
    for k, (v, p) in cond.items():
        stacked[k] = (v.repeat(n), torch.cat([p if k in s else torch.zeros_like(p) for s in keep_sets]))
    ctx = None if context is None else context.repeat(n, *([1] * (context.dim() - 1)))
    tt = t.expand(b) if t.dim() == 0 else t
    out = model(x.repeat(n, *([1] * (x.dim() - 1))), tt.repeat(n), stacked, ctx).float()
    vs = out.view(n, *x.shape)
    v = vs[0].clone()
    for k, (_, w) in enumerate(groups, start=1):
        v = v + w * (vs[k] - vs[k - 1])
    return v


def integrate(
    velocity: VelocityFn,
    x: torch.Tensor,
    t_start: float,
    t_end: float,
    steps: int,
    method: str = "euler",
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t_start to t_end (either direction) in ``steps``
    uniform steps. Euler: one evaluation per step. Heun: the trapezoid corrector (two)."""
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown ODE method {method!r} (euler or heun)")
    ts = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    x = x.float()
    for i in range(steps):
        t0, t1 = float(ts[i]), float(ts[i + 1])
        h = t1 - t0
        tb = torch.full((x.shape[0],), t0, device=x.device)
        v0 = velocity(x, tb).float()
        if method == "euler":
            x = x + h * v0
        else:
            x_pred = x + h * v0
            v1 = velocity(x_pred, torch.full_like(tb, t1)).float()
            x = x + 0.5 * h * (v0 + v1)
        if progress is not None:
            progress(i)
    return x


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 pays on ``device``: on CUDA, and on CPUs with AMX tile units (there a
    1200x256 @ 256x1024 matmul runs 6.4x faster in bf16 than in fp32, measured on a 2-core Xeon);
    elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return True
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None) if device.type == "cpu" else None
    return bool(amx is not None and amx()) and not _isa_capped()


def _isa_capped() -> bool:
    """oneDNN or ATen told to use less than the CPU has (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY,
    e.g. to behave as an AVX2-only CPU): the AMX kernels are then off, and bf16 runs emulated,
    hundreds of times slower, although the hardware has tile units."""
    import os

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    return bool(isa and isa not in ("ALL", "DEFAULT") and "AMX" not in isa) or aten in ("default", "avx2")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where :func:`fast_bf16`, else fp32; fp32 and bf16 stay as asked."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast where asked (the ODE state stays fp32); fp32 runs plain."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def initial_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """One N(0, I) draw per sample from its own seed on the CPU: a sample is reproducible from its
    seed alone, whatever batch it was generated in and on whatever device."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    conditions: Sequence[Condition],
    cond: CondBatch,
    noise: torch.Tensor,
    scales: Mapping[str, float],
    steps: int = 50,
    method: str = "euler",
    precision: str = "fp32",
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate the guided flow from noise (t = 0) to data (t = 1)."""
    device = next(model.parameters()).device
    x = noise.to(device)
    cond = {k: (v.to(device), p.to(device)) for k, (v, p) in cond.items()}

    def vel(xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast_for(device, precision):
            return guided_velocity(model, conditions, xx, t, cond, scales, context)

    return integrate(vel, x, 0.0, 1.0, steps, method)


def resolve_scales(
    conditions: Sequence[Condition], default: float, per_condition: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Guidance scale per condition: the per-condition value where given, else the default."""
    per_condition = dict(per_condition or {})
    names = {c.name for c in conditions}
    unknown = set(per_condition) - names
    if unknown:
        raise ValueError(f"guidance given for unknown condition(s) {sorted(unknown)}; known: {sorted(names)}")
    fixed = sorted(c.name for c in conditions if c.spec.always_on and c.name in per_condition)
    if fixed:
        raise ValueError(
            f"condition(s) {fixed} are never dropped in training (drop_prob 0), so the model has no "
            "unconditional velocity for them: they are always on and cannot be guided"
        )
    return {c.name: float(per_condition.get(c.name, default)) for c in conditions}
