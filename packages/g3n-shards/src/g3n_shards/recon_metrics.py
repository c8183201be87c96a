"""Voxel reconstruction metrics: MSE, PSNR and 3D SSIM (numpy, float64). The one implementation.

g3n-tokenizer's bottleneck sweep (docs/method.md Table 5) and ``g3n-eval recon`` both score with
these functions, so their tables agree. They live here, beside the intensity spaces, because the
two stages may not depend on each other and both depend on g3n-shards (numpy only, no torch).

Definitions (g3n-eval protocol 1.x; changing one changes the protocol major version):

* **MSE**: mean of (x - y)^2 over the region (all voxels, or a mask's voxels).
* **Data range** L: max(x) - min(x) of the **reference** x over the whole volume, unless a fixed
  one is given; **1.0 for a constant reference** (a range of 0 has no meaningful peak). The paper's
  figures (MSE 0.119 at PSNR 32.5 on z-scored volumes) imply L of about 15, i.e. the z-scored
  volume's own range; a fixed L would make volumes of different contrast incomparable.
* **PSNR**: 10 log10(L^2 / MSE); +inf for identical volumes.
* **SSIM (3D)**: Wang et al. 2004 with a separable isotropic Gaussian window (sigma 1.5 voxels,
  11 taps, made odd and truncated to the volume's smallest side), K1 = 0.01, K2 = 0.03, the same L,
  on the 'valid' part of the volume (no padding). Whole-volume SSIM is the mean of the map; a
  masked SSIM is its mean over the mask's voxels inside the valid region.
"""

from __future__ import annotations

import math

import numpy as np

SSIM_SIGMA = 1.5
SSIM_TAPS = 11
K1, K2 = 0.01, 0.03


def as_volume(a: object, name: str) -> np.ndarray:
    """A 3D float64 array with finite values; ValueError naming ``name`` otherwise."""
    arr = np.asarray(a)
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a 3D volume, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: volume contains NaN or Inf")
    return arr


def _pair(x: object, y: object) -> tuple[np.ndarray, np.ndarray]:
    xa, ya = as_volume(x, "reference"), as_volume(y, "test")
    if xa.shape != ya.shape:
        raise ValueError(f"shape mismatch: reference {xa.shape} vs test {ya.shape}")
    return xa, ya


def data_range_of(reference: np.ndarray) -> float:
    """L = max - min of the reference; 1.0 for a constant volume."""
    r = float(np.max(reference) - np.min(reference))
    return r if r > 0 else 1.0


def mse(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean squared error of test ``y`` against reference ``x``, over all voxels or over ``mask``."""
    xa, ya = _pair(x, y)
    d = (xa - ya) ** 2
    if mask is None:
        return float(d.mean())
    m = np.asarray(mask, dtype=bool)
    if m.shape != xa.shape:
        raise ValueError(f"mask shape {m.shape} != volume shape {xa.shape}")
    if not m.any():
        raise ValueError("mask is empty")
    return float(d[m].mean())


def psnr(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB (peak: the reference's data range); +inf for identical volumes."""
    L = data_range_of(as_volume(x, "reference")) if data_range is None else float(data_range)
    e = mse(x, y, mask)
    return math.inf if e == 0 else 10.0 * math.log10(L * L / e)


def gaussian_taps(sigma: float = SSIM_SIGMA, taps: int = SSIM_TAPS) -> np.ndarray:
    """Normalised 1D Gaussian of ``taps`` (odd) samples centred on 0."""
    half = taps // 2
    t = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-(t**2) / (2 * sigma * sigma))
    return g / g.sum()


def blur_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable filter with 1D taps ``g`` along each axis of a 3D array, 'valid' region only.

    Each axis is one matrix product with the banded (n - k + 1, n) matrix of the taps: the same
    sums as shifting and adding slice by slice, about 4 times faster through BLAS."""
    k = len(g)
    out = np.asarray(x, dtype=np.float64)
    for axis in range(3):
        n = out.shape[axis]
        band = np.zeros((n - k + 1, n))
        for i in range(n - k + 1):
            band[i, i : i + k] = g
        out = np.moveaxis(np.tensordot(band, out, axes=([1], [axis])), 0, axis)
    return out


def ssim_map(x: np.ndarray, y: np.ndarray, data_range: float | None = None, sigma: float = SSIM_SIGMA,
             taps: int = SSIM_TAPS) -> tuple[np.ndarray, int]:
    """The 3D SSIM map over the valid region, and the border (voxels cropped per side)."""
    xa, ya = _pair(x, y)
    taps = min(taps, min(xa.shape))
    taps -= 1 - taps % 2  # odd
    if taps < 1:
        raise ValueError(f"volume {xa.shape} too small for SSIM")
    L = data_range_of(xa) if data_range is None else float(data_range)
    c1, c2 = (K1 * L) ** 2, (K2 * L) ** 2
    g = gaussian_taps(sigma, taps)
    mx, my, mxx, myy, mxy = (blur_valid(a, g) for a in (xa, ya, xa * xa, ya * ya, xa * ya))
    vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s, taps // 2


def crop_mask(mask: np.ndarray, border: int) -> np.ndarray:
    """A volume mask cropped like the SSIM map (``border`` voxels off each side)."""
    m = np.asarray(mask, dtype=bool)
    return m[border:-border, border:-border, border:-border] if border else m


def ssim3d(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None, data_range: float | None = None,
           sigma: float = SSIM_SIGMA, taps: int = SSIM_TAPS) -> float:
    """Mean 3D SSIM over the valid region, or over the mask's voxels inside it."""
    s, b = ssim_map(x, y, data_range, sigma, taps)
    if mask is None:
        return float(s.mean())
    m = crop_mask(mask, b)
    if not m.any():
        raise ValueError("mask has no voxel inside SSIM's valid region")
    return float(s[m].mean())
