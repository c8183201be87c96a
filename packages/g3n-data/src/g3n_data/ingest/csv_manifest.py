"""CSV/TSV manifests: one row per image, a path column plus metadata columns."""

from __future__ import annotations

import os
from pathlib import Path

from ..columns import ColumnMapping, TableError, read_table
from .common import IngestResult, start


def ingest_csv(csv_path: str | Path, mapping: ColumnMapping | None = None) -> IngestResult:
    """A manifest with one row per image: a path column plus metadata columns."""
    p = Path(csv_path)
    mapping, report, mapper, b = start(p.stem, mapping)
    report.tables.append(str(p))
    rows = read_table(p)
    if rows and mapping.path_column not in rows[0]:
        raise TableError(f"{p}: no path column {mapping.path_column!r} (columns: {list(rows[0])}); "
                         f"set path_column in the column mapping")
    for n, row in enumerate(rows, 2):
        where = f"{p}:{n}"
        raw = row[mapping.path_column]
        img = Path(raw) if os.path.isabs(raw) else (p.parent / raw)
        try:
            vals, extra = mapper.map_row(row, where, skip=(mapping.path_column,))
        except TableError as e:
            b.reject(img, row.get("subject") or None, "metadata", str(e))
            continue
        if not raw:
            b.reject(None, vals.get("subject"), "ingest", f"{where}: empty path")
            continue
        if not img.is_file():
            b.reject(img, vals.get("subject"), "ingest", f"{where}: file not found")
            continue
        vals.setdefault("modality", mapping.default_modality)
        if "subject" not in vals:
            b.reject(img, None, "metadata", f"{where}: no subject column (map one to 'subject')")
            continue
        b.add(img, {**vals, "extra": extra}, None, source=where)
    b.res.report = {**report.as_dict(), "source": str(p), "kind": "csv", "cohort": mapping.cohort}
    return b.res

