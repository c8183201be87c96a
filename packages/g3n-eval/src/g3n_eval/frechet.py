"""Frechet distance between two Gaussians fitted to feature sets (the FID formula).

FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}). The matrix square root follows the usual
safeguards (Heusel et al.'s reference code, pytorch-fid): if ``sqrtm`` of the product is singular
or returns non-finite values, a small ``eps`` is added to both diagonals; a negligible imaginary
part from round-off is dropped, a large one is an error (the inputs are not valid covariances).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg


class FrechetError(ValueError):
    """Statistics cannot be compared (shapes differ, too few samples, not a covariance)."""


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set, with its size (FD is biased for small n)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def of(cls, features: np.ndarray) -> "GaussianStats":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise FrechetError(f"features must be (n, d), got shape {f.shape}")
        if f.shape[0] < 2:
            raise FrechetError(f"need at least 2 samples for a covariance, got {f.shape[0]}")
        if not np.isfinite(f).all():
            raise FrechetError("features contain NaN or Inf")
        return cls(mu=f.mean(axis=0), sigma=np.atleast_2d(np.cov(f, rowvar=False)), n=int(f.shape[0]))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, max_imag: float = 1e-3) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise FrechetError(f"incompatible statistics: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(covmean.imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=max_imag):
            raise FrechetError(f"matrix square root has a large imaginary component ({imag:.3g}): not covariances?")
        covmean = covmean.real
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(fd, 0.0) if fd > -1e-6 * max(1.0, abs(np.trace(s1) + np.trace(s2))) else fd


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's sqrtm; a singular product may come back with inf/nan, handled by the caller."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return linalg.sqrtm(a)


def frechet_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Exact FD from two feature sets without a d x d matrix square root.

    With centred features A (n1 x d) and B (n2 x d), S1 = A^T A / (n1 - 1) and S2 = B^T B / (n2 - 1);
    the non-zero eigenvalues of S1 S2 are the squared singular values of
    C = A B^T / sqrt((n1 - 1)(n2 - 1)), so Tr (S1 S2)^{1/2} is C's nuclear norm. For few samples
    in a wide space (e.g. 64 samples of 2048-d Inception features) this is exact and thousands of
    times faster than ``sqrtm`` on 2048 x 2048, with no singular-matrix fallback needed.
    """
    A, B = np.asarray(a, np.float64), np.asarray(b, np.float64)
    for name, f in (("first", A), ("second", B)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise FrechetError(f"{name} feature set must be (n >= 2, d), got shape {f.shape}")
        if not np.isfinite(f).all():
            raise FrechetError(f"{name} feature set contains NaN or Inf")
    if A.shape[1] != B.shape[1]:
        raise FrechetError(f"feature widths differ: {A.shape[1]} vs {B.shape[1]}")
    mu1, mu2 = A.mean(0), B.mean(0)
    A, B = A - mu1, B - mu2
    n1, n2 = A.shape[0] - 1, B.shape[0] - 1
    tr1, tr2 = float((A * A).sum() / n1), float((B * B).sum() / n2)
    nuclear = float(np.linalg.svd(A @ B.T, compute_uv=False).sum()) / np.sqrt(n1 * n2)
    diff = mu1 - mu2
    fd = float(diff @ diff) + tr1 + tr2 - 2.0 * nuclear
    return max(fd, 0.0) if fd > -1e-9 * max(1.0, tr1 + tr2) else fd


def frechet_between(a: np.ndarray | GaussianStats, b: np.ndarray | GaussianStats) -> float:
    """FD between two feature sets (or their precomputed statistics).

    Feature sets with no more samples than dimensions take the exact low-rank route
    (:func:`frechet_from_features`); otherwise the covariance route with ``sqrtm``."""
    if not isinstance(a, GaussianStats) and not isinstance(b, GaussianStats):
        fa, fb = np.asarray(a), np.asarray(b)
        if fa.ndim == 2 and fb.ndim == 2 and max(fa.shape[0], fb.shape[0]) <= fa.shape[1]:
            return frechet_from_features(fa, fb)
    sa = a if isinstance(a, GaussianStats) else GaussianStats.of(a)
    sb = b if isinstance(b, GaussianStats) else GaussianStats.of(b)
    return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
