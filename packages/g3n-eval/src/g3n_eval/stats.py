"""Small statistics shared by the measurements: rank AUC, line fits, Pearson r."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest, rankdata


def auc_binary(positive: Sequence[bool] | np.ndarray, score: Sequence[float] | np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank statistic (ties count 1/2); NaN if a class is absent."""
    y = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_ovr(labels: Sequence[str], proba: np.ndarray, classes: Sequence[str]) -> float:
    """Macro one-vs-rest AUC over the classes present in ``labels``; binary = the plain AUC."""
    lab = np.asarray([str(v) for v in labels], dtype=object)
    P = np.asarray(proba, dtype=np.float64)
    if len(classes) == 2:
        return auc_binary(lab == classes[1], P[:, 1])
    vals = [auc_binary(lab == c, P[:, j]) for j, c in enumerate(classes)]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


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
