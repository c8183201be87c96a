"""What a panel run produces, before it is written: per-slice results, skips, predictions."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import Panel, ProtocolConfig
from .linear import LinearProbe
from .permutation import null_bound, p_value


@dataclass
class Skip:
    """A task or slice that was not scored, and why."""

    task: str
    slice: str
    reason: str


class Predictions:
    """Out-of-fold predictions of one (task, slice), kept by column: a 35,000-unit panel holds
    a few arrays per slice instead of hundreds of thousands of row dicts. Iterating yields rows."""

    def __init__(self) -> None:
        self._chunks: list[dict[str, np.ndarray]] = []
        self.columns: dict[str, np.ndarray] = {}

    def add(self, chunk: dict[str, np.ndarray]) -> None:
        self._chunks.append({k: np.asarray(v) for k, v in chunk.items()})

    def finish(self) -> "Predictions":
        if self._chunks:
            names = list(self._chunks[0])
            self.columns = {n: np.concatenate([c[n] for c in self._chunks]) for n in names}
            self._chunks = []
        return self

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        names = list(self.columns)
        for i in range(len(self)):
            yield {n: _py(self.columns[n][i]) for n in names}


def fold_mean(vals: Sequence[float]) -> float:
    """Mean over the folds that could be scored (NaN marks one that could not); NaN if none."""
    scored = [v for v in vals if not math.isnan(v)]
    return float(np.mean(scored)) if scored else math.nan


def _py(v: Any) -> Any:
    """numpy scalar -> Python scalar (CSV writing and comparisons)."""
    return v.item() if isinstance(v, np.generic) else v


@dataclass
class SliceResult:
    """Fold metrics, predictions and probes of one (task, slice)."""

    task: str
    title: str
    slice: str
    kind: str
    classes: list[str]
    fold_metrics: dict[str, list[float]]
    subjects: int
    volumes: int
    units: int
    notes: list[str] = field(default_factory=list)
    predictions: "Predictions" = field(default_factory=lambda: Predictions())
    probe: LinearProbe | None = None
    fold_probes: list[LinearProbe | None] = field(default_factory=list)
    seconds: float = 0.0
    #: the same folds scored by a constant predictor (the training part's class frequencies or
    #: mean): the level a probe must beat to show the features carry the label
    chance_metrics: dict[str, list[float]] = field(default_factory=dict)
    #: the fold-mean metric of each cross-validation on shuffled labels (empty: not tested)
    null_metrics: dict[str, list[float]] = field(default_factory=dict)

    def chance(self, metric: str) -> float:
        return fold_mean(self.chance_metrics.get(metric, []))

    def permutation(self, metric: str) -> tuple[float, float, int]:
        """(p-value, the score to beat for p < 0.05, number of scored permutations); NaNs when untested."""
        null = self.null_metrics.get(metric, [])
        n = sum(not math.isnan(v) for v in null)
        return p_value(self.summary(metric)[0], null, metric), null_bound(null, metric), n

    def summary(self, metric: str) -> tuple[float, float, int]:
        """Mean and sample SD over scored folds, and the number of scored folds."""
        vals = [v for v in self.fold_metrics.get(metric, []) if not math.isnan(v)]
        if not vals:
            return math.nan, math.nan, 0
        sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan
        return float(np.mean(vals)), sd, len(vals)


@dataclass
class PanelResult:
    """Everything one panel run produced, before it is written to disk."""

    feature_name: str
    feature_source: dict[str, Any]
    feature_dim: int
    panel: Panel
    protocol: ProtocolConfig
    results: list[SliceResult] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    folds: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> subject -> fold
    seconds: float = 0.0

    def get(self, task: str, slice_: str) -> SliceResult | None:
        for r in self.results:
            if r.task == task and r.slice == slice_:
                return r
        return None
