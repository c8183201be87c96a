"""The NaN guard: a non-finite loss or gradient stops training before it reaches the weights."""

from __future__ import annotations

import math
from pathlib import Path

import torch


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss (or gradient norm) became NaN or Inf; no update was
    applied and the last good checkpoint is intact."""


def check_loss(value: float, step: int, last_checkpoint: Path | str | None, hint: str = "") -> None:
    """Raise :class:`NonFiniteLossError` naming the step and the last good checkpoint."""
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"step {step}: loss is {value} (non-finite); training stopped without updating the weights. "
            f"Last good checkpoint: {last_checkpoint or 'none'}.{' ' + hint if hint else ''}"
        )


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or Inf (a checkpoint must never be written with them)."""
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
