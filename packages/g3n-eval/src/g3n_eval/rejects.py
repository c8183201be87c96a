"""``rejects.jsonl``: one line per input a batch stage could not use, with the reason; the stage goes on."""

from __future__ import annotations

import json
from pathlib import Path

from .records import atomic_write_text


class Rejects:
    def __init__(self, out_dir: str | Path, name: str = "rejects.jsonl") -> None:
        self.path = Path(out_dir) / name
        self.lines: list[str] = []

    def add(self, key: str, reason: str) -> None:
        self.lines.append(json.dumps({"key": key, "reason": reason}, sort_keys=True))
        atomic_write_text(self.path, "\n".join(self.lines) + "\n")

    @property
    def count(self) -> int:
        return len(self.lines)
