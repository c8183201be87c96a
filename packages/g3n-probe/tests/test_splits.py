"""Fold assignment: no subject in train and test of one fold, stratified, deterministic."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from g3n_probe.splits import LeakError, assign_folds, check_no_leak, regression_strata


def _data(seed: int = 1, n_subjects: int = 200):
    rng = np.random.default_rng(seed)
    groups, labels = [], []
    for s in range(n_subjects):
        lab = "A" if s % 3 else "B"
        for _ in range(int(rng.integers(1, 5))):  # 1-4 volumes per subject
            groups.append(f"sub{s}")
            # a few subjects change label across visits (e.g. MCI -> AD)
            labels.append(lab if rng.random() > 0.05 else "C")
    return np.asarray(groups), np.asarray(labels)


def test_no_subject_in_two_folds():
    groups, labels = _data()
    folds = assign_folds(groups, labels, n_splits=5, seed=2025)
    per_subject: dict[str, set[int]] = {}
    for g, f in zip(groups, folds):
        per_subject.setdefault(g, set()).add(int(f))
    assert all(len(v) == 1 for v in per_subject.values())
    assert set(folds.tolist()) == {0, 1, 2, 3, 4}
    for k in range(5):
        train, test = set(groups[folds != k]), set(groups[folds == k])
        assert not train & test


def test_stratified_and_balanced():
    groups, labels = _data()
    folds = assign_folds(groups, labels, n_splits=5, seed=2025)
    overall = Counter(labels)["B"] / len(labels)
    for k in range(5):
        frac = Counter(labels[folds == k])["B"] / int((folds == k).sum())
        assert abs(frac - overall) < 0.1
    sizes = Counter(folds.tolist())
    assert max(sizes.values()) < 1.5 * min(sizes.values())


def test_deterministic_and_order_independent():
    groups, labels = _data()
    a = assign_folds(groups, labels, 5, 2025)
    perm = np.random.default_rng(7).permutation(len(groups))
    b = assign_folds(groups[perm], labels[perm], 5, 2025)
    assert np.array_equal(a[perm], b)
    assert np.array_equal(a, assign_folds(groups, labels, 5, 2025))
    assert not np.array_equal(a, assign_folds(groups, labels, 5, 1))


def test_leak_check_catches_a_leak():
    with pytest.raises(LeakError, match="sub1"):
        check_no_leak(["sub0", "sub1", "sub1"], np.asarray([0, 0, 1]))
    with pytest.raises(ValueError, match="cannot fill"):
        assign_folds(["a", "b", "c"], ["x", "y", "x"], 5, 2025)


def test_regression_strata_cover_range():
    y = np.linspace(0, 100, 101)
    s = regression_strata(y, 5)
    assert set(s.tolist()) == {0, 1, 2, 3, 4}
    assert np.all(np.diff(s) >= 0)
    assert set(regression_strata(np.ones(10), 5).tolist()) == {0}
