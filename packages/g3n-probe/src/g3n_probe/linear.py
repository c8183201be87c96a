"""Linear probes: fitting with scikit-learn, applying with plain numpy, saving without pickle.

A fitted probe is reduced to arrays (scaler mean and scale, coefficients, intercept) plus
labels. Every prediction the panel reports, in cross-validation or from ``g3n-probe apply``,
goes through :meth:`LinearProbe.predict_scores`, so a saved and reloaded probe reproduces
the reported predictions bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler

from .atomic import npz_bytes, write_bytes, write_text
from .config import ProtocolConfig

PROBE_FORMAT = "g3n-probe/linear"
PROBE_VERSION = 1


class ProbeFileError(ValueError):
    """A probe folder is missing, corrupt or of an unknown format; the message names it."""


@dataclass
class LinearProbe:
    """Standardise, then an affine map. Classification: softmax (binary: sigmoid) over classes."""

    kind: Literal["classification", "regression"]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (n_outputs, n_features); binary and regression have one row
    intercept: np.ndarray  # (n_outputs,)
    classes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    def _check(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"probe expects features of shape (n, {self.n_features}), got {X.shape}")
        return X.astype(self.mean.dtype, copy=False)

    def decision(self, X: np.ndarray) -> np.ndarray:
        """Raw linear outputs, (n, n_outputs)."""
        Z = (self._check(X) - self.mean) / self.scale
        return Z @ self.coef.T + self.intercept

    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        """Classification: class probabilities (n, n_classes). Regression: predictions (n,)."""
        d = self.decision(X)
        if self.kind == "regression":
            return d[:, 0]
        if len(self.classes) == 2:
            with np.errstate(over="ignore"):  # exp overflow -> inf -> p = 0, which is the right limit
                p = 1.0 / (1.0 + np.exp(-d[:, 0]))
            return np.stack([1.0 - p, p], axis=1)
        d = d - d.max(axis=1, keepdims=True)
        e = np.exp(d)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class labels (object array) or regression values."""
        s = self.predict_scores(X)
        if self.kind == "regression":
            return s
        return np.asarray(self.classes, dtype=object)[np.argmax(s, axis=1)]

    # ---- persistence (JSON + npz, never pickle) ----
    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``probe.npz`` (arrays) then ``probe.json`` (labels, provenance, npz digest)."""
        folder = Path(folder)
        blob = npz_bytes({"mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": self.intercept})
        write_bytes(folder / "probe.npz", blob)
        doc = {
            "format": PROBE_FORMAT,
            "version": PROBE_VERSION,
            "kind": self.kind,
            "classes": list(self.classes),
            "n_features": self.n_features,
            "dtype": str(self.mean.dtype),
            "npz_sha256": hashlib.sha256(blob).hexdigest(),
            "info": {**self.info, **(extra or {})},
        }
        write_text(folder / "probe.json", json.dumps(doc, indent=2, sort_keys=True, default=_json_default) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "LinearProbe":
        """Load a probe folder written by :meth:`save`, checking format and npz digest."""
        folder = Path(folder)
        jpath, npath = folder / "probe.json", folder / "probe.npz"
        try:
            doc = json.loads(jpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ProbeFileError(f"{jpath}: cannot read probe description: {e}") from e
        if doc.get("format") != PROBE_FORMAT or doc.get("version") != PROBE_VERSION:
            raise ProbeFileError(
                f"{jpath}: format {doc.get('format')!r} version {doc.get('version')!r} is not "
                f"{PROBE_FORMAT!r} version {PROBE_VERSION}"
            )
        try:
            blob = npath.read_bytes()
        except OSError as e:
            raise ProbeFileError(f"{npath}: cannot read probe arrays: {e}") from e
        if hashlib.sha256(blob).hexdigest() != doc.get("npz_sha256"):
            raise ProbeFileError(f"{npath}: SHA-256 does not match {jpath.name}; the file was changed or truncated")
        import io

        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("mean", "scale", "coef", "intercept")}
        return cls(kind=doc["kind"], classes=list(doc["classes"]), info=doc.get("info", {}), **arrays)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


@dataclass
class FitReport:
    """What happened while fitting: convergence warnings and the chosen ridge alpha."""

    converged: bool = True
    alpha: float | None = None
    n_iter: int | None = None


def _scale(X: np.ndarray, dtype: np.dtype, inplace: bool = False) -> tuple[StandardScaler, np.ndarray]:
    """Fit a StandardScaler on X and standardise. ``inplace`` reuses X's memory when it already
    has ``dtype`` (callers pass True only for a private copy, e.g. a fold's training rows)."""
    Z = np.asarray(X, dtype=dtype) if inplace else np.array(X, dtype=dtype, copy=True)
    scaler = StandardScaler(copy=False).fit(Z)
    return scaler, scaler.transform(Z, copy=False)


def fit_on_components(X: np.ndarray, k: int, fit: Callable[[np.ndarray], tuple[LinearProbe, FitReport]]
                      ) -> tuple[LinearProbe, FitReport]:
    """Fit a probe on the top ``k`` principal components of the standardised ``X`` (the training
    part: nothing of a test part is seen), and return it composed back onto ``X``'s own features.

    PCA and the probe are both affine, so the composition is one LinearProbe of the original width
    (its ``mean``/``scale`` are the column standardisation, its ``coef`` folds in the components and
    the probe's own standardisation): it scores and saves like any other probe.
    """
    X64 = np.asarray(X, dtype=np.float64)
    mean = X64.mean(axis=0)
    scale = _column_scale(mean, X64.std(axis=0))
    Z = (X64 - mean) / scale
    k = max(1, min(k, Z.shape[0] - 1, Z.shape[1]))
    _, _, vt = np.linalg.svd(Z, full_matrices=False)  # economy SVD: rows are the components
    V = vt[:k]
    inner, report = fit((Z @ V.T).astype(X.dtype, copy=False))
    w = inner.coef.astype(np.float64) / inner.scale.astype(np.float64)  # (outputs, k)
    dt = inner.mean.dtype
    probe = LinearProbe(kind=inner.kind, mean=mean.astype(dt), scale=scale.astype(dt), coef=(w @ V).astype(dt),
                        intercept=(inner.intercept - w @ inner.mean.astype(np.float64)).astype(dt),
                        classes=list(inner.classes), info={**inner.info, "pca_components": k})
    return probe, report


def fit_classifier(
    X: np.ndarray, y: np.ndarray, cfg: ProtocolConfig, init: LinearProbe | None = None, inplace: bool = False
) -> tuple[LinearProbe, FitReport]:
    """Standardise (fitted on X only) and fit an L2 logistic regression (lbfgs, multinomial).

    ``init``: a probe with the same classes whose coefficients start the optimiser (warm
    start). The problem is convex, so this changes the iterations needed, not the optimum.
    """
    dtype = np.dtype(cfg.dtype)
    scaler, Z = _scale(X, dtype, inplace=inplace)
    y = np.asarray(y).astype(str)
    classes = sorted(set(y.tolist()))
    if len(classes) < 2:
        raise ValueError("training data has a single class")
    warm = init is not None and list(init.classes) == classes and init.n_features == Z.shape[1]
    clf = LogisticRegression(C=cfg.logreg_C, max_iter=cfg.logreg_max_iter, tol=cfg.logreg_tol, warm_start=warm)
    if warm:
        assert init is not None
        clf.coef_ = np.array(init.coef, dtype=np.float64)
        clf.intercept_ = np.array(init.intercept, dtype=np.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(Z, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    probe = LinearProbe(
        kind="classification",
        mean=scaler.mean_.astype(dtype),
        scale=scaler.scale_.astype(dtype),
        coef=clf.coef_.astype(dtype),
        intercept=clf.intercept_.astype(dtype),
        classes=[str(c) for c in clf.classes_],
    )
    return probe, FitReport(converged=converged, n_iter=int(np.max(clf.n_iter_)))


def _centred_gram(G: np.ndarray, s: np.ndarray, Zy: np.ndarray, ysum: float, n: int):
    """Gram matrix and cross-products of column-centred data, from raw sums (no copy of Z)."""
    mu, ybar = s / n, ysum / n
    return G - n * np.outer(mu, mu), Zy - n * mu * ybar, mu, ybar


def _ridge_coefs(Gc: np.ndarray, b: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Ridge coefficients for every alpha at once, (p, n_alphas), via one eigendecomposition."""
    w, V = np.linalg.eigh(Gc)
    w = np.clip(w, 0.0, None)
    Vb = V.T @ b
    return V @ (Vb[:, None] / (w[:, None] + alphas[None, :]))


def _ridge_coefs_dual(Zc: np.ndarray, yc: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """:func:`_ridge_coefs` from centred data through the n x n kernel (wide features)."""
    w, U = np.linalg.eigh(Zc @ Zc.T)
    w = np.clip(w, 0.0, None)
    Uy = U.T @ yc
    return Zc.T @ (U @ (Uy[:, None] / (w[:, None] + alphas[None, :])))


def grouped_ridge_alpha(Z: np.ndarray, y: np.ndarray, groups: np.ndarray, alphas: list[float], k: int) -> tuple[float, np.ndarray]:
    """Pick alpha by subject-grouped inner k-fold CV (mean squared error), cheaply.

    Each inner fold's Gram matrix is computed once; a training part's Gram is the total minus
    its fold's, so the whole search costs one pass over Z plus k eigendecompositions of a
    p x p matrix, instead of k x n_alphas ridge fits. Returns (best alpha, MSE per alpha).
    """
    Z = np.asarray(Z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    a = np.asarray(alphas, dtype=np.float64)
    k = min(k, len(np.unique(groups)))
    parts = [test for _, test in GroupKFold(n_splits=k).split(Z, y, groups)]
    if wide(*Z.shape):
        sse = np.zeros(len(a))
        for test in parts:
            train = np.setdiff1d(np.arange(len(y)), test)
            mu, ybar = Z[train].mean(axis=0), float(y[train].mean())
            C = _ridge_coefs_dual(Z[train] - mu, y[train] - ybar, a)
            sse += (((Z[test] - mu) @ C + ybar - y[test][:, None]) ** 2).sum(axis=0)
        mse = sse / len(y)
        return float(a[int(np.argmin(mse))]), mse
    stats = []
    for test in parts:
        Zf = Z[test]
        stats.append((Zf.T @ Zf, Zf.sum(axis=0), Zf.T @ y[test], float(y[test].sum()), len(test)))
    G = sum(st[0] for st in stats)
    S = sum(st[1] for st in stats)
    ZY = sum(st[2] for st in stats)
    YS = sum(st[3] for st in stats)
    N = sum(st[4] for st in stats)
    sse = np.zeros(len(a))
    for test, (Gf, sf, zyf, ysf, nf) in zip(parts, stats):
        Gc, b, mu, ybar = _centred_gram(G - Gf, S - sf, ZY - zyf, YS - ysf, N - nf)
        C = _ridge_coefs(Gc, b, a)
        pred = (Z[test] - mu) @ C + ybar
        sse += ((pred - y[test][:, None]) ** 2).sum(axis=0)
    mse = sse / N
    return float(a[int(np.argmin(mse))]), mse


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


def ridge_from_stats(st: GramStats, alphas: list[float], dtype: str = "float64") -> tuple[LinearProbe, FitReport, np.ndarray]:
    """Standardise, then ridge with alpha chosen by generalised cross-validation, from statistics.

    The scaler (mean, SD) is the training part's own, as StandardScaler would fit it. GCV
    (Golub, Heath & Wahba 1979) is the rotation-invariant form of leave-one-out CV:
    GCV(a) = n RSS(a) / (n - df(a) - 1)^2, with df the trace of the hat matrix (+1: intercept).
    Everything follows from one eigendecomposition of the p x p standardised Gram matrix.
    Returns (probe, report, GCV per alpha).
    """
    n = st.n
    mean = st.s / n
    ybar = st.ys / n
    Gc = st.G - n * np.outer(mean, mean)
    b = st.xy - n * mean * ybar
    scale = _column_scale(mean, np.sqrt(np.clip(np.diag(Gc) / n, 0.0, None)))
    d = 1.0 / scale
    M = Gc * d[:, None] * d[None, :]
    w, V = np.linalg.eigh(M)
    w = np.clip(w, 0.0, None)
    c = V.T @ (b * d)
    yyc = st.yy - n * ybar * ybar
    a = np.asarray(alphas, dtype=np.float64)
    gcv, inv = _gcv_select(w, c**2, yyc, n, a)
    best = int(np.argmin(gcv))
    coef = V @ (c * inv[best])
    return _ridge_probe(mean, scale, coef, ybar, dtype), FitReport(alpha=float(a[best])), gcv


def _column_scale(mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Column SDs for standardising, with constant columns (SD at rounding level) left unscaled."""
    sd = np.array(sd, dtype=np.float64)
    sd[sd < 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))] = 1.0
    return sd


def _ridge_probe(mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float, dtype: Any) -> LinearProbe:
    dt = np.dtype(dtype)
    return LinearProbe(kind="regression", mean=np.asarray(mean).astype(dt), scale=np.asarray(scale).astype(dt),
                       coef=np.asarray(coef, dtype=dt).reshape(1, -1), intercept=np.asarray([intercept], dtype=dt))


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


def ridge_dual(X: np.ndarray, y: np.ndarray, alphas: list[float], dtype: str = "float64") -> tuple[LinearProbe, FitReport, np.ndarray]:
    """:func:`ridge_from_stats` for wide features (more columns than rows, e.g. flattened
    38,400-d latents): the same standardised ridge and GCV, from the n x n kernel matrix
    instead of the p x p Gram matrix, whose p^2 doubles (11.8 GB at p = 38,400) would not fit.
    Both matrices share their non-zero eigenvalues, so the fit and the GCV curve are identical.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    mean = X.mean(axis=0)
    scale = _column_scale(mean, X.std(axis=0))
    Z = (X - mean) / scale
    ybar = float(y.mean())
    yc = y - ybar
    w, U = np.linalg.eigh(Z @ Z.T)
    w = np.clip(w, 0.0, None)
    c = U.T @ yc
    a = np.asarray(alphas, dtype=np.float64)
    gcv, inv = _gcv_select(w, w * c**2, float(yc @ yc), n, a)
    best = int(np.argmin(gcv))
    coef = Z.T @ (U @ (c * inv[best]))
    return _ridge_probe(mean, scale, coef, ybar, dtype), FitReport(alpha=float(a[best])), gcv


def wide(n_rows: int, n_features: int) -> bool:
    """Use the n x n kernel form rather than the p x p Gram form (cheaper, and p^2 may not fit)."""
    return n_features > n_rows


def fit_regressor(
    X: np.ndarray, y: np.ndarray, cfg: ProtocolConfig, groups: np.ndarray | None = None
) -> tuple[LinearProbe, FitReport]:
    """Standardise and fit ridge regression with alpha chosen by inner CV.

    ``ridge_inner_cv="gcv"`` (default): generalised CV in closed form (:func:`ridge_from_stats`);
    an int k: subject-grouped inner k-fold over ``groups`` (:func:`grouped_ridge_alpha`),
    exact but one p x p eigendecomposition per inner fold.
    """
    if cfg.ridge_inner_cv == "gcv":
        if wide(*np.shape(X)):
            probe, rep, _ = ridge_dual(X, y, cfg.ridge_alphas, cfg.dtype)
        else:
            probe, rep, _ = ridge_from_stats(GramStats.of(X, y), cfg.ridge_alphas, cfg.dtype)
        return probe, rep
    dtype = np.dtype(cfg.dtype)
    scaler, Z = _scale(X, dtype)
    y = np.asarray(y, dtype=np.float64)
    if groups is None:
        raise ValueError("grouped inner CV needs subject groups")
    alpha, _ = grouped_ridge_alpha(Z, y, np.asarray(groups), cfg.ridge_alphas, int(cfg.ridge_inner_cv))
    Z64 = np.asarray(Z, dtype=np.float64)
    if wide(*Z64.shape):
        mu, ybar = Z64.mean(axis=0), float(y.mean())
        coef = _ridge_coefs_dual(Z64 - mu, y - ybar, np.asarray([alpha]))[:, 0]
    else:
        Gc, b, mu, ybar = _centred_gram(Z64.T @ Z64, Z64.sum(axis=0), Z64.T @ y, float(y.sum()), len(y))
        coef = np.linalg.solve(Gc + alpha * np.eye(Gc.shape[0]), b)
    probe = _ridge_probe(scaler.mean_, scaler.scale_, coef, ybar - float(mu @ coef), dtype)
    return probe, FitReport(alpha=alpha)
