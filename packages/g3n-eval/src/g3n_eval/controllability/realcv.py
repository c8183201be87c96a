"""The real column: subject-grouped cross-validated probe predictions on real features.

Every labelling (the real one, and each shuffle of the permutation test) goes through
:func:`real_cv`, so the test compares like with like.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


def _fold_probes(X: np.ndarray, y: Sequence[str], folds: np.ndarray, n_splits: int, protocol: Any) -> Iterator[tuple[np.ndarray, Any]]:
    """Per fold: (its test mask, the classifier fitted on the other folds, or the one class they
    hold: a small cohort's fold can leave one class to train on, and then predicts it, as any probe would)."""
    from g3n_probe import fit_classifier

    yarr = np.asarray(y, dtype=object)
    for k in range(n_splits):
        test = folds == k
        train_classes = sorted(set(yarr[~test]))
        yield test, (train_classes[0] if len(train_classes) < 2 else fit_classifier(X[~test], yarr[~test], protocol)[0])


def _fill(proba: np.ndarray, rows: np.ndarray, classes: Sequence[str], fit: Any, X: np.ndarray) -> None:
    """Write a fold's predictions of ``X`` into ``proba[rows]`` (columns in ``classes`` order)."""
    if isinstance(fit, str):
        proba[rows, list(classes).index(fit)] = 1.0
        return
    P = fit.predict_scores(X)
    for j, c in enumerate(fit.classes):
        proba[rows, list(classes).index(c)] = P[:, j]


def cv_predictions(X: np.ndarray, y: Sequence[str], groups: Sequence[str], protocol: Any,
                   n_splits: int, folds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Subject-grouped cross-validated predictions on real data (the 'real' column). ``folds``:
    a fold number per sample (default: g3n-probe's stratified, subject-grouped assignment)."""
    from g3n_probe import assign_folds

    if folds is None:
        folds = assign_folds(list(groups), list(y), n_splits, protocol.seed)
    classes = sorted(set(y))
    proba = np.zeros((len(y), len(classes)))
    for test, fit in _fold_probes(X, y, folds, n_splits, protocol):
        _fill(proba, np.flatnonzero(test), classes, fit, X[test])
    pred = np.asarray(classes, dtype=object)[np.argmax(proba, axis=1)]
    return pred, proba, classes


def real_cv(X: np.ndarray, y: Sequence[str], groups: Sequence[str], protocol: Any, n_splits: int,
            classes: Sequence[str], folds: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """The real column: cross-validated predictions and probabilities in ``classes`` order (a class
    absent from ``y`` keeps p = 0). The real labels and every shuffle of them go through this one path."""
    pred, proba, have = cv_predictions(X, y, groups, protocol, n_splits, folds)
    P = np.zeros((len(y), len(classes)))
    for j, c in enumerate(have):
        P[:, list(classes).index(c)] = proba[:, j]
    return list(pred), P
