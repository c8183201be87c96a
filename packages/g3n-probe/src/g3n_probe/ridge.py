"""Standardised ridge regression for the regression probes, with its penalty chosen by inner CV.

A ridge probe is StandardScaler -> Ridge, fitted exactly as scikit-learn would, but computed from
sufficient statistics (:class:`GramStats`) so that every cross-validation part, its inner search
over alphas and the final probe share one pass over the features: a part's statistics are a sum
of its folds', and one eigendecomposition gives the fit for every alpha at once (:class:`RidgePath`).
Wide features (more columns than rows) go through the n x n kernel instead of the p x p Gram.

The penalty is chosen by subject-grouped CV (:func:`grouped_ridge_alpha`, :func:`ridge_by_fold_cv`)
or by generalised CV in closed form (:func:`ridge_from_stats`, :func:`ridge_dual`); see
:func:`fit_regressor` for which and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from sklearn.model_selection import GroupKFold

from .config import ProtocolConfig
from .linear import FitReport, LinearProbe, _column_scale


@dataclass
class GramStats:
    """Sufficient statistics of raw features X and target y for standardised ridge regression.

    Statistics of disjoint parts add up, so the statistics of every CV training part (the sum
    over the other folds) cost nothing once each fold's are known: one pass over the data
    serves all folds, the final probe and the inner alpha search.
    """

    G: np.ndarray  # X^T X
    s: np.ndarray  # column sums
    xy: np.ndarray  # X^T y
    ys: float
    yy: float
    n: int

    @classmethod
    def of(cls, X: np.ndarray, y: np.ndarray) -> "GramStats":
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        return cls(X.T @ X, X.sum(axis=0), X.T @ y, float(y.sum()), float(y @ y), len(y))

    def __add__(self, o: "GramStats") -> "GramStats":
        return GramStats(self.G + o.G, self.s + o.s, self.xy + o.xy, self.ys + o.ys, self.yy + o.yy, self.n + o.n)

    def __sub__(self, o: "GramStats") -> "GramStats":
        """The statistics of the rows of ``self`` that are not in ``o`` (a part of them)."""
        return GramStats(self.G - o.G, self.s - o.s, self.xy - o.xy, self.ys - o.ys, self.yy - o.yy, self.n - o.n)


@dataclass
class RidgePath:
    """One training part's standardised ridge fits for every alpha at once: the prediction of
    column ``i`` is ``((X - mean) / scale) @ coefs[:, i] + ybar``."""

    mean: np.ndarray
    scale: np.ndarray
    coefs: np.ndarray  # (p, n_alphas), on standardised features
    ybar: float

    def sse(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Sum of squared errors on held-out rows, per alpha."""
        pred = ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale) @ self.coefs + self.ybar
        return ((pred - np.asarray(y, dtype=np.float64)[:, None]) ** 2).sum(axis=0)

    def probe(self, i: int, dtype: Any) -> LinearProbe:
        return _ridge_probe(self.mean, self.scale, self.coefs[:, i], self.ybar, dtype)


def _standardised_eigh(st: GramStats) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Column mean and scale of a part from its statistics, and the eigendecomposition of its
    standardised centred Gram matrix: (mean, scale, w, V, c = V^T Z^T y_centred)."""
    n = st.n
    mean = st.s / n
    ybar = st.ys / n
    Gc = st.G - n * np.outer(mean, mean)
    b = st.xy - n * mean * ybar
    scale = _column_scale(mean, np.sqrt(np.clip(np.diag(Gc) / n, 0.0, None)))
    d = 1.0 / scale
    w, V = np.linalg.eigh(Gc * d[:, None] * d[None, :])
    return mean, scale, np.clip(w, 0.0, None), V, V.T @ (b * d)


def ridge_path(st: GramStats, alphas: np.ndarray) -> RidgePath:
    """:class:`RidgePath` of the part whose statistics are ``st`` (one p x p eigendecomposition)."""
    mean, scale, w, V, c = _standardised_eigh(st)
    return RidgePath(mean, scale, V @ (c[:, None] / (w[:, None] + np.asarray(alphas, dtype=np.float64)[None, :])),
                     st.ys / st.n)


def _standardised_kernel_eigh(X: np.ndarray, y: np.ndarray):
    """:func:`_standardised_eigh` through the n x n kernel of the standardised rows, for wide
    features: (mean, scale, Z, w, U, ybar, c = U^T y_centred)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mean = X.mean(axis=0)
    scale = _column_scale(mean, X.std(axis=0))
    Z = (X - mean) / scale
    ybar = float(y.mean())
    w, U = np.linalg.eigh(Z @ Z.T)
    return mean, scale, Z, np.clip(w, 0.0, None), U, ybar, U.T @ (y - ybar)


def ridge_path_dual(X: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> RidgePath:
    """:func:`ridge_path` through the n x n kernel, for wide features (p^2 may not fit)."""
    mean, scale, Z, w, U, ybar, c = _standardised_kernel_eigh(X, y)
    return RidgePath(mean, scale, Z.T @ (U @ (c[:, None] / (w[:, None] + np.asarray(alphas, dtype=np.float64)[None, :]))), ybar)


def wide(n_rows: int, n_features: int) -> bool:
    """Use the n x n kernel form rather than the p x p Gram form (cheaper, and p^2 may not fit)."""
    return n_features > n_rows


def fit_regressor(
    X: np.ndarray, y: np.ndarray, cfg: ProtocolConfig, groups: np.ndarray | None = None
) -> tuple[LinearProbe, FitReport]:
    """Standardise and fit ridge regression with alpha chosen by inner CV.

    ``ridge_inner_cv="folds"`` (default): subject-grouped inner CV over ``groups``
    (:func:`grouped_ridge_alpha`) with ``cfg.n_splits`` folds; inside the panel's cross-validation
    ``groups`` are the outer folds' labels, so the inner folds are the other outer folds.
    An int k: the same with k folds. ``"gcv"``: generalised CV in closed form
    (:func:`ridge_from_stats`), which treats every row as independent. With fewer than two
    groups there is nothing to cross-validate over, and GCV chooses. No ``groups``: each row is
    its own group (plain k-fold).
    """
    inner = cfg.ridge_inner_cv
    if groups is None:
        groups = np.arange(len(y))
    if inner == "gcv" or len(np.unique(groups)) < 2:
        if wide(*np.shape(X)):
            probe, rep, _ = ridge_dual(X, y, cfg.ridge_alphas, cfg.dtype)
        else:
            probe, rep, _ = ridge_from_stats(GramStats.of(X, y), cfg.ridge_alphas, cfg.dtype)
        return probe, rep
    k = cfg.n_splits if inner == "folds" else int(inner)
    alpha, _ = grouped_ridge_alpha(X, y, np.asarray(groups), cfg.ridge_alphas, k)
    a = np.asarray([alpha])
    path = ridge_path_dual(X, y, a) if wide(*np.shape(X)) else ridge_path(GramStats.of(X, y), a)
    return path.probe(0, cfg.dtype), FitReport(alpha=alpha)


def grouped_ridge_alpha(X: np.ndarray, y: np.ndarray, groups: np.ndarray, alphas: list[float], k: int) -> tuple[float, np.ndarray]:
    """Pick alpha by subject-grouped inner k-fold CV of the whole standardise-then-ridge fit
    (mean squared error), as scikit-learn's ``cross_val_score`` of a StandardScaler -> Ridge
    pipeline over ``GroupKFold(k)`` would. Returns (best alpha, MSE per alpha).

    Cheaply: each inner fold's statistics are computed once and a training part's are the
    total minus its fold's, so the search costs one pass over X and one p x p (or, for wide
    features, n x n) eigendecomposition per inner fold for every alpha at once.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    a = np.asarray(alphas, dtype=np.float64)
    k = min(k, len(np.unique(groups)))
    parts = [test for _, test in GroupKFold(n_splits=k).split(X, y, groups)]
    sse = np.zeros(len(a))
    if wide(*X.shape):
        for test in parts:
            train = np.setdiff1d(np.arange(len(y)), test)
            sse += ridge_path_dual(X[train], y[train], a).sse(X[test], y[test])
    else:
        stats = [GramStats.of(X[test], y[test]) for test in parts]
        total = sum(stats[1:], stats[0])
        for test, st in zip(parts, stats):
            sse += ridge_path(total - st, a).sse(X[test], y[test])
    mse = sse / len(y)
    return float(a[int(np.argmin(mse))]), mse


def ridge_by_fold_cv(stats: dict[Any, GramStats], rows: dict[Any, tuple[np.ndarray, np.ndarray]], targets: list[Any],
                     alphas: list[float], dtype: str = "float64", n_jobs: int = 1) -> dict[Any, tuple[LinearProbe, FitReport]]:
    """Nested CV of the ridge probe from per-fold statistics, alpha chosen by subject-grouped CV.

    ``stats``/``rows``: each outer fold's :class:`GramStats` and its (X, y). For each target, an
    outer fold k (fit on the other folds) or ``"final"`` (fit on all), alpha is chosen by
    cross-validating over the folds it is fitted on, each held out in turn; exactly what
    :func:`grouped_ridge_alpha` chooses with the fold labels as groups. Why not GCV: it treats a
    subject's visits as independent rows and rewards fitting the subject (under-regularised
    brain-age probes). Cheap: every part is a sum of fold statistics, and the part without folds
    {k, j} serves both fold k's and fold j's inner CV, so 5 outer folds cost 5 + 10 (+ 1 for
    the final probe) eigendecompositions, ``n_jobs`` at a time in threads (LAPACK releases the
    GIL). With fewer than two folds to cross-validate over, GCV.
    """
    a = np.asarray(alphas, dtype=np.float64)
    folds = list(stats)

    def plan(t: Any) -> tuple[frozenset, list[Any]]:
        outer = frozenset() if t == "final" else frozenset([t])
        return outer, [f for f in folds if f not in outer]

    def part(without: frozenset) -> GramStats:
        kept = [stats[f] for f in folds if f not in without]
        return sum(kept[1:], kept[0])

    needed: set[frozenset] = set()
    for t in targets:
        outer, inner = plan(t)
        if len(inner) >= 2:
            needed |= {outer, *(outer | {j} for j in inner)}
    order = sorted(needed, key=lambda w: sorted(w))
    paths = dict(zip(order, Parallel(n_jobs=n_jobs, backend="threading")(delayed(lambda w: ridge_path(part(w), a))(w)
                                                                          for w in order)))
    out: dict[Any, tuple[LinearProbe, FitReport]] = {}
    for t in targets:
        outer, inner = plan(t)
        if len(inner) < 2:
            probe, rep, _ = ridge_from_stats(part(outer), alphas, dtype)
            out[t] = (probe, rep)
            continue
        sse = sum(paths[outer | {j}].sse(*rows[j]) for j in inner)
        best = int(np.argmin(sse))
        out[t] = (paths[outer].probe(best, dtype), FitReport(alpha=float(a[best])))
    return out


def ridge_from_stats(st: GramStats, alphas: list[float], dtype: str = "float64") -> tuple[LinearProbe, FitReport, np.ndarray]:
    """Standardise, then ridge with alpha chosen by generalised cross-validation, from statistics.

    The scaler (mean, SD) is the training part's own, as StandardScaler would fit it. GCV
    (Golub, Heath & Wahba 1979) is the rotation-invariant form of leave-one-out CV:
    GCV(a) = n RSS(a) / (n - df(a) - 1)^2, with df the trace of the hat matrix (+1: intercept).
    Everything follows from one eigendecomposition of the p x p standardised Gram matrix.
    Returns (probe, report, GCV per alpha).
    """
    n = st.n
    ybar = st.ys / n
    mean, scale, w, V, c = _standardised_eigh(st)
    yyc = st.yy - n * ybar * ybar
    a = np.asarray(alphas, dtype=np.float64)
    gcv, inv = _gcv_select(w, c**2, yyc, n, a)
    best = int(np.argmin(gcv))
    coef = V @ (c * inv[best])
    return _ridge_probe(mean, scale, coef, ybar, dtype), FitReport(alpha=float(a[best])), gcv


def ridge_dual(X: np.ndarray, y: np.ndarray, alphas: list[float], dtype: str = "float64") -> tuple[LinearProbe, FitReport, np.ndarray]:
    """:func:`ridge_from_stats` for wide features (more columns than rows, e.g. flattened
    38,400-d latents): the same standardised ridge and GCV, from the n x n kernel matrix
    instead of the p x p Gram matrix, whose p^2 doubles (11.8 GB at p = 38,400) would not fit.
    Both matrices share their non-zero eigenvalues, so the fit and the GCV curve are identical.
    """
    mean, scale, Z, w, U, ybar, c = _standardised_kernel_eigh(X, y)
    n = len(c)
    yc = np.asarray(y, dtype=np.float64) - ybar
    a = np.asarray(alphas, dtype=np.float64)
    gcv, inv = _gcv_select(w, w * c**2, float(yc @ yc), n, a)
    best = int(np.argmin(gcv))
    coef = Z.T @ (U @ (c * inv[best]))
    return _ridge_probe(mean, scale, coef, ybar, dtype), FitReport(alpha=float(a[best])), gcv


def _gcv_select(w: np.ndarray, proj2: np.ndarray, yyc: float, n: int, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GCV per alpha and the shrinkage 1/(w + alpha), from the spectrum ``w`` of the standardised
    Gram (or kernel) matrix and ``proj2``, the squared projections of Z^T y on its eigenvectors
    (Gram form: (V^T Z^T y)^2; kernel form: w (U^T y)^2, the same numbers)."""
    inv = 1.0 / (w[None, :] + alphas[:, None])  # (n_alphas, r)
    rss = yyc - (proj2[None, :] * (2 * inv - w[None, :] * inv**2)).sum(axis=1)
    df = (w[None, :] * inv).sum(axis=1) + 1.0
    denom = n - df
    gcv = np.where(denom > 0, n * np.clip(rss, 0.0, None) / np.where(denom > 0, denom, 1.0) ** 2, np.inf)
    return gcv, inv


def _ridge_probe(mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float, dtype: Any) -> LinearProbe:
    dt = np.dtype(dtype)
    return LinearProbe(kind="regression", mean=np.asarray(mean).astype(dt), scale=np.asarray(scale).astype(dt),
                       coef=np.asarray(coef, dtype=dt).reshape(1, -1), intercept=np.asarray([intercept], dtype=dt))
