"""The ``g3n-data ingest`` command: run one source's ingest and write the work list files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..columns import ColumnMapping, load_mapping
from ..worklist import write_worklist
from .bids import ingest_bids
from .common import IngestResult
from .csv_manifest import ingest_csv
from .dicom import ingest_dicom


def add_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ingest", help="discover images + metadata (BIDS, CSV, DICOM) into a work list",
        description="Discover input images and their metadata into OUT/worklist.jsonl (+ rejects.jsonl, "
                    "ingest_report.json). Then run `g3n-data preprocess OUT/worklist.jsonl --out SHARDS`.")
    p.add_argument("source_kind", choices=["bids", "csv", "dicom"], help="what SOURCE is")
    p.add_argument("source", help="BIDS folder, CSV/TSV manifest, or DICOM root folder")
    p.add_argument("--out", required=True, help="folder for worklist.jsonl, rejects.jsonl, ingest_report.json")
    p.add_argument("--mapping", help="YAML/JSON column mapping (ColumnMapping: columns, value codes, cohort...)")
    p.add_argument("--cohort", help="cohort name (default: the folder or file name)")
    p.add_argument("--site", help="site for every image without a site column")
    p.add_argument("--unknown-columns", choices=["keep", "refuse"], help="keep unknown columns in extra, or refuse")
    p.add_argument("--table", help="DICOM: metadata table (CSV/TSV) with a subject column matching folder names")
    p.set_defaults(func=_main)


def run_ingest(kind: str, source: str | Path, out: str | Path, mapping: ColumnMapping,
               table: str | Path | None = None) -> IngestResult:
    """Ingest and write the work list files into ``out``."""
    if kind == "bids":
        res = ingest_bids(source, mapping)
    elif kind == "csv":
        res = ingest_csv(source, mapping)
    elif kind == "dicom":
        res = ingest_dicom(source, out, mapping, table)
    else:
        raise ValueError(f"unknown source kind {kind!r}")
    write_worklist(out, res.items, res.rejects, res.report)
    return res


def _main(args: argparse.Namespace) -> int:
    try:
        mapping = load_mapping(args.mapping)
        upd = {k: v for k, v in (("cohort", args.cohort), ("site", args.site),
                                 ("unknown_columns", args.unknown_columns)) if v}
        mapping = mapping.model_copy(update=upd)
        res = run_ingest(args.source_kind, args.source, args.out, mapping, args.table)
    except (ValueError, FileNotFoundError) as e:
        print(f"g3n-data ingest: {e}", file=sys.stderr)
        return 2
    print(res.summary())
    print("mapped columns: " + json.dumps(res.report.get("columns", {})))
    if res.report.get("kept_in_extra"):
        print("kept in extra: " + ", ".join(res.report["kept_in_extra"]))
    return 0
