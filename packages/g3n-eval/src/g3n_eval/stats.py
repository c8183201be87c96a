"""Small statistics shared by the measurements: ROC AUC (g3n-probe's), line fits, Pearson r, sign test."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from g3n_probe.metrics import binary_auc, ovr_auc
from scipy.stats import binomtest


#: ROC AUC: g3n-probe's (the one implementation), under the names the measurements use:
#: ``auc_binary(positive, score)`` and ``auc_ovr(labels, proba, classes)`` (macro one-vs-rest over
#: the classes present; binary = the plain AUC of ``classes[1]``).
auc_binary = binary_auc
auc_ovr = ovr_auc


def line_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares slope and intercept of y on x, Pearson r, and n (NaN where undefined)."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {xa.shape} and {ya.shape}")
    n = int(xa.size)
    out = {"n": n, "slope": math.nan, "intercept": math.nan, "pearson_r": math.nan}
    if n < 2 or np.ptp(xa) == 0:
        return out
    xc, yc = xa - xa.mean(), ya - ya.mean()
    slope = float((xc * yc).sum() / (xc * xc).sum())
    out.update(slope=slope, intercept=float(ya.mean() - slope * xa.mean()))
    if np.ptp(ya) > 0:
        out["pearson_r"] = float((xc * yc).sum() / math.sqrt((xc * xc).sum() * (yc * yc).sum()))
    return out


def sign_test(up: int, down: int) -> float:
    """One-sided sign test: P(at least ``up`` of ``up + down`` fair coin flips come up), NaN if none."""
    n = up + down
    return float(binomtest(up, n, 0.5, alternative="greater").pvalue) if n else math.nan
