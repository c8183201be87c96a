"""The work list: what ``ingest`` found and ``preprocess`` consumes, one JSON line per input image.

Ingest and preprocessing are separate steps so that discovery (cheap, needs the metadata tables)
and processing (expensive, parallel, resumable) can run in different places and times. Each item
already carries its validated metadata and its final sample key, so a run can account for every
input: it ends as a sample with that key or as a line in ``rejects.jsonl``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from g3n_shards import SampleMeta, atomic_write_text  # noqa: F401 - the one atomic writer, re-exported
from pydantic import BaseModel, ConfigDict

WORKLIST_NAME = "worklist.jsonl"
REJECTS_NAME = "rejects.jsonl"
REPORT_NAME = "ingest_report.json"


class WorkItem(BaseModel):
    """One input image with its subject grouping, final key and validated metadata."""

    model_config = ConfigDict(extra="forbid")
    path: str
    key: str
    meta: dict[str, Any]  # SampleMeta.model_dump(mode="json"), validated at ingest

    @property
    def sample_meta(self) -> SampleMeta:
        return SampleMeta.model_validate(self.meta)

    @property
    def subject(self) -> str:
        return self.meta["subject"]

    @property
    def session(self) -> str | None:
        return self.meta.get("session")

    @property
    def modality(self) -> str:
        return self.meta["modality"]

    @property
    def group(self) -> tuple[str, str]:
        """Processing unit: a subject within its cohort (subject IDs repeat across cohorts)."""
        return (self.meta.get("cohort") or "", self.meta["subject"])


def reject_line(path: str | None, subject: str | None, step: str, reason: str, **details: Any) -> dict[str, Any]:
    """One rejects.jsonl record (same fields as g3n_shards.RejectLog)."""
    return {"path": path, "subject": subject, "step": step, "reason": reason, **details}


def dumps_jsonl(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records)


def sort_rejects(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Deterministic order (so a resumed run writes the same file as an uninterrupted one)."""
    return sorted(records, key=lambda r: (str(r.get("path")), str(r.get("step")), str(r.get("reason")),
                                          json.dumps(r, sort_keys=True, default=str)))


def write_worklist(out_dir: str | os.PathLike[str], items: list[WorkItem], rejects: list[dict[str, Any]],
                   report: dict[str, Any]) -> Path:
    """Write worklist.jsonl, rejects.jsonl and ingest_report.json into ``out_dir``; returns the work list path."""
    out = Path(out_dir)
    items = sorted(items, key=lambda i: i.key)
    atomic_write_text(out / REJECTS_NAME, dumps_jsonl(sort_rejects(rejects)))
    atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    atomic_write_text(out / WORKLIST_NAME, dumps_jsonl(i.model_dump(mode="json") for i in items))
    return out / WORKLIST_NAME


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not valid JSON: {e}") from None
    return out


def read_worklist(path: str | os.PathLike[str]) -> tuple[list[WorkItem], list[dict[str, Any]]]:
    """Items of a work list (file or the folder holding it) and the ingest rejects beside it."""
    p = Path(path)
    if p.is_dir():
        p = p / WORKLIST_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no work list (run `g3n-data ingest` first)")
    items = []
    for n, rec in enumerate(read_jsonl(p), 1):
        try:
            items.append(WorkItem.model_validate(rec))
        except Exception as e:
            raise ValueError(f"{p}:{n}: invalid work item: {e}") from None
    keys = [i.key for i in items]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"{p}: duplicate keys {dup[:5]}")
    return items, read_jsonl(p.parent / REJECTS_NAME)
