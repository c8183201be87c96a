"""The recon columns: whether a probe still sees its task once a volume has been decoded.

Given the tokenizer's reconstructions of the real volumes (keyed as the real ones), each fold's
probe of the real column scores the reconstructions of the volumes it held out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..stats import auc_ovr, line_fit
from .permutation import is_blind
from .realcv import _fill, _fold_probes


def recon_column(X: np.ndarray, y: Sequence[str], keys: Sequence[str], groups: Sequence[str], folds: np.ndarray,
                 n_splits: int, protocol: Any, classes: Sequence[str], recon: Any, permutations: int = 0,
                 seed: int = 0) -> dict[str, Any]:
    """The real column's probes applied to the tokenizer's reconstructions of the volumes they held out.

    Decoded samples can only show a class the probe still sees after a volume has been through the
    tokenizer: a probe fitted on real features that cannot tell the *reconstructed* real classes apart
    judges decoded samples as blindly as one that cannot tell the real ones apart. Each
    reconstruction (``recon``: a FeatureSet whose keys are the real volumes' keys) is scored by the
    fold's probe that did not see its volume. With ``permutations``, its AUC is tested against the
    reconstructions' labels shuffled between subjects (g3n-probe's scheme; the scores stay, so
    nothing is refitted): ``blind`` by :func:`.permutation.is_blind` (p > ``BLIND_P``; without the test, AUC <= ``BLIND_AUC``)."""
    from g3n_probe.permutation import block_permutation, null_bound, p_value

    at = {str(k): i for i, k in enumerate(recon.keys)}
    pairs = [(j, at[str(k)]) for j, k in enumerate(keys) if str(k) in at]
    out: dict[str, Any] = {"n": len(pairs), "auc": math.nan}
    if not pairs:
        out["blind"] = True
        return out
    proba = np.zeros((len(pairs), len(classes)))
    real_idx = np.asarray([j for j, _ in pairs], dtype=np.int64)
    rec_idx = np.asarray([r for _, r in pairs], dtype=np.int64)
    for test, fit in _fold_probes(X, y, folds, n_splits, protocol):
        rows = np.flatnonzero(test[real_idx])
        if rows.size:
            _fill(proba, rows, classes, fit, recon.X[rec_idx[rows]])
    labels = np.asarray([str(y[j]) for j in real_idx], dtype=object)
    out["auc"] = auc_ovr(list(labels), proba, list(classes))
    if permutations:
        rng = np.random.default_rng(seed)
        subj = [str(groups[j]) for j in real_idx]
        null = [auc_ovr(list(labels[block_permutation(subj, rng)]), proba, list(classes)) for _ in range(permutations)]
        out["permutation"] = {"permutations": permutations, "p": p_value(out["auc"], null, "auc"),
                              "null95": null_bound(null, "auc")}
    out["blind"] = is_blind(out)
    return out


def recon_sweep(X: np.ndarray, values: Sequence[float], groups: Sequence[str], keys: Sequence[str], recon: Any,
                protocol: Any, n_splits: int) -> dict[str, Any]:
    """A sweep's regression probe, cross-validated by subject on real data, applied to held-out real
    volumes (``real``) and to the reconstructions of the same volumes (``recon``): true vs predicted
    value, line fit and mean absolute error of each. Where the reconstructions' slope collapses, the
    probe cannot read the value off decoded volumes, and a decoded sweep cannot show it either."""
    from g3n_probe import assign_folds, fit_regressor

    at = {str(k): i for i, k in enumerate(recon.keys)}
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(groups, dtype=object)
    k = min(n_splits, len(set(groups)))
    folds = assign_folds(list(groups), ["all"] * len(v), k, protocol.seed)
    real_pred = np.full(len(v), np.nan)
    rec_pred = np.full(len(v), np.nan)
    for fold in range(k):
        test = folds == fold
        probe, _ = fit_regressor(X[~test], v[~test], protocol, g[~test])
        real_pred[test] = probe.predict_scores(X[test])
        rows = [j for j in np.flatnonzero(test) if str(keys[j]) in at]
        if rows:
            rec_pred[rows] = probe.predict_scores(recon.X[[at[str(keys[j])] for j in rows]])

    def fit(pred: np.ndarray) -> dict[str, Any]:
        ok = np.isfinite(pred)
        return {**line_fit(v[ok], pred[ok]), "n": int(ok.sum()),
                "mae": float(np.abs(pred[ok] - v[ok]).mean()) if ok.any() else math.nan}

    has = np.isfinite(rec_pred)
    return {"folds": k, "real": fit(np.where(has, real_pred, np.nan)), "recon": fit(rec_pred)}
