"""Subject-grouped, stratified K-fold assignment (docs/method.md §4: 5 folds, seed 2025).

Folds are assigned per sample but decided per subject, so no subject is ever in the training
and test part of one fold. The assignment depends only on (group, stratum) pairs, never on
features or on the order of the input, which is what makes ``compare`` splits identical
across feature sets.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


class LeakError(AssertionError):
    """A subject appears in more than one fold."""


def regression_strata(y: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile bins of a continuous target, so each fold spans its range."""
    y = np.asarray(y, dtype=np.float64)
    if n_bins <= 1 or len(np.unique(y)) <= 1:
        return np.zeros(len(y), dtype=np.int64)
    edges = np.unique(np.quantile(y, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return np.digitize(y, edges, right=True).astype(np.int64)


def assign_folds(groups: Sequence[str], strata: Sequence, n_splits: int, seed: int) -> np.ndarray:
    """Fold index (0..n_splits-1) of every sample; all samples of one group share a fold.

    Raises ValueError when there are fewer groups than folds.
    """
    groups_arr = np.asarray(groups, dtype=object).astype(str)
    strata_arr = np.asarray([str(s) for s in strata], dtype=object)
    n = len(groups_arr)
    if len(strata_arr) != n:
        raise ValueError(f"groups ({n}) and strata ({len(strata_arr)}) differ in length")
    uniq = np.unique(groups_arr)
    if len(uniq) < n_splits:
        raise ValueError(f"{len(uniq)} subject(s) cannot fill {n_splits} folds")
    # Canonical order (by group, then stratum) so input order cannot change the result.
    order = np.lexsort((strata_arr.astype(str), groups_arr))
    _, strata_codes = np.unique(strata_arr[order], return_inverse=True)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds_sorted = np.full(n, -1, dtype=np.int64)
    with warnings.catch_warnings():
        # sklearn warns when a stratum has fewer members than folds; the panel drops
        # too-small classes itself and regression bins may legitimately be small.
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, test) in enumerate(splitter.split(np.zeros(n), strata_codes, groups_arr[order])):
            folds_sorted[test] = k
    folds = np.empty(n, dtype=np.int64)
    folds[order] = folds_sorted
    check_no_leak(groups_arr, folds)
    return folds


def check_no_leak(groups: Sequence[str], folds: np.ndarray) -> None:
    """Raise LeakError if any group has samples in two folds (or a sample has no fold)."""
    folds = np.asarray(folds)
    if (folds < 0).any():
        raise LeakError(f"{int((folds < 0).sum())} sample(s) were given no fold")
    seen: dict[str, int] = {}
    for g, f in zip(groups, folds.tolist()):
        if seen.setdefault(str(g), f) != f:
            raise LeakError(f"subject {g!r} is in folds {seen[str(g)]} and {f}")
