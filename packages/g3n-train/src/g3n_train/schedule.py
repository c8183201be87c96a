"""The learning rate as a pure function of the step: nothing to save, resuming restores the step."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up, then cosine decay to a floor at ``total_steps`` (or constant).

    Warm-up: ``lr * (step + 1) / (warmup_steps + warmup_shift)`` for ``step < warmup_steps``
    (g3n-mae uses shift 1, g3n-dit 0). The floor is ``min_lr``, or ``min_lr_ratio * lr`` when a
    ratio is given; each is computed in its own algebraic form so that a run's learning rates stay
    bit-identical to the ones its stage computed before this layer existed (the two forms differ
    in the last float bit).
    """

    lr: float
    warmup_steps: int
    total_steps: int
    min_lr: float = 0.0
    min_lr_ratio: float | None = None
    warmup_shift: int = 1
    constant: bool = False

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / (self.warmup_steps + self.warmup_shift)
        if self.constant:
            return self.lr
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.min_lr_ratio is not None:
            r = self.min_lr_ratio
            return self.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
