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

One module per source (``bids``, ``csv_manifest``, ``dicom``), what they share in ``common``, the
command in ``command``; everything public is importable from ``g3n_data.ingest`` as before.
"""

from __future__ import annotations

from .bids import BIDS_SUFFIX, ingest_bids
from .command import add_command, run_ingest
from .common import NIFTI_RE, IngestResult
from .csv_manifest import ingest_csv
from .dicom import (
    DICOM_AGE_TAG,
    DICOM_KEYWORDS,
    DICOM_SEX_TAG,
    DicomTagError,
    dicom_modality,
    ingest_dicom,
    parse_dicom_age,
    parse_dicom_sex,
)

__all__ = [
    "BIDS_SUFFIX", "DICOM_AGE_TAG", "DICOM_KEYWORDS", "DICOM_SEX_TAG", "DicomTagError", "IngestResult", "NIFTI_RE",
    "add_command", "dicom_modality", "ingest_bids", "ingest_csv", "ingest_dicom", "parse_dicom_age", "parse_dicom_sex",
    "run_ingest",
]  # fmt: skip
