"""BIDS folders: ``sub-*/[ses-*/]anat/*_T1w|_T2w|_FLAIR.nii[.gz]``, ``*ce-*_T1w`` = T1c; metadata
from ``participants.tsv`` and per-subject ``sub-*_sessions.tsv`` (per-session values, e.g. age)."""

from __future__ import annotations

from pathlib import Path

from ..columns import ColumnMapping, Mapper, TableError, read_table
from .common import NIFTI_RE, IngestResult, start

BIDS_SUFFIX = {"T1w": "T1", "T2w": "T2", "FLAIR": "FLAIR"}


def _entities(name: str) -> dict[str, str]:
    stem = NIFTI_RE.sub("", name)
    ents = {}
    for part in stem.split("_")[:-1]:
        if "-" in part:
            k, v = part.split("-", 1)
            ents[k] = v
    ents["suffix"] = stem.split("_")[-1]
    return ents



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



def ingest_bids(root: str | Path, mapping: ColumnMapping | None = None) -> IngestResult:
    """Discover a BIDS dataset's anatomical images and their metadata."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    mapping, report, mapper, b = start(root.name, mapping)
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

