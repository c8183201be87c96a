"""Trilinear sampling of many template channels at one set of points, with shared weights.

``scipy.ndimage.map_coordinates`` recomputes the corner indices and weights for every channel
(and casts the coordinates each call); a synthetic volume samples ~12 channels at the same
points, so computing them once and gathering all channels per corner is several times faster.
Outside the template grid every channel reads 0 (the stacks carry one voxel of zero padding).
"""

from __future__ import annotations

import numpy as np


def pad_stack(channels: list[np.ndarray]) -> np.ndarray:
    """(X, Y, Z) channels -> one (X+2, Y+2, Z+2, C) float32 stack with a zero border."""
    st = np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)
    return np.ascontiguousarray(np.pad(st, ((1, 1), (1, 1), (1, 1), (0, 0))))


class Trilinear:
    """Corner indices and weights of points ``coords`` (3, ...) in a grid of ``shape`` voxels."""

    def __init__(self, coords: np.ndarray, shape: tuple[int, int, int]) -> None:
        self.out_shape = coords.shape[1:]
        sx, sy, sz = (s + 2 for s in shape)
        self.strides = (sy * sz, sz, 1)
        base = np.zeros(int(np.prod(self.out_shape)), np.int64)
        fr = []
        for a in range(3):
            c = coords[a].reshape(-1).astype(np.float32, copy=False) + np.float32(1.0)  # padded index
            c = np.clip(c, 0.0, np.float32(shape[a] + 1))  # beyond the border: reads zero padding
            i0 = np.minimum(np.floor(c), np.float32(shape[a]))
            fr.append(c - i0)
            base += i0.astype(np.int64) * self.strides[a]
        self.base = base
        self.frac = fr

    def __call__(self, stack: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """Sample a padded stack (X+2, Y+2, Z+2, C) -> (C, ...) float32.

        Points go in chunks so that the 8 corner gathers and their weighted sums stay in cache:
        twice as fast as whole-volume passes, and the same sums in the same order, to the bit."""
        flat = stack.reshape(-1, stack.shape[-1])
        n, nc = self.base.size, flat.shape[1]
        res = np.empty((nc, n), np.float32)
        out = np.empty((chunk, nc), np.float32)
        buf = np.empty_like(out)
        idx = np.empty(chunk, np.int64)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            o, b, ix = out[: e - s], buf[: e - s], idx[: e - s]
            o[...] = 0.0
            base = self.base[s:e]
            fx, fy, fz = (f[s:e] for f in self.frac)
            for dx in (0, 1):
                wx = fx if dx else 1.0 - fx
                for dy in (0, 1):
                    wxy = wx * (fy if dy else 1.0 - fy)
                    for dz in (0, 1):
                        w = wxy * (fz if dz else 1.0 - fz)
                        np.add(base, dx * self.strides[0] + dy * self.strides[1] + dz, out=ix)
                        np.take(flat, ix, axis=0, out=b)
                        b *= w[:, None]
                        o += b
            res[:, s:e] = o.T
        return res.reshape((nc, *self.out_shape))
