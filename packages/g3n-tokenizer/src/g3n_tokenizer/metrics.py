"""Reconstruction metrics of docs/method.md's Table 5: MSE, PSNR, SSIM on 3D volumes, per volume.

All three are computed per volume in the z-scored space the tokenizers work in, then averaged
over volumes. The definitions (each target's own max - min as the data range, 1.0 for a constant
one; Gaussian-window 3D SSIM, sigma 1.5, 11 taps, K1 = 0.01, K2 = 0.03, valid region) are those of
:mod:`g3n_shards.recon_metrics`, the one implementation that ``g3n-eval recon`` uses too; this
module only applies it to each volume of a batch.
"""

from __future__ import annotations

import math

import torch

from g3n_shards import recon_metrics as rm


def _per_volume(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).float()
    if x.ndim == 3:
        x = x[None, None]
    elif x.ndim == 4:
        x = x[:, None]
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"expected volumes (B, 1, X, Y, Z), (B, X, Y, Z) or (X, Y, Z), got {tuple(x.shape)}")
    return x


def _each(fn, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) ``fn(target_i, recon_i)`` over the batch (the target is the reference)."""
    r, t = _per_volume(recon).detach().cpu().double().numpy(), _per_volume(target).detach().cpu().double().numpy()
    if r.shape != t.shape:
        raise ValueError(f"shape mismatch: recon {r.shape} vs target {t.shape}")
    return torch.tensor([fn(ti[0], ri[0]) for ri, ti in zip(r, t)], dtype=torch.float32)


def mse(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error per volume."""
    return _each(rm.mse, recon, target)


def data_range(target: torch.Tensor) -> torch.Tensor:
    """(B,) each target's max - min (1.0 for a constant one)."""
    return torch.tensor([rm.data_range_of(t[0]) for t in _per_volume(target).double().numpy()], dtype=torch.float32)


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB with the target's range as peak; inf for a perfect reconstruction."""
    return _each(rm.psnr, recon, target)


def ssim(recon: torch.Tensor, target: torch.Tensor, sigma: float = rm.SSIM_SIGMA) -> torch.Tensor:
    """(B,) 3D SSIM per volume (separable Gaussian window, valid region)."""
    if min(_per_volume(target).shape[2:]) < rm.SSIM_TAPS:
        raise ValueError(f"volume {tuple(_per_volume(target).shape[2:])} smaller than the SSIM window ({rm.SSIM_TAPS})")
    return _each(lambda t, r: rm.ssim3d(t, r, sigma=sigma), recon, target)


def reconstruction_metrics(recon: torch.Tensor, target: torch.Tensor) -> dict[str, list[float]]:
    """Per-volume MSE, PSNR and SSIM as plain lists (for tables and JSON)."""
    return {"mse": mse(recon, target).tolist(), "psnr": psnr(recon, target).tolist(), "ssim": ssim(recon, target).tolist()}


def summarize(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(sum(finite) / len(finite)) if finite else float("nan")
