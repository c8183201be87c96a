"""Reconstruction metrics of docs/method.md's Table 5: MSE, PSNR, SSIM on 3D volumes.

All three are computed per volume in the z-scored space the tokenizers work in, then averaged
over volumes. PSNR and SSIM use each target volume's own dynamic range (max - min) as the data
range, since z-scored volumes have no fixed peak value. SSIM is the Gaussian-window SSIM of Wang
et al. (2004) made 3D: window sigma 1.5 truncated at 3.5 sigma (11 voxels), K1 = 0.01, K2 = 0.03,
averaged over the valid (unpadded) region.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _per_volume(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).float()
    if x.ndim == 3:
        x = x[None, None]
    elif x.ndim == 4:
        x = x[:, None]
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"expected volumes (B, 1, X, Y, Z), (B, X, Y, Z) or (X, Y, Z), got {tuple(x.shape)}")
    return x


def mse(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error per volume."""
    r, t = _per_volume(recon), _per_volume(target)
    return ((r - t) ** 2).flatten(1).mean(1)


def data_range(target: torch.Tensor) -> torch.Tensor:
    t = _per_volume(target).flatten(1)
    return (t.max(1).values - t.min(1).values).clamp_min(1e-8)


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB with the target's range as peak; inf for a perfect reconstruction."""
    m = mse(recon, target)
    return 10.0 * torch.log10(data_range(target) ** 2 / m)


def _gauss(sigma: float, truncate: float = 3.5) -> torch.Tensor:
    r = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def blur_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 3D filter with 1D taps ``g``, 'valid' region only. x: (B, 1, X, Y, Z)."""
    k = g.numel()
    x = F.conv3d(x, g.view(1, 1, k, 1, 1))
    x = F.conv3d(x, g.view(1, 1, 1, k, 1))
    return F.conv3d(x, g.view(1, 1, 1, 1, k))


def ssim(recon: torch.Tensor, target: torch.Tensor, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """(B,) 3D SSIM per volume (separable Gaussian window, valid region)."""
    r, t = _per_volume(recon).double(), _per_volume(target).double()
    g = _gauss(sigma).to(r)
    if min(r.shape[2:]) < g.numel():
        raise ValueError(f"volume {tuple(r.shape[2:])} smaller than the SSIM window ({g.numel()})")
    rng = data_range(target).double().view(-1, 1, 1, 1, 1)
    c1, c2 = (k1 * rng) ** 2, (k2 * rng) ** 2
    mu_r, mu_t = blur_valid(r, g), blur_valid(t, g)
    srr = blur_valid(r * r, g) - mu_r**2
    stt = blur_valid(t * t, g) - mu_t**2
    srt = blur_valid(r * t, g) - mu_r * mu_t
    s = ((2 * mu_r * mu_t + c1) * (2 * srt + c2)) / ((mu_r**2 + mu_t**2 + c1) * (srr + stt + c2))
    return s.flatten(1).mean(1).float()


def reconstruction_metrics(recon: torch.Tensor, target: torch.Tensor) -> dict[str, list[float]]:
    """Per-volume MSE, PSNR and SSIM as plain lists (for tables and JSON)."""
    return {"mse": mse(recon, target).tolist(), "psnr": psnr(recon, target).tolist(), "ssim": ssim(recon, target).tolist()}


def summarize(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(sum(finite) / len(finite)) if finite else float("nan")
