"""The tokenizer interface every stage uses (g3n-dit, g3n-eval reach tokenizers only through it).

A tokenizer maps atlas-space volumes to *latents* and back. The contract, so that a team can
replace our tokenizer with its own package without touching the DiT:

* ``encode(volumes)``: ``volumes`` is a float tensor ``(B, 1, X, Y, Z)`` with ``(X, Y, Z) ==
  geometry.shape``, already **z-scored over brain voxels** (> 0; background 0), exactly as the MAE
  loader feeds the encoder (:func:`zscore_brain`). It returns latents ``(B, N, C) ==
  (B, *latent_shape)``: a token sequence in C-order over ``geometry.token_grid``
  (N = gx * gy * gz) with C = ``geometry.channels`` values per token. Every tokenizer uses this
  one layout (a convolutional latent ``C x gx x gy x gz`` is stored as its N x C transpose), so the
  DiT sees any tokenizer the same way.
* ``decode(latents)``: ``(B, N, C)`` -> ``(B, 1, X, Y, Z)`` in the same z-scored space.
  Mapping back to scanner intensities needs each volume's brain mean/std, which the shard-level
  ``encode`` keeps in each latent sample's ``meta.extra`` (``zscore_mean``, ``zscore_std``).
* ``from_checkpoint(path)`` rebuilds a tokenizer from one file; ``model_ref()`` says how: the
  registry name (entry point in the group ``g3n.tokenizers``), the checkpoint's SHA-256 and the
  config. A ``latents`` manifest records that ModelRef, and :func:`g3n_tokenizer.registry.load_tokenizer`
  turns it back into a tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

import g3n_shards as gs
from g3n_shards.intensity import zscore_brain as _zscore_brain

from .errors import LatentError

ZSCORE_MEAN = "zscore_mean"
ZSCORE_STD = "zscore_std"


@runtime_checkable
class Tokenizer(Protocol):
    """What g3n-dit and g3n-eval may rely on. Implementations need not be ``nn.Module``."""

    #: the registry (entry point) name, e.g. "mae-cnn"
    name: str

    @property
    def geometry(self) -> gs.Geometry:
        """Volume shape, spacing, patch size, token grid and channels (C) of the latents."""
        ...

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(N, C) of one volume's latent."""
        ...

    def encode(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) z-scored volumes -> (B, N, C) latents."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, N, C) latents -> (B, 1, X, Y, Z) z-scored volumes."""
        ...

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "Tokenizer":
        """Rebuild the tokenizer from its checkpoint file."""
        ...

    def model_ref(self) -> gs.ModelRef:
        """How to load this tokenizer again: name, checkpoint digest, entry point, config."""
        ...


def values_per_volume(tok: Tokenizer) -> int:
    n, c = tok.latent_shape
    return int(n) * int(c)


def check_latents(latents: torch.Tensor | np.ndarray, latent_shape: tuple[int, int], where: str = "latents") -> torch.Tensor:
    """Refuse latents that do not fit the tokenizer (shape, dtype, NaN/Inf) with a clear error."""
    t = torch.from_numpy(np.array(latents)) if isinstance(latents, np.ndarray) else torch.as_tensor(latents)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    want = tuple(int(s) for s in latent_shape)
    if t.ndim != 3 or tuple(t.shape[1:]) != want:
        raise LatentError(f"{where}: shape {tuple(np.shape(latents))} does not match this tokenizer's latent "
                          f"shape (B, {want[0]}, {want[1]})")
    if not t.is_floating_point():
        raise LatentError(f"{where}: dtype {t.dtype} is not floating point")
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise LatentError(f"{where}: {bad} NaN/Inf values")
    return t


def check_volumes(volumes: torch.Tensor, shape: tuple[int, int, int], where: str = "volumes") -> torch.Tensor:
    """(B, 1, X, Y, Z) with the tokenizer's spatial shape; (B, X, Y, Z) gets its channel axis."""
    t = torch.as_tensor(volumes)
    if t.ndim == 4:
        t = t.unsqueeze(1)
    if t.ndim != 5 or t.shape[1] != 1 or tuple(t.shape[2:]) != tuple(shape):
        raise ValueError(f"{where}: expected (B, 1, {', '.join(map(str, shape))}), got {tuple(volumes.shape)}")
    return t.float() if not t.is_floating_point() else t


def zscore_brain(volume: np.ndarray, key: str = "?") -> tuple[np.ndarray, float, float]:
    """Z-score over brain voxels (> 0), background stays 0; returns (z, mean, std).

    :func:`g3n_shards.intensity.zscore_brain`, the rule of g3n-mae's training loader (the encoder
    must see what it was trained on); the mean and std are returned so the shard-level encode can
    record them for the way back. Raises a ValueError naming ``key`` for NaN/Inf or no brain voxel.
    """
    return _zscore_brain(volume, key)


def unzscore(z: np.ndarray, mean: float, std: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Back to scanner intensities: z * std + mean inside ``mask`` (default: z != 0), 0 outside, clipped >= 0."""
    m = (z != 0) if mask is None else mask.astype(bool)
    out = np.where(m, z * std + mean, 0.0)
    return np.clip(out, 0, None).astype(np.float32)


def grid_tokens(n_tokens: int, grid: tuple[int, int, int]) -> None:
    if math.prod(grid) != n_tokens:
        raise LatentError(f"{n_tokens} tokens do not fill grid {grid}")


def to_grid(latents: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, C) tokens in C-order -> (B, C, gx, gy, gz)."""
    b, n, c = latents.shape
    grid_tokens(n, grid)
    return latents.transpose(1, 2).reshape(b, c, *grid)


def from_grid(x: torch.Tensor) -> torch.Tensor:
    """(B, C, gx, gy, gz) -> (B, N, C) tokens in C-order (the patch embedding's order)."""
    return x.flatten(2).transpose(1, 2)


def model_ref_for(name: str, entry_point: str, checkpoint: str | Path | None, digest: str | None, config: dict[str, Any]) -> gs.ModelRef:
    return gs.ModelRef(name=name, entry_point=entry_point, checkpoint_digest=digest,
                       checkpoint_path=str(checkpoint) if checkpoint is not None else None, config=config)
