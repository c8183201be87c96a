"""Samples ``apply`` could not score, and why: one line each in ``rejects.jsonl``.

A site scoring its own cache must never lose a sample silently nor see one bad row abort the
whole run. Every refusal becomes a :class:`Reject`; the file uses the record layout of
``g3n_shards.RejectLog`` (``path``, ``subject``, ``step``, ``reason`` + details, here ``key``
and ``probe``), so ``g3n_shards.RejectLog(folder).records()`` and every other tool that reads
rejects files read it too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import g3n_shards as gs

from .atomic import write_text

#: steps of a refusal: the feature row itself, its metadata, or the probe's slice
STEP_FEATURES = "features"
STEP_METADATA = "metadata"
STEP_SLICE = "slice"


@dataclass(frozen=True)
class Reject:
    """One refused sample. ``probe`` is None when no probe can score it (a bad row), else the
    probe whose slice it cannot enter (e.g. a T1 probe and a sample of unknown modality)."""

    key: str | None
    path: str | None
    step: str
    reason: str
    subject: str | None = None
    probe: str | None = None

    def record(self) -> dict[str, Any]:
        """The rejects.jsonl object, in RejectLog's layout."""
        return {"path": self.path, "subject": self.subject, "step": self.step, "reason": self.reason,
                "key": self.key, "probe": self.probe}


def write_rejects(out_dir: str | Path, rejects: Iterable[Reject]) -> Path:
    """Write ``rejects.jsonl`` (possibly empty) in one atomic replace.

    Not ``RejectLog.add``: its per-line append + fsync suits long batches that may be killed
    midway; ``apply`` writes all its outputs at the end, and an atomic replace means a stale
    file of an earlier run into the same folder never survives and a crash never leaves half
    a file beside a complete summary. An empty file says "nothing was refused".
    """
    path = Path(out_dir) / gs.REJECTS_NAME
    lines = [json.dumps(r.record(), sort_keys=True, default=str) + "\n" for r in rejects]
    return write_text(path, "".join(lines))
