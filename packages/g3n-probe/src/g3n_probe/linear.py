"""Linear probes: fitting, applying with plain numpy, saving without pickle.

A fitted probe is reduced to arrays (scaler mean and scale, coefficients, intercept) plus
labels. Every prediction the panel reports, in cross-validation or from ``g3n-probe apply``,
goes through :meth:`LinearProbe.predict_scores`, so a saved and reloaded probe reproduces
the reported predictions bit for bit. Logistic regression, the classification probes' fit, is in
:mod:`g3n_probe.logistic`; ridge regression, the regression probes' fit, in :mod:`g3n_probe.ridge`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from sklearn.preprocessing import StandardScaler

from .atomic import npz_bytes, write_bytes, write_text
from .config import ProtocolConfig
from .logistic import fit_logistic

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
    """Standardise (fitted on X only) and fit an L2 logistic regression (lbfgs; binomial for two
    classes, multinomial for more: :mod:`g3n_probe.logistic`).

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
    fit = fit_logistic(Z, np.searchsorted(classes, y), len(classes), C=cfg.logreg_C, max_iter=cfg.logreg_max_iter,
                       tol=cfg.logreg_tol, init=(init.coef, init.intercept) if warm and init is not None else None)
    probe = LinearProbe(
        kind="classification",
        mean=scaler.mean_.astype(dtype),
        scale=scaler.scale_.astype(dtype),
        coef=fit.coef.astype(dtype),
        intercept=fit.intercept.astype(dtype),
        classes=classes,
    )
    return probe, FitReport(converged=fit.converged, n_iter=fit.n_iter)


def _column_scale(mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Column SDs for standardising, with constant columns (SD at rounding level) left unscaled."""
    sd = np.array(sd, dtype=np.float64)
    sd[sd < 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))] = 1.0
    return sd
