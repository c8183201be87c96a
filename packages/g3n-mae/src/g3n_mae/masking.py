"""Per-sample random masking by sorting noise (facebookresearch/mae), for any token grid.

Sorting one uniform noise value per token keeps exactly ``len_keep`` tokens in every sample, so a
batch stays a dense tensor; ``ids_restore`` (the inverse permutation) lets the decoder put mask
tokens back in grid order. The noise can be supplied from outside: the training loader derives
it per sample from (seed, epoch, sample key), which makes the mask independent of the batch
composition, the rank count and the process RNG, so data-parallel runs and resumed runs see
exactly the masks a single uninterrupted run sees.
"""

from __future__ import annotations

import hashlib

import torch


def random_masking(
    x: torch.Tensor, len_keep: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep ``len_keep`` tokens per sample (those with the smallest noise).

    Args:
        x: (N, L, D) tokens in grid order.
        len_keep: visible tokens per sample.
        noise: (N, L) values in [0, 1); random if None.

    Returns:
        x_visible (N, len_keep, D), mask (N, L) with 0 = visible and 1 = masked (grid order),
        ids_restore (N, L) inverse permutation, ids_keep (N, len_keep) grid indices of visible tokens.
    """
    n, length, d = x.shape
    if not 0 < len_keep <= length:
        raise ValueError(f"len_keep={len_keep} must be in [1, {length}]")
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    if noise.shape != (n, length):
        raise ValueError(f"noise shape {tuple(noise.shape)} != {(n, length)}")
    noise = noise.to(x.device)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # ascending: small = keep
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore, ids_keep


def sample_noise(seed: int, epoch: int, key: str, num_tokens: int) -> torch.Tensor:
    """Deterministic masking noise for one sample, from (seed, epoch, key) only.

    A fresh ``torch.Generator`` seeded from a SHA-256 of the triple: no global RNG is touched.
    """
    h = hashlib.sha256(f"g3n-mae-mask|{seed}|{epoch}|{key}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
    return torch.rand(num_tokens, generator=g)
