"""DICOM: ``ROOT/<subject>/[ses-*/]...`` series folders, converted to NIfTI with SimpleITK's series
reader (GDCM); modality from the series description keywords; metadata from an optional table,
and age and sex from the series' PatientAge/PatientSex tags where the table gives none."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from g3n_shards import atomic_path

from ..columns import ColumnMapping, read_table
from ..images import keep_locale
from .common import IngestResult, start

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

    root = Path(root)
    run = _DicomRun(root, Path(out_dir), mapping, table)
    for subdir in sorted(p for p in root.iterdir() if p.is_dir()):
        used_files: set[Path] = set()
        for d in sorted([subdir] + [p for p in subdir.rglob("*") if p.is_dir()]):
            try:
                series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(d))
            except RuntimeError:
                series = ()
            for uid in series:
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(d), uid)
                used_files.update(Path(f) for f in files)
                run.series(subdir, d, uid, files)
        for f in sorted(p for p in subdir.rglob("*") if p.is_file() and p not in used_files):
            run.b.reject(f, subdir.name, "convert", "file is not part of a readable DICOM series")
    return run.result()


class _DicomRun:
    """One DICOM ingest: the metadata table, the converted files, and what each series used."""

    def __init__(self, root: Path, out_dir: Path, mapping: ColumnMapping | None, table: str | Path | None) -> None:
        self.root = root
        self.mapping, self.report, mapper, self.b = start(root.name, mapping)
        self.meta_rows: dict[str, tuple[dict, dict]] = {}
        if table:
            self.report.tables.append(str(table))
            for n, row in enumerate(read_table(table), 2):
                vals, extra = mapper.map_row(row, f"{table}:{n}")
                if "subject" in vals:
                    self.meta_rows[str(vals.pop("subject"))] = (vals, extra)
        self.conv = out_dir / "converted"
        self.warnings: list[dict[str, Any]] = []
        self.sources: dict[str, dict[str, str | None]] = {}
        self.other_sex = 0

    def series(self, subdir: Path, d: Path, uid: str, files: Any) -> None:
        """Convert one series to NIfTI (grid and voxels only) and add it with its metadata, or reject it."""
        import SimpleITK as sitk

        subject, b = subdir.name, self.b
        ses = next((p for p in d.relative_to(subdir).parts if p.startswith("ses-")), None)
        try:
            rd = sitk.ImageFileReader()
            rd.SetFileName(files[0])
            rd.ReadImageInformation()
            desc = rd.GetMetaData("0008|103e") if rd.HasMetaDataKey("0008|103e") else ""
            tag_age, tag_sex = _read_tag(rd, DICOM_AGE_TAG), _read_tag(rd, DICOM_SEX_TAG)
            modality = dicom_modality(desc)
            if modality is None:
                b.reject(d, subject, "ingest", "series description names no supported modality", series=uid[-12:])
                return
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            img = reader.Execute()
        except RuntimeError as e:
            b.reject(d, subject, "convert", f"DICOM series unreadable: {str(e).strip().splitlines()[-1][:200]}")
            return
        if img.GetDimension() != 3 or min(img.GetSize()) < 2:
            b.reject(d, subject, "convert", f"not a 3D volume (size {img.GetSize()})")
            return
        dest = self.conv / subject / f"{(ses + '_') if ses else ''}{modality}_{uid[-16:].replace('.', '')}.nii.gz"
        clean = sitk.Image(img)  # voxels and grid only: drop every DICOM tag
        for k in list(clean.GetMetaDataKeys()):
            clean.EraseMetaData(k)
        with atomic_path(dest, keep_suffix=True) as tmp:  # SimpleITK picks the format by the name
            sitk.WriteImage(clean, str(tmp))
        vals, extra = self.meta_rows.get(subject, ({}, {}))
        vals = dict(vals)
        used = self._tag_values(subject, str(files[0]), vals, tag_age, tag_sex)
        n_before = len(b.res.items)
        rec = {**vals, "subject": subject, "session": ses, "modality": modality, "extra": dict(extra)}
        b.add(dest, rec, None, source=str(d))
        if len(b.res.items) > n_before:
            self.sources[b.res.items[-1].key] = used

    def _tag_values(self, subject: str, first: str, vals: dict[str, Any], tag_age: str, tag_sex: str) -> dict[str, str | None]:
        """Fill age and sex from the tags where the table gives none; which source each field used."""
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
                    self.other_sex += int(is_other)
            except DicomTagError as e:
                self.warnings.append({"path": first, "subject": subject, "field": fname,
                                      "reason": f"{first}: {e}; {fname} left unknown (give it in the --table to override)"})
                continue
            if value is not None:
                vals[fname] = value
                used[fname] = "dicom"
        return used

    def result(self) -> IngestResult:
        import SimpleITK as sitk

        sources = self.sources
        counts = {f: {src: sum(1 for u in sources.values() if u[f] == src) for src in ("table", "dicom", None)}
                  for f in ("age", "sex")}
        self.b.res.report = {
            **self.report.as_dict(), "source": str(self.root), "kind": "dicom", "cohort": self.mapping.cohort,
            "converter": f"SimpleITK {sitk.Version.VersionString()} ImageSeriesReader (GDCM)",
            "dicom_tags_read": {"0008|103e": "SeriesDescription (modality only)",
                                DICOM_AGE_TAG: "PatientAge", DICOM_SEX_TAG: "PatientSex"},
            "metadata_sources": {
                "per_sample": {k: sources[k] for k in sorted(sources)},
                "counts": {f: {("none" if k is None else k): n for k, n in c.items()} for f, c in counts.items()},
                "sex_other_left_unknown": self.other_sex},
            "warnings": self.warnings,
        }  # fmt: skip
        return self.b.res
