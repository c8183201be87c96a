"""The real column's permutation test, and when a row's probe counts as blind.

A probe that cannot tell the real classes apart cannot judge generated samples either way; on a
few dozen subjects one that sees nothing often reaches a cross-validated AUC of 0.7 by luck, so
the real column's cross-validation is re-run on labellings shuffled between subjects
(g3n-probe's scheme, :mod:`g3n_probe.permutation`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..stats import auc_ovr
from .realcv import real_cv


#: A probe whose real column's permutation p is above this cannot tell the real classes apart.
BLIND_P = 0.05


#: Without a permutation test (``permutations=0``, a row over ``permutation_max_subjects``, older
#: documents): the cross-validated AUC on real data at or under which a probe counts as blind.
BLIND_AUC = 0.55


#: Rows whose probe is fitted on more subjects skip the permutation test by default: there the null
#: is narrow (the 95th percentile of a two-class AUC on 250 + 250 subjects is about 0.54, close to
#: :data:`BLIND_AUC`), and 99 cross-validations of a paper-sized slice would take hours.
PERMUTATION_MAX_SUBJECTS = 500


def is_blind(real: Mapping[str, Any] | None) -> bool:
    """Whether a row's probe is blind: it does not tell the real classes apart, so its verdict on
    generated samples (cond, paired) cannot show controllability either way. With a permutation
    test: p > :data:`BLIND_P` (on a few dozen subjects a probe that sees nothing often reaches AUC
    0.7); without one: AUC <= :data:`BLIND_AUC`."""
    real = real or {}
    p = (real.get("permutation") or {}).get("p")
    if isinstance(p, float) and not math.isnan(p):
        return p > BLIND_P
    auc = real.get("auc")
    return isinstance(auc, float) and auc <= BLIND_AUC


def _shuffled_auc(X: np.ndarray, ys: np.ndarray, groups: Sequence[str], protocol: Any, n_splits: int,
                  folds: np.ndarray, classes: Sequence[str]) -> float:
    _, P = real_cv(X, list(ys), groups, protocol, n_splits, classes, folds)
    return auc_ovr(list(ys), P, list(classes))


def real_null(X: np.ndarray, y: Sequence[str], groups: Sequence[str], protocol: Any, n_splits: int,
              classes: Sequence[str], permutations: int, seed: int, folds: np.ndarray | None = None) -> list[float]:
    """AUCs of the real column's cross-validation re-run on shuffled labels: what a probe that can
    see nothing of the task scores on these subjects by luck. Labels move between subjects as in
    g3n-probe's permutation test (whole subjects of equal size, then within each subject); the
    folds stay those of the real labels (``folds``, the real column's; default: assigned here as
    :func:`cv_predictions` does). The shuffles are drawn here, in order, from ``seed``; with
    the protocol's ``n_jobs`` > 1 their cross-validations run in that many processes (a logistic
    fit holds the GIL), with the same results."""
    from g3n_probe import assign_folds
    from g3n_probe.permutation import block_permutation
    from joblib import Parallel, delayed

    if folds is None:
        folds = assign_folds(list(groups), list(y), n_splits, protocol.seed)
    rng = np.random.default_rng(seed)
    yarr = np.asarray(y, dtype=object)
    shuffled = [yarr[block_permutation(groups, rng)] for _ in range(permutations)]
    if protocol.n_jobs > 1 and permutations > 1:
        one = protocol.model_copy(update={"n_jobs": 1})
        return list(Parallel(n_jobs=protocol.n_jobs, backend="loky")(
            delayed(_shuffled_auc)(X, ys, groups, one, n_splits, folds, classes) for ys in shuffled))
    return [_shuffled_auc(X, ys, groups, protocol, n_splits, folds, classes) for ys in shuffled]


def real_permutation(real: Mapping[str, Any], null: Sequence[float]) -> dict[str, Any]:
    """The real column's permutation test: p of its AUC among the shuffled ones, and the AUC to beat."""
    from g3n_probe.permutation import null_bound, p_value

    return {"permutations": len(null), "p": p_value(real["auc"], null, "auc"), "null95": null_bound(null, "auc")}
