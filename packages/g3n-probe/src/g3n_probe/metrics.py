"""Fold metrics: one-vs-rest AUC, balanced accuracy, MAE, R², Pearson r.

AUC for several classes is the macro mean of one-vs-rest AUCs over the classes that have
both positives and negatives in the test fold (a class absent from a fold cannot be scored);
with all classes present this equals scikit-learn's ``roc_auc_score(multi_class="ovr")``.
:func:`ovr_auc` and :func:`binary_auc` are the project's one ROC AUC (g3n-eval's controllability
scores with them too).

AUC and balanced accuracy are computed here in numpy rather than by scikit-learn: a permutation
test scores thousands of small folds, and scikit-learn's input validation made each AUC call take
1.9-2.6 ms against 0.02-0.04 ms here (tools/bench/probe_fits.py). The values are the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _mid_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # start of each run of equal values
    ends = np.r_[first[1:], xs.size]
    mid = (first + ends + 1) / 2.0  # mean of ranks first+1 .. ends
    ranks = np.empty(xs.size, dtype=np.float64)
    ranks[order] = np.repeat(mid, ends - first)
    return ranks


def binary_auc(positive: Sequence[bool] | np.ndarray, score: Sequence[float] | np.ndarray) -> float:
    """ROC AUC of ``score`` for the ``positive`` samples (ties count 1/2); NaN if a class is absent.

    The Mann-Whitney form: the positives' rank sum, less its least possible value, over the
    number of positive-negative pairs (equal to the area under the ROC curve with ties as steps
    taken diagonally, as scikit-learn draws it)."""
    pos = np.asarray(positive, dtype=bool)
    n1 = int(pos.sum())
    n0 = pos.size - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    r = _mid_ranks(np.asarray(score, dtype=np.float64))
    return float((r[pos].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (a predicted class absent from it has
    no recall and is left out, as scikit-learn's ``balanced_accuracy_score`` does after warning)."""
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def ovr_auc(y_true: Sequence[object] | np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> float:
    """Binary AUC (positive = classes[1]) or macro one-vs-rest AUC over the classes present with
    both positives and negatives; NaN if nothing is scorable. Labels compare as strings."""
    y_true = np.asarray([str(v) for v in y_true], dtype=object) if not isinstance(y_true, np.ndarray) else y_true.astype(str)
    P = np.asarray(proba, dtype=np.float64)
    if len(classes) == 2:
        return binary_auc(y_true == str(classes[1]), P[:, 1])
    aucs = [binary_auc(y_true == str(c), P[:, j]) for j, c in enumerate(classes)]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def classification_metric(name: str, y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> float:
    y_true = np.asarray(y_true).astype(str)
    y_pred = np.asarray(classes, dtype=object)[np.argmax(proba, axis=1)].astype(str)
    if name == "auc":
        return ovr_auc(y_true, proba, classes)
    if name == "balanced_accuracy":
        return balanced_accuracy(y_true, y_pred)
    if name == "accuracy":
        return float(np.mean(y_true == y_pred))
    raise ValueError(f"unknown classification metric {name!r}")


def regression_metric(name: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if name == "mae":
        return float(np.mean(np.abs(y_true - y_pred)))
    if name == "r2":
        ss = float(np.sum((y_true - y_true.mean()) ** 2))
        return math.nan if ss == 0 else 1.0 - float(np.sum((y_true - y_pred) ** 2)) / ss
    if name == "pearson_r":
        if np.std(y_true) == 0 or np.std(y_pred) == 0:
            return math.nan
        return float(np.corrcoef(y_true, y_pred)[0, 1])
    raise ValueError(f"unknown regression metric {name!r}")
