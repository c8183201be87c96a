"""PNG figures for the report, drawn with Pillow (no plotting library, no fonts to install).

Volumes are (x, y, z) in atlas space (LPS after preprocessing); each view shows the central
plane rotated so that anterior/superior point up. Grey-level figures window each volume between
the 0.5th and 99.5th percentile of its non-zero voxels; difference maps use a symmetric blue
(negative) - white - red (positive) scale around zero.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .inception import VIEWS, robust_unit_scale
from .records import atomic_write_bytes

CELL = 128
LABEL_W = 120
HEADER_H = 18


def _plane(volume: np.ndarray, view: str, offset: int = 0) -> np.ndarray:
    axis = VIEWS.index(view)
    i = volume.shape[axis] // 2 + offset
    return np.rot90(np.take(volume, i, axis=axis))


def grey_cells(volume: np.ndarray, views: Sequence[str] = VIEWS) -> list[Image.Image]:
    v = robust_unit_scale(np.asarray(volume, dtype=np.float32))
    return [Image.fromarray((_plane(v, view) * 255).round().astype(np.uint8), mode="L").convert("RGB") for view in views]


def diverging_cells(diff: np.ndarray, views: Sequence[str] = VIEWS, limit: float | None = None) -> list[Image.Image]:
    d = np.asarray(diff, dtype=np.float32)
    lim = float(limit) if limit else float(np.percentile(np.abs(d), 99.5)) or 1.0
    cells = []
    for view in views:
        p = np.clip(_plane(d, view) / lim, -1, 1)
        r = np.where(p > 0, 1.0, 1.0 + p)
        b = np.where(p < 0, 1.0, 1.0 - p)
        g = 1.0 - np.abs(p)
        rgb = (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)
        cells.append(Image.fromarray(rgb, mode="RGB"))
    return cells


def grid_png(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str],
             path: str | Path, cell: int = CELL) -> Path:
    """A labelled grid of square cells (each image resized with its aspect kept), written atomically."""
    ncol = max((len(r) for r in rows), default=0)
    W, H = LABEL_W + ncol * cell, HEADER_H + len(rows) * cell
    canvas = Image.new("RGB", (max(W, 1), max(H, 1)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, lab in enumerate(col_labels):
        draw.text((LABEL_W + j * cell + 4, 3), str(lab), fill="black")
    for i, (row, lab) in enumerate(zip(rows, row_labels)):
        y0 = HEADER_H + i * cell
        draw.text((4, y0 + cell // 2 - 6), str(lab)[:20], fill="black")
        for j, img in enumerate(row):
            im = img.copy()
            im.thumbnail((cell - 2, cell - 2), Image.Resampling.NEAREST if max(img.size) < cell // 2 else Image.Resampling.BILINEAR)
            if max(im.size) < cell - 2:  # upscale small volumes so they are visible
                s = (cell - 2) / max(im.size)
                im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.NEAREST)
            x0 = LABEL_W + j * cell + (cell - im.width) // 2
            canvas.paste(im, (x0, y0 + (cell - im.height) // 2))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def volume_montage(volumes: Sequence[np.ndarray], labels: Sequence[str], path: str | Path, cell: int = CELL) -> Path:
    """One row per volume: its central sagittal, coronal and axial planes."""
    return grid_png([grey_cells(v) for v in volumes], labels, VIEWS, path, cell)


def diff_montage(diffs: Sequence[np.ndarray], labels: Sequence[str], path: str | Path, cell: int = CELL) -> Path:
    lim = max(float(np.percentile(np.abs(d), 99.5)) for d in diffs) or 1.0
    return grid_png([diverging_cells(d, limit=lim) for d in diffs], labels, VIEWS, path, cell)
