"""Voxel reconstruction metrics: MSE, PSNR and 3D SSIM, over the whole volume or a brain mask.

Definitions (protocol 1.x; changing any of them changes the protocol major version):

* **MSE**: mean of (x - y)^2 over the region (all voxels, or the mask's voxels).
* **PSNR**: 10 log10(L^2 / MSE), with the *data range* L = max(x) - min(x) of the **reference**
  volume x over the whole volume, unless a fixed ``data_range`` is given. The paper's figures
  (MSE 0.119 at PSNR 32.5 on z-scored volumes) imply L of about 15, i.e. the z-scored volume's
  own range; a fixed L would make volumes of different contrast incomparable. Identical volumes
  give PSNR = +inf (written as null in JSON).
* **SSIM (3D)**: Wang et al. 2004 with a separable isotropic Gaussian window (sigma 1.5 voxels,
  11 taps, truncated to the volume's smallest side), K1 = 0.01, K2 = 0.03, the same L as PSNR,
  computed on the 'valid' part of the volume (no padding, as in the original). The whole-volume
  SSIM is the mean of the SSIM map; the masked SSIM is its mean over mask voxels (the mask cropped
  to the valid region like the map).
* **Brain mask**: the given mask, else reference voxels != 0 (volumes are skull-stripped and the
  background is exactly 0 after preprocessing).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from g3n_tokenizer.metrics import blur_valid

SSIM_SIGMA = 1.5
SSIM_TAPS = 11
K1, K2 = 0.01, 0.03


def _as_f64(a: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a 3D volume, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: volume contains NaN or Inf")
    return arr


def brain_mask(reference: np.ndarray) -> np.ndarray:
    """Voxels of the (skull-stripped) reference that are not background (exactly 0)."""
    return np.asarray(reference) != 0


def data_range_of(reference: np.ndarray) -> float:
    """L = max - min of the reference (see module docstring); 1.0 for a constant volume."""
    r = float(np.max(reference) - np.min(reference))
    return r if r > 0 else 1.0


def mse(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean squared error over all voxels or over ``mask``."""
    x, y = _as_f64(x, "reference"), _as_f64(y, "test")
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: reference {x.shape} vs test {y.shape}")
    d = (x - y) ** 2
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if not m.any():
            raise ValueError("mask is empty")
        return float(d[m].mean())
    return float(d.mean())


def psnr(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; +inf for identical volumes."""
    L = data_range_of(np.asarray(x)) if data_range is None else float(data_range)
    e = mse(x, y, mask)
    return math.inf if e == 0 else 10.0 * math.log10(L * L / e)


def gaussian_taps(sigma: float = SSIM_SIGMA, taps: int = SSIM_TAPS) -> torch.Tensor:
    half = taps // 2
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * sigma * sigma))
    return g / g.sum()


def ssim_map(x: np.ndarray, y: np.ndarray, data_range: float | None = None, sigma: float = SSIM_SIGMA,
             taps: int = SSIM_TAPS) -> tuple[np.ndarray, int]:
    """The 3D SSIM map over the valid region, and the border (voxels cropped per side)."""
    xa, ya = _as_f64(x, "reference"), _as_f64(y, "test")
    if xa.shape != ya.shape:
        raise ValueError(f"shape mismatch: reference {xa.shape} vs test {ya.shape}")
    taps = min(taps, min(xa.shape))
    taps -= 1 - taps % 2  # odd
    if taps < 1:
        raise ValueError(f"volume {xa.shape} too small for SSIM")
    L = data_range_of(xa) if data_range is None else float(data_range)
    c1, c2 = (K1 * L) ** 2, (K2 * L) ** 2
    g = gaussian_taps(sigma, taps)
    xt = torch.from_numpy(xa)[None, None]
    yt = torch.from_numpy(ya)[None, None]
    stack = torch.cat([xt, yt, xt * xt, yt * yt, xt * yt], dim=0)
    mx, my, mxx, myy, mxy = blur_valid(stack, g)
    vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s[0].numpy(), taps // 2


def ssim3d(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None, data_range: float | None = None,
           sigma: float = SSIM_SIGMA, taps: int = SSIM_TAPS) -> float:
    """Mean 3D SSIM over the valid region, or over the mask's voxels inside it."""
    s, b = ssim_map(x, y, data_range, sigma, taps)
    if mask is None:
        return float(s.mean())
    m = np.asarray(mask, dtype=bool)
    if b:
        m = m[b:-b, b:-b, b:-b]
    if not m.any():
        raise ValueError("mask has no voxel inside SSIM's valid region")
    return float(s[m].mean())


@dataclass
class VolumeScores:
    """All reconstruction metrics of one volume pair (whole volume and brain mask)."""

    mse: float
    psnr: float
    ssim: float
    mse_brain: float
    psnr_brain: float
    ssim_brain: float
    data_range: float
    brain_voxels: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def score_volume(reference: np.ndarray, test: np.ndarray, mask: np.ndarray | None = None,
                 data_range: float | None = None) -> VolumeScores:
    """Whole-volume and in-mask MSE / PSNR / SSIM with one data range."""
    ref = _as_f64(reference, "reference")
    m = brain_mask(ref) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != ref.shape:
        raise ValueError(f"mask shape {m.shape} != volume shape {ref.shape}")
    L = data_range_of(ref) if data_range is None else float(data_range)
    smap, b = ssim_map(ref, test, L)  # one map serves both regions
    mc = m[b:-b, b:-b, b:-b] if b else m
    if not mc.any():
        raise ValueError("brain mask has no voxel inside SSIM's valid region")
    return VolumeScores(
        mse=mse(ref, test), psnr=psnr(ref, test, data_range=L), ssim=float(smap.mean()),
        mse_brain=mse(ref, test, m), psnr_brain=psnr(ref, test, m, L), ssim_brain=float(smap[mc].mean()),
        data_range=L, brain_voxels=int(m.sum()),
    )


def zscore_pair(reference: np.ndarray, test: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Map both volumes with the reference's brain statistics (mean mu, std sd over its mask):
    (v - mu) / sd inside the mask, v / sd outside. This matches the loaders' brain z-score (zero
    background stays zero) and, being the same map for both, keeps background errors visible in
    the whole-volume scores in the same units."""
    ref = np.asarray(reference, dtype=np.float64)
    m = brain_mask(ref) if mask is None else np.asarray(mask, dtype=bool)
    if not m.any():
        raise ValueError("reference has no brain voxel to z-score")
    mu, sd = ref[m].mean(), ref[m].std()
    sd = sd if sd > 0 else 1.0

    def f(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        return np.where(m, (v - mu) / sd, v / sd)

    return f(ref), f(test)


def summarise(values: list[float]) -> dict[str, float | int | None]:
    """mean, std, median, min, max and count of the finite values (inf PSNR counted apart)."""
    a = np.asarray(values, dtype=np.float64)
    fin = a[np.isfinite(a)]
    out: dict[str, float | int | None] = {"n": int(a.size), "n_infinite": int(np.isinf(a).sum())}
    if fin.size:
        out.update(mean=float(fin.mean()), std=float(fin.std(ddof=1)) if fin.size > 1 else 0.0,
                   median=float(np.median(fin)), min=float(fin.min()), max=float(fin.max()))
    else:
        out.update(mean=None, std=None, median=None, min=None, max=None)
    return out
