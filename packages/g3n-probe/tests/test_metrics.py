"""The project's one ROC AUC against the Mann-Whitney statistic, written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from g3n_probe.metrics import binary_auc, classification_metric, ovr_auc


def _mann_whitney(pos, score):
    """P(score of a positive > score of a negative) + 1/2 P(tie), over every pair."""
    p, n = score[pos], score[~pos]
    return float(((p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()) / (p.size * n.size))


def test_binary_auc_is_the_pairwise_probability_with_ties():
    rng = np.random.default_rng(0)
    pos = rng.random(60) < 0.4
    score = np.round(rng.normal(pos * 0.8, 1.0), 1)  # rounded: many ties
    assert binary_auc(pos, score) == pytest.approx(_mann_whitney(pos, score), abs=1e-12)
    assert binary_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert binary_auc([0, 1], [0.5, 0.5]) == 0.5
    assert math.isnan(binary_auc([1, 1], [0.1, 0.2]))


def test_ovr_auc_is_the_macro_mean_over_scorable_classes():
    rng = np.random.default_rng(1)
    classes = ["a", "b", "c", "d"]
    y = rng.choice(classes[:3], 50)  # "d" absent: not scorable, left out of the mean
    P = rng.dirichlet(np.ones(4), 50)
    want = np.mean([_mann_whitney(y == c, P[:, j]) for j, c in enumerate(classes[:3])])
    assert ovr_auc(y, P, classes) == pytest.approx(want, abs=1e-12)
    assert ovr_auc(list(y), P.tolist(), classes) == pytest.approx(want, abs=1e-12)  # lists, as g3n-eval passes
    # two classes: the plain AUC of the second one, labels compared as strings
    assert ovr_auc([0, 1, 1, 0], np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]]), ["0", "1"]) == 0.75
    assert classification_metric("auc", y, P, classes) == ovr_auc(y, P, classes)


def test_metrics_equal_scikit_learns():
    """The numpy AUC and balanced accuracy give scikit-learn's values, ties and absent classes included."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(2)
    for n in (2, 7, 60, 301):
        pos = np.r_[True, False, rng.random(n - 2) < 0.3]
        for score in (rng.normal(size=n), np.round(rng.normal(pos * 0.5, 1.0), 1), np.zeros(n)):
            assert binary_auc(pos, score) == pytest.approx(roc_auc_score(pos, score), abs=1e-12)
    y = rng.choice(["HC", "AD", "MCI"], 80)
    pred = rng.choice(["HC", "AD", "MCI", "PD"], 80)  # PD predicted but absent from y
    with pytest.warns(UserWarning):
        want = balanced_accuracy_score(y, pred)
    P = np.eye(4)[[["AD", "HC", "MCI", "PD"].index(v) for v in pred]]
    assert classification_metric("balanced_accuracy", y, P, ["AD", "HC", "MCI", "PD"]) == pytest.approx(want, abs=1e-12)
