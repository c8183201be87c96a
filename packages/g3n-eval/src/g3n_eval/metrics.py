"""Reconstruction scores of volume pairs: MSE, PSNR and 3D SSIM, whole volume and brain mask.

The metrics themselves (definitions, data range, SSIM window) are :mod:`g3n_shards.recon_metrics`,
the one implementation that g3n-tokenizer's bottleneck sweep uses too; this module adds the brain
mask, one score record per volume pair, the z-scoring of a scanner-unit pair and summaries.

* **Brain mask**: the given mask, else reference voxels != 0 (volumes are skull-stripped and the
  background is exactly 0 after preprocessing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from g3n_shards.recon_metrics import (K1, K2, SSIM_SIGMA, SSIM_TAPS, as_volume, crop_mask, data_range_of, gaussian_taps,
                                      mse, psnr, ssim3d, ssim_map)

__all__ = ["K1", "K2", "SSIM_SIGMA", "SSIM_TAPS", "VolumeScores", "brain_mask", "data_range_of", "gaussian_taps", "mse",
           "psnr", "score_volume", "ssim3d", "ssim_map", "summarise", "zscore_pair"]


def _as_f64(a: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    return as_volume(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a, name)


def brain_mask(reference: np.ndarray) -> np.ndarray:
    """Voxels of the (skull-stripped) reference that are not background (exactly 0)."""
    return np.asarray(reference) != 0


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
    test = _as_f64(test, "test")
    smap, b = ssim_map(ref, test, L)  # one map serves both regions
    mc = crop_mask(m, b)
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
