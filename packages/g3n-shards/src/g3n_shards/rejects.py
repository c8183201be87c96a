"""rejects.jsonl: one line per refused input (path, subject, step, reason), so nothing is lost silently."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .manifest import REJECTS_NAME


class RejectLog:
    """Append-only log of refused inputs; each line is flushed so a killed batch keeps what it logged."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        self.path = p / REJECTS_NAME if p.is_dir() else p
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, path: str | None, subject: str | None, step: str, reason: str, **details: Any) -> None:
        record = {"path": path, "subject": subject, "step": step, "reason": reason, **details}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def counts(self) -> Counter:
        """Refusals per step, for a batch's closing summary."""
        return Counter(r["step"] for r in self.records())
