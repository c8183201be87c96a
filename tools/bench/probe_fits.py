"""Benchmark: one logistic probe fit and one AUC, g3n-probe's numpy code against scikit-learn's.

The permutation tests of `g3n-probe run` fit and score thousands of small folds, so per-call
overhead decides their time. This times, on standardised synthetic features with a weak class
signal, the same problem solved by ``sklearn.linear_model.LogisticRegression`` (lbfgs) and by
``g3n_probe.logistic.fit_logistic`` (tol 1e-4, C 1, as the protocol), with their iterations and the
largest difference of the coefficients, and ``roc_auc_score`` against ``g3n_probe.metrics.binary_auc``.
Sizes: the demo's (a fold of 230 volumes, 96 features) and, with ``--paper``, one fold of the paper
panel's (28,000 x 1152). BLAS runs one thread, as in the probe's permutation workers. Prints one
JSON document. Measure it also as on an AVX2-only CPU (``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``).

    uv run python tools/bench/probe_fits.py [--reps 20] [--paper]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from g3n_probe.logistic import fit_logistic
from g3n_probe.metrics import binary_auc
from g3n_pipeline.zoo_pack import machine_description


def per_call(fn, reps: int) -> tuple[float, object]:
    """Seconds per call after one warm-up call, and the last result."""
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    return (time.perf_counter() - t) / reps, out


def problem(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[:, : min(8, d)] += 0.3 * y[:, None]
    return (X - X.mean(0)) / X.std(0), y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--paper", action="store_true", help="also one fit at the paper panel's size (slow)")
    a = ap.parse_args()
    sizes = [(230, 96, 2), (230, 96, 5), (230, 96, 8)] + ([(28_000, 1152, 8)] if a.paper else [])
    report: dict = {"cpu": machine_description(),
                    "isa_limit": os.environ.get("ONEDNN_MAX_CPU_ISA", "none"), "fits": [], "auc": []}
    with threadpool_limits(1):
        for n, d, k in sizes:
            X, y = problem(n, d, k)
            reps = a.reps if n < 1000 else 1
            t_sk, sk = per_call(lambda: LogisticRegression(C=1.0, tol=1e-4, max_iter=1000).fit(X, y), reps)
            t_np, fit = per_call(lambda: fit_logistic(X, y, k, C=1.0, tol=1e-4, max_iter=1000), reps)
            report["fits"].append({"n": n, "d": d, "classes": k, "sklearn_ms": round(t_sk * 1e3, 2),
                                   "numpy_ms": round(t_np * 1e3, 2), "speedup": round(t_sk / t_np, 1),
                                   "iterations": [int(sk.n_iter_[0]), fit.n_iter],
                                   "max_coef_difference": float(np.abs(sk.coef_ - fit.coef).max())})
        rng = np.random.default_rng(1)
        for n in (60, 300):
            pos = rng.random(n) < 0.4
            s = np.round(rng.normal(pos * 0.5, 1.0), 2)
            t_sk, a_sk = per_call(lambda: roc_auc_score(pos, s), a.reps * 10)
            t_np, a_np = per_call(lambda: binary_auc(pos, s), a.reps * 10)
            report["auc"].append({"n": n, "sklearn_us": round(t_sk * 1e6, 1), "numpy_us": round(t_np * 1e6, 1),
                                  "difference": abs(a_sk - a_np)})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
