"""L2 logistic regression by L-BFGS, in numpy: scikit-learn's ``LogisticRegression(solver="lbfgs")``
without its per-iteration overhead.

Why not scikit-learn itself: a probe's problem is often small (a few hundred samples, ~100
features), and scikit-learn's loss wrapper adds about 0.1 ms of validation and array-API dispatch to
each of its L-BFGS iterations, as much as the arithmetic. A permutation test runs thousands of such
fits; here a 230 x 96 fit takes 1.4-2.3 times less time, and a paper-size one (28,000 x 1152, its
products with the features memory-bound) the same (tools/bench/probe_fits.py).

The problem is scikit-learn's, term for term, so the optimum is the same:
minimise the mean log-loss + ``0.5 / (C * n) * ||W||^2`` (the intercepts are not penalised), with a
binomial model (one row of coefficients) for two classes and a multinomial (softmax) one for more,
solved by scipy's L-BFGS-B with scikit-learn's settings (``gtol=tol``, ``ftol=64 * eps``,
``maxls=50``), from zeros or from a warm start. Fits agree with scikit-learn's to the solver's
tolerance (a test holds them to it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit


@dataclass
class LogisticFit:
    coef: np.ndarray  # (1, d) for two classes, (K, d) for K > 2
    intercept: np.ndarray  # (1,) or (K,)
    n_iter: int
    converged: bool


def fit_logistic(X: np.ndarray, y: np.ndarray, n_classes: int, C: float = 1.0, max_iter: int = 1000,
                 tol: float = 1e-4, init: tuple[np.ndarray, np.ndarray] | None = None) -> LogisticFit:
    """Fit on ``X`` (n, d) and class indices ``y`` (n,) in ``0..n_classes-1``.

    ``init``: (coef, intercept) of the shapes returned, the optimiser's starting point.
    """
    X = np.asarray(X)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    dt = X.dtype  # the products with X stay in its precision (float32 halves their memory traffic);
    # everything else, and the optimiser, is float64
    y = np.asarray(y, dtype=np.intp)
    n, d = X.shape
    lam = 1.0 / (C * n)
    rows = 1 if n_classes == 2 else n_classes
    # the parameters as one vector: each row is (coef..., intercept)
    w0 = np.zeros((rows, d + 1))
    if init is not None:
        w0[:, :d] = np.asarray(init[0], dtype=np.float64).reshape(rows, d)
        w0[:, d] = np.asarray(init[1], dtype=np.float64).reshape(rows)

    if rows == 1:
        t = (y == 1).astype(np.float64, copy=False)

        def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
            coef = w[:d]
            raw = (X @ coef.astype(dt, copy=False)).astype(np.float64, copy=False) + w[d]
            loss = np.mean(np.logaddexp(0.0, raw) - t * raw) + 0.5 * lam * (coef @ coef)
            g = (expit(raw) - t) / n
            gx = (g.astype(dt, copy=False) @ X).astype(np.float64, copy=False)
            return float(loss), np.concatenate([gx + lam * coef, [g.sum()]])
    else:
        onehot = np.zeros((n, rows))
        onehot[np.arange(n), y] = 1.0

        def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
            W = w.reshape(rows, d + 1)
            raw = (X @ W[:, :d].T.astype(dt, copy=False)).astype(np.float64, copy=False) + W[:, d]
            raw -= raw.max(axis=1, keepdims=True)  # softmax and log-sum-exp without overflow
            e = np.exp(raw)
            s = e.sum(axis=1)
            loss = np.mean(np.log(s) - raw[np.arange(n), y]) + 0.5 * lam * np.sum(W[:, :d] ** 2)
            G = (e / s[:, None] - onehot) / n
            grad = np.empty_like(W)
            grad[:, :d] = (X.T @ G.astype(dt, copy=False)).T.astype(np.float64, copy=False) + lam * W[:, :d]
            grad[:, d] = G.sum(axis=0)
            return float(loss), grad.ravel()

    res = minimize(loss_grad, w0.ravel(), method="L-BFGS-B", jac=True,
                   options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    W = res.x.reshape(rows, d + 1)
    return LogisticFit(coef=W[:, :d].copy(), intercept=W[:, d].copy(), n_iter=int(min(res.nit, max_iter)),
                       converged=res.status == 0)
