"""Figures of the controllability command: the generated volumes along each requested condition."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def sweep_montages(gen_vols: Any, fields: Sequence[str], out: Path) -> dict[str, str]:
    """One montage per field with at least two requested values: the first generated sample of
    each value, in value order (numbers first). Returns {figure name: PNG file name in ``out``}."""
    from ..figures import volume_montage

    figures: dict[str, str] = {}
    for field in fields:
        by_value: dict[str, Any] = {}
        for m, v in zip(gen_vols.metas, gen_vols.arrays):
            val = m.get(field)
            if val is not None and str(val) not in by_value:
                by_value[str(val)] = v
        if len(by_value) >= 2:
            order = sorted(by_value, key=lambda s: (float(s) if _isnum(s) else float("inf"), s))
            name = f"sweep_{field}.png"
            volume_montage([by_value[k] for k in order], [f"{field}={k}" for k in order], out / name)
            figures[f"sweep_{field}"] = name
    return figures


def _isnum(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
