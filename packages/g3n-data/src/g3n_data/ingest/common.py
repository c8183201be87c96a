"""What every ingest source shares: the result, the sample builder (metadata validation, unique
keys, the source file's SHA-256) and the start of an ingest (mapping, report, column mapper)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from g3n_shards import MetadataError, SampleMeta, sample_key

from ..columns import ColumnMapping, Mapper, MappingReport
from ..images import sha256_file
from ..worklist import WorkItem, reject_line

NIFTI_RE = re.compile(r"\.nii(\.gz)?$")


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



class Builder:
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



def start(cohort: str, mapping: ColumnMapping | None) -> tuple[ColumnMapping, MappingReport, Mapper, Builder]:
    """The mapping (its cohort defaulting to ``cohort``), report, column mapper and sample builder of an ingest."""
    mapping = mapping or ColumnMapping()
    if mapping.cohort is None:
        mapping = mapping.model_copy(update={"cohort": cohort})
    report = MappingReport()
    return mapping, report, Mapper(mapping, report), Builder(mapping, report)
