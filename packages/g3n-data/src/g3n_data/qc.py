"""Quality control figures and the optional QC montage PNG.

A registration whose similarity to the atlas stays under ``qc.min_atlas_correlation``, or a brain
mask whose volume lies outside [min_brain_ml, max_brain_ml], sends the volume to rejects with
the figures, so a reviewer sees why.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from g3n_shards import atomic_path


def atlas_correlation(volume: np.ndarray, atlas_brain: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation with the atlas brain inside the atlas brain mask (0 when constant)."""
    x = np.asarray(volume, dtype=np.float64)[mask]
    y = np.asarray(atlas_brain, dtype=np.float64)[mask]
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / s) if s else 1.0


def montage(volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 image: central sagittal, coronal and axial slices side by side, the atlas brain
    outline in red. Slices are flipped so that superior/anterior point up."""
    v = np.asarray(volume, dtype=np.float32)
    hi = float(np.percentile(v[v > 0], 99.5)) if np.any(v > 0) else 1.0
    g = np.clip(v / (hi or 1.0), 0, 1)
    cx, cy, cz = (s // 2 for s in v.shape)
    views = [(g[cx, :, :], None if mask is None else mask[cx, :, :]),
             (g[:, cy, :], None if mask is None else mask[:, cy, :]),
             (g[:, :, cz], None if mask is None else mask[:, :, cz])]
    tiles = []
    h = max(max(a.shape) for a, _ in views)
    for img, m in views:
        img = np.rot90(img)
        rgb = np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=2)
        if m is not None:
            m = np.rot90(np.asarray(m, bool))
            edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
            rgb[edge] = (255, 0, 0)
        pad = np.zeros((h, rgb.shape[1], 3), np.uint8)
        pad[: rgb.shape[0]] = rgb[:h]
        tiles.append(pad)
    out = np.concatenate(tiles, axis=1)
    k = max(1, int(round(256 / max(out.shape[:2]))))  # small grids (2 mm demo) are enlarged to be readable
    return np.repeat(np.repeat(out, k, axis=0), k, axis=1) if k > 1 else out


def write_montage(path: str | os.PathLike[str], volume: np.ndarray, mask: np.ndarray | None = None) -> Path:
    """Write the QC montage PNG atomically."""
    from PIL import Image

    p = Path(path)
    with atomic_path(p) as tmp:
        Image.fromarray(montage(volume, mask)).save(tmp, format="PNG")
    return p
