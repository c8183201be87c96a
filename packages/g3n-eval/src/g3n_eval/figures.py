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
LABEL_W = 120  # the narrowest label column; it widens (up to LABEL_W_MAX) for longer row labels
LABEL_W_MAX = 320
LABEL_PAD = 4
LINE_H = 12  # Pillow's default font (size 10) with its line gap
HEADER_H = 18
#: characters after which a long row label wraps, best first (keys have no spaces, only '-' and '_')
_BREAK_AFTER = (" ", ",;)", "-_/")


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


def wrap_label(text: str, width: float, measure=None) -> list[str]:
    """Split ``text`` into lines no wider than ``width`` pixels, never dropping a character:
    ``"".join(lines) == text``. Lines break after a space where one fits, else after ``,``/``;``,
    else after ``-``/``_``/``/`` (in sample keys), else between characters."""
    if measure is None:
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    lines: list[str] = []
    rest = str(text)
    while rest:
        if measure(rest) <= width:
            lines.append(rest)
            break
        n = 1  # the longest prefix that fits (at least one character, so that it always ends)
        while n < len(rest) and measure(rest[: n + 1]) <= width:
            n += 1
        cut = next((max(i + 1 for i in range(n) if rest[i] in chars) for chars in _BREAK_AFTER
                    if any(c in chars for c in rest[:n])), n)
        lines.append(rest[:cut])
        rest = rest[cut:]
    return lines


def row_label_layout(labels: Sequence[str], cell: int = CELL) -> tuple[int, list[list[str]]]:
    """Width of the label column and each row label's lines: every label whole, wrapped to the
    column; the column grows from LABEL_W to the widest label (up to LABEL_W_MAX, and beyond
    only when a label would otherwise need more lines than its row is high)."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    widest = max((measure(str(lab)) for lab in labels), default=0.0)
    width = int(min(max(LABEL_W, widest + 2 * LABEL_PAD + 1), LABEL_W_MAX))
    max_lines = max(1, (cell - 4) // LINE_H)
    while True:
        wrapped = [wrap_label(str(lab), width - 2 * LABEL_PAD, measure) for lab in labels]
        if all(len(w) <= max_lines for w in wrapped) or width >= widest + 2 * LABEL_PAD + 1:
            return width, wrapped
        width += 40


def grid_png(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str],
             path: str | Path, cell: int = CELL) -> Path:
    """A labelled grid of square cells (each image resized with its aspect kept), written atomically.

    Each row's label is drawn whole, wrapped over as many lines as it needs, in a label column
    as wide as the labels need (see :func:`row_label_layout`)."""
    ncol = max((len(r) for r in rows), default=0)
    labels = [str(lab) for lab in row_labels][: len(rows)]
    label_w, label_lines = row_label_layout(labels + [""] * (len(rows) - len(labels)), cell)
    W, H = label_w + ncol * cell, HEADER_H + len(rows) * cell
    canvas = Image.new("RGB", (max(W, 1), max(H, 1)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, lab in enumerate(col_labels):
        draw.text((label_w + j * cell + 4, 3), str(lab), fill="black")
    for i, (row, lines) in enumerate(zip(rows, label_lines)):
        y0 = HEADER_H + i * cell
        top = y0 + max(0, (cell - len(lines) * LINE_H) // 2)
        for n, line in enumerate(lines):
            draw.text((LABEL_PAD, top + n * LINE_H), line, fill="black")
        for j, img in enumerate(row):
            im = img.copy()
            im.thumbnail((cell - 2, cell - 2), Image.Resampling.NEAREST if max(img.size) < cell // 2 else Image.Resampling.BILINEAR)
            if max(im.size) < cell - 2:  # upscale small volumes so they are visible
                s = (cell - 2) / max(im.size)
                im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.NEAREST)
            x0 = label_w + j * cell + (cell - im.width) // 2
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
