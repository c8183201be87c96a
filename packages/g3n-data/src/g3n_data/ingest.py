"""`g3n-data ingest`: discover inputs and their metadata into a work list (BIDS, CSV manifest, DICOM).

Sources:
- BIDS folder: ``sub-*/[ses-*/]anat/*_T1w|_T2w|_FLAIR.nii[.gz]``, ``*ce-*_T1w`` = T1c, metadata from
  ``participants.tsv`` and per-subject ``sub-*_sessions.tsv`` (per-session values, e.g. age, win).
- CSV manifest: one row per image, a path column plus metadata columns.
- DICOM: ``ROOT/<subject>/[ses-*/]...`` series folders, converted to NIfTI with SimpleITK's series
  reader (GDCM); modality from the series description keywords; metadata from an optional table,
  and age and sex from the series' PatientAge/PatientSex tags where the table gives none.

Every image found ends in the work list or as a line of ``rejects.jsonl`` (unsupported suffix,
metadata failing validation, duplicate key, unreadable file...). The column mapping used and
the columns kept in ``extra`` are written to ``ingest_report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from g3n_shards import MetadataError, SampleMeta, sample_key

from .columns import ColumnMapping, Mapper, MappingReport, TableError, load_mapping, read_table
from .images import keep_locale, sha256_file
from .worklist import WorkItem, reject_line, write_worklist

NIFTI_RE = re.compile(r"\.nii(\.gz)?$")
BIDS_SUFFIX = {"T1w": "T1", "T2w": "T2", "FLAIR": "FLAIR"}
DICOM_KEYWORDS: dict[str, tuple[str, ...]] = {  # checked in this order
    "T1c": ("post", "gad", "+c", "contrast", "t1c", "t1ce", "mprage_gd"),
    "FLAIR": ("flair", "tirm"),
    "T2": ("t2",),
    "T1": ("t1", "mprage", "spgr", "tfl", "bravo"),
}


#: The only DICOM tags ever read into metadata (besides the series description, read for the
#: modality only). Names, IDs, birth dates, study dates, descriptions and institution are never read.
DICOM_AGE_TAG = "0010|1010"  # PatientAge, VR AS: "065Y", "006M", "010W", "030D"
DICOM_SEX_TAG = "0010|0040"  # PatientSex, VR CS: M, F, O
_DICOM_AGE_RE = re.compile(r"^(\d{1,3})([DWMY])$")
_DICOM_AGE_DAYS = {"D": 1.0, "W": 7.0, "M": 365.25 / 12.0, "Y": 365.25}


class DicomTagError(ValueError):
    """A PatientAge/PatientSex value that cannot be read; becomes an ingest warning naming the file."""


def parse_dicom_age(value: str) -> float | None:
    """DICOM PatientAge (VR AS, ``nnnD|W|M|Y``) -> years; ``None`` when the tag is empty.

    Units matter: an infant's "006M" read as 6 years would be a silent error in every age model,
    so only the four DICOM units are accepted and anything else raises :class:`DicomTagError`.
    DICOM pads odd-length values with a space (GDCM returns "6 years "), hence the strip.
    """
    v = value.strip().rstrip("\x00").strip()
    if not v:
        return None
    m = _DICOM_AGE_RE.match(v.upper())
    if m is None:
        raise DicomTagError(f"PatientAge {v[:32]!r} is not a DICOM age string (nnnD, nnnW, nnnM or nnnY)")
    years = int(m.group(1)) * _DICOM_AGE_DAYS[m.group(2)] / 365.25
    if not 0.0 <= years <= 120.0:
        raise DicomTagError(f"PatientAge {v!r} is {years:.1f} years, outside 0-120")
    return round(years, 4)


def parse_dicom_sex(value: str) -> tuple[str | None, bool]:
    """DICOM PatientSex (VR CS) -> (``"M"``/``"F"``/``None``, was it "O").

    "O" (other) is a valid DICOM value with no place in SampleMeta's sex (F/M): it becomes
    unknown and is counted in the report rather than dropped silently or forced into M/F.
    """
    v = value.strip().rstrip("\x00").strip()
    if not v:
        return None, False
    if v.upper() in ("M", "F"):
        return v.upper(), False
    if v.upper() == "O":
        return None, True
    raise DicomTagError(f"PatientSex {v[:32]!r} is not a DICOM sex code (M, F or O)")


@dataclass
class IngestResult:
    items: list[WorkItem] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"ingest: {len(self.items)} inputs in the work list, {len(self.rejects)} rejected"]
        reasons: dict[str, int] = {}
        for r in self.rejects:
            k = f"{r['step']}: {r['reason'].split(':')[0][:70]}"
            reasons[k] = reasons.get(k, 0) + 1
        lines += [f"  {n} x {k}" for k, n in sorted(reasons.items())]
        warnings = self.report.get("warnings") or []
        if warnings:
            lines.append(f"  {len(warnings)} warning(s), see ingest_report.json 'warnings'")
        return "\n".join(lines)


def _entities(name: str) -> dict[str, str]:
    stem = NIFTI_RE.sub("", name)
    ents = {}
    for part in stem.split("_")[:-1]:
        if "-" in part:
            k, v = part.split("-", 1)
            ents[k] = v
    ents["suffix"] = stem.split("_")[-1]
    return ents


class _Builder:
    """Accumulates items and rejects; validates metadata and keeps keys unique."""

    def __init__(self, mapping: ColumnMapping, report: MappingReport) -> None:
        self.mapping = mapping
        self.report = report
        self.res = IngestResult()
        self._keys: dict[str, str] = {}

    def reject(self, path: str | Path | None, subject: str | None, step: str, reason: str, **kw: Any) -> None:
        self.res.rejects.append(reject_line(str(path) if path else None, subject, step, reason, **kw))

    def add(self, path: Path, record: dict[str, Any], suffix: str | None, source: str) -> None:
        subject = record.get("subject")
        try:
            sha = sha256_file(path)
        except OSError as e:
            self.reject(path, subject, "ingest", f"unreadable file: {e.strerror or e}")
            return
        rec = {k: v for k, v in record.items() if v is not None}
        rec.setdefault("cohort", self.mapping.cohort)
        if self.mapping.site and "site" not in rec:
            rec["site"] = self.mapping.site
        rec["source_sha256"] = sha
        try:
            meta = SampleMeta.validate_record(rec, source=source)
        except MetadataError as e:
            self.reject(path, subject, "metadata", str(e))
            return
        key = sample_key(meta, suffix=suffix)
        if key in self._keys:
            self.reject(path, subject, "ingest", f"duplicate key {key!r}: same subject/session/modality as "
                                                 f"{self._keys[key]} (add a run- entity to tell them apart)")
            return
        self._keys[key] = str(path)
        self.res.items.append(WorkItem(path=str(path.absolute()), key=key, meta=meta.model_dump(mode="json")))


def _keyed_table(p: Path, mapper: Mapper, field: str, prefix: str, no_id: str) -> dict[str, tuple[dict, dict]]:
    """A BIDS table keyed by its id column (mapped to ``field``, values given ``prefix``) ->
    {id: (values, extra)}; a bad row is kept as an error, so it rejects that id's images later."""
    out: dict[str, tuple[dict, dict]] = {}
    if not p.is_file():
        return out
    mapper.report.tables.append(str(p))
    for n, row in enumerate(read_table(p), 2):
        col = next((c for c in row if mapper.field_for(c) == field), None)
        if col is None:
            raise TableError(f"{p}: {no_id}")
        key = row[col].strip()
        key = key if key.startswith(prefix) else f"{prefix}{key}"
        try:
            vals, extra = mapper.map_row(row, f"{p}:{n}")
        except TableError as e:
            out[key] = ({"__error__": str(e)}, {})
            continue
        vals.pop(field, None)
        out[key] = (vals, extra)
    return out


def _participants(root: Path, mapper: Mapper) -> dict[str, tuple[dict, dict]]:
    """participants.tsv -> {sub-XX: (values, extra)}."""
    return _keyed_table(root / "participants.tsv", mapper, "subject", "sub-",
                        "no participant id column (participant_id, or map one to 'subject')")


def _sessions(subdir: Path, mapper: Mapper) -> dict[str, tuple[dict, dict]]:
    """sub-XX_sessions.tsv -> {ses-YY: (values, extra)}."""
    return _keyed_table(subdir / f"{subdir.name}_sessions.tsv", mapper, "session", "ses-", "no session_id column")


def _start(cohort: str, mapping: ColumnMapping | None) -> tuple[ColumnMapping, MappingReport, Mapper, _Builder]:
    """The mapping (its cohort defaulting to ``cohort``), report, column mapper and sample builder of an ingest."""
    mapping = mapping or ColumnMapping()
    if mapping.cohort is None:
        mapping = mapping.model_copy(update={"cohort": cohort})
    report = MappingReport()
    return mapping, report, Mapper(mapping, report), _Builder(mapping, report)


def ingest_bids(root: str | Path, mapping: ColumnMapping | None = None) -> IngestResult:
    """Discover a BIDS dataset's anatomical images and their metadata."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    mapping, report, mapper, b = _start(root.name, mapping)
    parts = _participants(root, mapper)
    seen_subjects = set()
    for subdir in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        sid = subdir.name
        seen_subjects.add(sid)
        try:
            sess = _sessions(subdir, mapper)
        except TableError as e:
            sess = {}
            for img in sorted(subdir.rglob("*.nii*")):
                b.reject(img, sid, "metadata", str(e))
            continue
        anat_dirs = sorted(subdir.glob("anat")) + sorted(subdir.glob("ses-*/anat"))
        for anat in anat_dirs:
            ses = anat.parent.name if anat.parent.name.startswith("ses-") else None
            for img in sorted(p for p in anat.iterdir() if NIFTI_RE.search(p.name)):
                ents = _entities(img.name)
                suffix = ents["suffix"]
                if suffix not in BIDS_SUFFIX:
                    b.reject(img, sid, "ingest", f"unsupported image suffix {suffix!r} (supported: "
                                                 f"{sorted(BIDS_SUFFIX)}, ce-*_T1w as T1c)")
                    continue
                modality = "T1c" if (suffix == "T1w" and "ce" in ents) else BIDS_SUFFIX[suffix]
                pv, pe = parts.get(sid, ({}, {}))
                sv, se = sess.get(ses, ({}, {})) if ses else ({}, {})
                err = pv.get("__error__") or sv.get("__error__")
                if err:
                    b.reject(img, sid, "metadata", err)
                    continue
                rec = {**pv, **sv, "subject": sid, "session": ses, "modality": modality,
                       "extra": {**pe, **se}}
                tag = "-".join(f"{k}-{ents[k]}" for k in ("acq", "run") if k in ents) or None
                b.add(img, rec, tag, source=f"{img}")
    missing = sorted(set(parts) - seen_subjects)
    report_d = report.as_dict()
    report_d.update({"source": str(root), "kind": "bids", "cohort": mapping.cohort,
                     "participants_without_images": missing,
                     "subjects_without_participants_row": sorted(s for s in seen_subjects if s not in parts)})
    b.res.report = report_d
    return b.res


def ingest_csv(csv_path: str | Path, mapping: ColumnMapping | None = None) -> IngestResult:
    """A manifest with one row per image: a path column plus metadata columns."""
    p = Path(csv_path)
    mapping, report, mapper, b = _start(p.stem, mapping)
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


def dicom_modality(description: str) -> str | None:
    d = description.lower()
    for mod, words in DICOM_KEYWORDS.items():
        if any(w in d for w in words):
            return mod
    return None


def _read_tag(reader: Any, key: str) -> str:
    """A tag's value as text, "" when absent.

    A value that is not valid text (SimpleITK raises while decoding it) is returned as a marker
    that the parsers refuse, so it becomes a warning naming the file instead of a crash.
    """
    try:
        return str(reader.GetMetaData(key)) if reader.HasMetaDataKey(key) else ""
    except (UnicodeDecodeError, RuntimeError, TypeError):
        return "<undecodable bytes>"


def ingest_dicom(root: str | Path, out_dir: str | Path, mapping: ColumnMapping | None = None,
                 table: str | Path | None = None) -> IngestResult:
    """DICOM series folders -> NIfTI (SimpleITK/GDCM series reader) + work list.
    GDCM changes the process locale; it is restored afterwards (see images.keep_locale)."""
    with keep_locale():
        return _ingest_dicom(root, out_dir, mapping, table)


def _ingest_dicom(root: str | Path, out_dir: str | Path, mapping: ColumnMapping | None = None,
                  table: str | Path | None = None) -> IngestResult:
    """The body of :func:`ingest_dicom`.

    Layout: ``ROOT/<subject>/[ses-*/]**/<series files>``. Only the voxel grid is converted: no
    identifying DICOM tag (names, dates, descriptions, IDs, institution) is copied into metadata;
    the series description is read only to tell the modality. Age and sex come from the table;
    where the table gives none, from the series' PatientAge/PatientSex (first file of the
    series). The table wins when both exist, because it is the curated source; the report's
    ``metadata_sources`` says which source each series used. A malformed tag value leaves the
    field unknown and adds a warning naming the file (the volume itself is fine to use).
    """
    import SimpleITK as sitk

    root, out_dir = Path(root), Path(out_dir)
    mapping, report, mapper, b = _start(root.name, mapping)
    meta_rows: dict[str, tuple[dict, dict]] = {}
    if table:
        report.tables.append(str(table))
        for n, row in enumerate(read_table(table), 2):
            vals, extra = mapper.map_row(row, f"{table}:{n}")
            if "subject" in vals:
                meta_rows[str(vals.pop("subject"))] = (vals, extra)
    conv = out_dir / "converted"
    warnings: list[dict[str, Any]] = []
    sources: dict[str, dict[str, str | None]] = {}
    other_sex = 0
    for subdir in sorted(p for p in root.iterdir() if p.is_dir()):
        subject = subdir.name
        used_files: set[Path] = set()
        for d in sorted([subdir] + [p for p in subdir.rglob("*") if p.is_dir()]):
            try:
                series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(d))
            except RuntimeError:
                series = ()
            for uid in series:
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(d), uid)
                used_files.update(Path(f) for f in files)
                rel = d.relative_to(subdir)
                ses = next((p for p in rel.parts if p.startswith("ses-")), None)
                try:
                    rd = sitk.ImageFileReader()
                    rd.SetFileName(files[0])
                    rd.ReadImageInformation()
                    desc = rd.GetMetaData("0008|103e") if rd.HasMetaDataKey("0008|103e") else ""
                    tag_age, tag_sex = _read_tag(rd, DICOM_AGE_TAG), _read_tag(rd, DICOM_SEX_TAG)
                    modality = dicom_modality(desc)
                    if modality is None:
                        b.reject(d, subject, "ingest", "series description names no supported modality",
                                 series=uid[-12:])
                        continue
                    reader = sitk.ImageSeriesReader()
                    reader.SetFileNames(files)
                    img = reader.Execute()
                except RuntimeError as e:
                    b.reject(d, subject, "convert", f"DICOM series unreadable: {str(e).strip().splitlines()[-1][:200]}")
                    continue
                if img.GetDimension() != 3 or min(img.GetSize()) < 2:
                    b.reject(d, subject, "convert", f"not a 3D volume (size {img.GetSize()})")
                    continue
                dest = conv / subject / f"{(ses + '_') if ses else ''}{modality}_{uid[-16:].replace('.', '')}.nii.gz"
                dest.parent.mkdir(parents=True, exist_ok=True)
                clean = sitk.Image(img)  # voxels and grid only: drop every DICOM tag
                for k in list(clean.GetMetaDataKeys()):
                    clean.EraseMetaData(k)
                tmp = dest.with_name(f".{uuid.uuid4().hex}.nii.gz")
                sitk.WriteImage(clean, str(tmp))
                os.replace(tmp, dest)
                vals, extra = meta_rows.get(subject, ({}, {}))
                vals = dict(vals)
                used: dict[str, str | None] = {}
                for fname, raw in (("age", tag_age), ("sex", tag_sex)):
                    if vals.get(fname) is not None:
                        used[fname] = "table"
                        continue
                    used[fname] = None
                    try:
                        if fname == "age":
                            value = parse_dicom_age(raw)
                        else:
                            value, is_other = parse_dicom_sex(raw)
                            other_sex += int(is_other)
                    except DicomTagError as e:
                        warnings.append({"path": str(files[0]), "subject": subject, "field": fname,
                                         "reason": f"{files[0]}: {e}; {fname} left unknown "
                                                   f"(give it in the --table to override)"})
                        continue
                    if value is not None:
                        vals[fname] = value
                        used[fname] = "dicom"
                n_before = len(b.res.items)
                rec = {**vals, "subject": subject, "session": ses, "modality": modality, "extra": dict(extra)}
                b.add(dest, rec, None, source=str(d))
                if len(b.res.items) > n_before:
                    sources[b.res.items[-1].key] = used
        for f in sorted(p for p in subdir.rglob("*") if p.is_file() and p not in used_files):
            b.reject(f, subject, "convert", "file is not part of a readable DICOM series")
    counts = {f: {src: sum(1 for u in sources.values() if u[f] == src) for src in ("table", "dicom", None)}
              for f in ("age", "sex")}
    b.res.report = {**report.as_dict(), "source": str(root), "kind": "dicom", "cohort": mapping.cohort,
                    "converter": f"SimpleITK {sitk.Version.VersionString()} ImageSeriesReader (GDCM)",
                    "dicom_tags_read": {"0008|103e": "SeriesDescription (modality only)",
                                        DICOM_AGE_TAG: "PatientAge", DICOM_SEX_TAG: "PatientSex"},
                    "metadata_sources": {
                        "per_sample": {k: sources[k] for k in sorted(sources)},
                        "counts": {f: {("none" if k is None else k): n for k, n in c.items()} for f, c in counts.items()},
                        "sex_other_left_unknown": other_sex},
                    "warnings": warnings}
    return b.res


# ---- command line --------------------------------------------------------------------------
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
