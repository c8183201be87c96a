"""Smooth random fields (subject warps, bias fields, lesion shape) that do not depend on the grid.

A field is a sum of Gaussian bumps on a regular lattice of control points laid in box millimetres
(spacing ``h``, from ``-h`` to the box size ``+h``), with standard-normal coefficients. It is
separable, so evaluating it on any output grid costs three small matrix products rather than a
3D interpolation, and the *same* coefficients give the same continuous field on the demo,
paper and tiny grids. Basis rows are L2-normalised per axis, so every point has unit variance.
"""

from __future__ import annotations

import numpy as np

from .config import BOX_MM, SynthGeometry


def control_points(h: float) -> list[np.ndarray]:
    """Control-point positions (mm) along each axis for lattice spacing ``h``."""
    return [np.arange(-h, mm + h + 1e-9, h) for mm in BOX_MM]


def n_coefficients(h: float) -> tuple[int, int, int]:
    return tuple(len(c) for c in control_points(h))  # type: ignore[return-value]


def _basis(x: np.ndarray, c: np.ndarray, h: float) -> np.ndarray:
    b = np.exp(-0.5 * ((x[:, None] - c[None, :]) / h) ** 2)
    return b / np.sqrt((b**2).sum(1, keepdims=True))


def draw_coefficients(rng: np.random.Generator, h: float, components: int = 1) -> np.ndarray:
    """Standard-normal coefficients (components, nx, ny, nz) for a field of spacing ``h``."""
    return rng.standard_normal((components, *n_coefficients(h)))


def evaluate(coef: np.ndarray, h: float, geometry: SynthGeometry) -> np.ndarray:
    """Field values (components, X, Y, Z) at the voxel centres of ``geometry`` (float32)."""
    cps = control_points(h)
    bx, by, bz = (_basis(geometry.axis_mm(a), cps[a], h) for a in range(3))
    out = np.empty((coef.shape[0], *geometry.shape), np.float32)
    for c in range(coef.shape[0]):
        a = np.tensordot(bx, coef[c], axes=(1, 0))  # (X, ny, nz), small: float64
        a = np.tensordot(a, by, axes=(1, 1))  # (X, nz, Y)
        a = np.tensordot(a.astype(np.float32), bz.astype(np.float32), axes=(1, 1))  # (X, Y, Z)
        out[c] = a
    return out
