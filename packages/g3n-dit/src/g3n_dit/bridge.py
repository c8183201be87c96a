"""The longitudinal bridge (docs/method.md §6): baseline at t = 0, follow-up at t = 1.

    x_t = (1 - t) x_base + t x_follow + gamma(t) z,   gamma(t) = sigma * sqrt(t (1 - t)),  z ~ N(0, I)

gamma vanishes at both ends, so the path starts exactly at the baseline and ends exactly at the
follow-up; in between the Brownian envelope makes x_t ambiguous, so the network cannot read the
answer off x_t and must use the interval and the other conditions.

Training targets (``BridgeConfig.target``):
- ``mean`` (default): x_follow - x_base, the velocity of the mean path. Bounded for every t; the
  learned field is E[x_follow - x_base | x_t, t, conditions].
- ``drift``: x_follow - x_base + gamma'(t) z, the velocity of the stochastic interpolant itself
  (the probability-flow drift of Albergo & Vanden-Eijnden). gamma'(t) diverges at the ends, so
  t is drawn from [t_min, 1 - t_min].

With ``per_year`` the network's output is a change per year and the velocity is that times the
interval: the forecast's change is then proportional to the interval by construction (nothing at
0, reversed for a negative one), so a handful of training pairs cannot teach an offset that the
interval does not explain.

Forecasting integrates the learned field deterministically from the baseline (Euler, 100 steps by
default) for each requested interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .conditions import CondBatch, Condition
from .config import BridgeConfig
from .flow import autocast_for, guided_velocity, integrate


def gamma(t: torch.Tensor, sigma: float) -> torch.Tensor:
    return sigma * torch.sqrt(torch.clamp(t * (1 - t), min=0.0))


def gamma_dot(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """d gamma / dt = sigma (1 - 2t) / (2 sqrt(t (1 - t))); only finite inside (0, 1)."""
    return sigma * (1 - 2 * t) / (2 * torch.sqrt(t * (1 - t)))


def bridge_point(
    x_base: torch.Tensor, x_follow: torch.Tensor, t: torch.Tensor, z: torch.Tensor, sigma: float
) -> torch.Tensor:
    """x_t of the bridge for per-sample t (B,)."""
    tt = t.view(-1, *([1] * (x_base.dim() - 1))).to(x_base.dtype)
    return (1 - tt) * x_base + tt * x_follow + gamma(tt, sigma) * z


def bridge_target(
    x_base: torch.Tensor, x_follow: torch.Tensor, t: torch.Tensor, z: torch.Tensor, cfg: BridgeConfig
) -> torch.Tensor:
    target = x_follow - x_base
    if cfg.target == "drift":
        tt = t.view(-1, *([1] * (x_base.dim() - 1))).to(x_base.dtype)
        target = target + gamma_dot(tt, cfg.sigma) * z
    return target


def interval_factor(cond: CondBatch, cfg: BridgeConfig, like: torch.Tensor) -> torch.Tensor | float:
    """What the network's output is multiplied by: the interval in years, shaped (B, 1, ...) like
    ``like`` (``per_year``), else 1."""
    if not cfg.per_year:
        return 1.0
    if "interval" not in cond:
        raise ValueError("a per_year bridge needs the 'interval' condition")
    years = cond["interval"][0].to(like.device, torch.float32)
    return years.view(-1, *([1] * (like.dim() - 1)))


def bridge_loss(
    model: torch.nn.Module,
    x_base: torch.Tensor,
    x_follow: torch.Tensor,
    cond: CondBatch,
    generator: torch.Generator,
    cfg: BridgeConfig,
) -> torch.Tensor:
    """Velocity MSE along the bridge; t, z drawn on the CPU generator (exact resume)."""
    b = x_base.shape[0]
    t = torch.rand(b, generator=generator)
    if cfg.target == "drift":
        t = cfg.t_min + (1 - 2 * cfg.t_min) * t
    t = t.to(x_base.device)
    z = torch.randn(x_base.shape, generator=generator).to(x_base.device, x_base.dtype)
    xt = bridge_point(x_base, x_follow, t, z, cfg.sigma)
    target = bridge_target(x_base, x_follow, t, z, cfg)
    pred = model(xt, t, cond, x_base if cfg.baseline_context else None).float() * interval_factor(cond, cfg, xt)
    return torch.mean((pred - target.float()) ** 2)


@torch.no_grad()
def forecast(
    model: torch.nn.Module,
    conditions: Sequence[Condition],
    x_base: torch.Tensor,
    cond: CondBatch,
    scales: Mapping[str, float],
    cfg: BridgeConfig,
    steps: int = 100,
    method: str = "euler",
    precision: str = "fp32",
) -> torch.Tensor:
    """Deterministic integration of the bridge field from the baseline (t = 0) to t = 1.

    With ``cfg.segment_years``, an interval longer than that is forecast as a chain of equal
    segments, each starting from the previous one's forecast with the baseline age moved on
    (``steps`` per segment): a bridge trained on pairs a few years apart is not asked for a jump
    it has never seen, which takes its latents off the data (a 10-year forecast from 1-8-year
    pairs decoded with artefacts)."""
    device = next(model.parameters()).device
    x = x_base.to(device).float()
    cond = {k: (v.to(device), p.to(device)) for k, (v, p) in cond.items()}
    if cfg.segment_years is None or "interval" not in cond:
        return _integrate_bridge(model, conditions, x, cond, scales, cfg, steps, method, precision)
    years = cond["interval"][0].float()
    n_seg = torch.clamp(torch.ceil(years.abs() / cfg.segment_years), min=1).long()
    seg = years / n_seg
    age = next((c.name for c in conditions if c.spec.field == "baseline_age"), None)
    x = x.clone()  # written row by row below; x_base may share its memory
    for r in range(int(n_seg.max())):
        idx = (r < n_seg).nonzero().flatten()  # the samples with a segment left
        sub = {k: (v[idx], p[idx]) for k, (v, p) in cond.items()}
        sub["interval"] = (seg[idx].to(cond["interval"][0].dtype), sub["interval"][1])
        if age is not None:
            v, p = sub[age]
            sub[age] = (v + r * seg[idx].to(v.dtype), p)
        x[idx] = _integrate_bridge(model, conditions, x[idx], sub, scales, cfg, steps, method, precision)
    return x


def _integrate_bridge(model: torch.nn.Module, conditions: Sequence[Condition], xb: torch.Tensor, cond: CondBatch,
                      scales: Mapping[str, float], cfg: BridgeConfig, steps: int, method: str, precision: str
                      ) -> torch.Tensor:
    """One bridge integration from ``xb`` (t = 0) to t = 1 under ``cond``."""
    ctx = xb if cfg.baseline_context else None
    factor = interval_factor(cond, cfg, xb)

    def vel(xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast_for(xb.device, precision):
            return guided_velocity(model, conditions, xx, t, cond, scales, ctx).float() * factor

    return integrate(vel, xb, 0.0, 1.0, steps, method)
