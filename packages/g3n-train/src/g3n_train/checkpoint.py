"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A run's checkpoints are step folders under one root, each written whole or not at all::

    <run>/checkpoints/<prefix>00000200/
        <name>.safetensors ...   the stage's tensor files (weights, optimizer state, EMA, ...)
        state.json               format, version, step, SHA-256 of each tensor file, the stage's state
    <run>/checkpoints/latest.json  {"step": 200, "dir": "<prefix>00000200"}

* A step folder is assembled under a temporary name and renamed into place, then ``latest.json``
  is replaced: a crash at any moment leaves the previous checkpoint intact and discoverable.
  Only the newest ``keep_last`` complete folders are kept.
* Every file goes through ``g3n_shards.atomic_write_bytes`` (temp file, fsync, rename), so files
  get the mode the user's umask gives, like the shard sets beside them.
* Optimizer state uses one key format, full tensors by parameter name (``g3n_train.optim_state``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from g3n_shards import atomic_write_bytes, atomic_write_text, file_sha256
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

STATE_NAME = "state.json"
LATEST_NAME = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match; the message names the path."""


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Atomically write a safetensors file (arguments as ``safetensors.torch.save_file``); returns its SHA-256 (hex)."""
    data = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
    return file_sha256(path)


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (on the CPU) and metadata of a safetensors file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class CheckpointStore:
    """The step folders of one run: ``root`` is ``<run>/checkpoints``; ``prefix`` names the folders
    (g3n-mae ``step_``, g3n-dit ``step-``: each stage keeps the names its existing runs have)."""

    root: Path
    prefix: str = "step_"

    def dir_for(self, step: int) -> Path:
        return Path(self.root) / f"{self.prefix}{step:08d}"

    def step_of(self, path: Path) -> int | None:
        m = re.fullmatch(re.escape(self.prefix) + r"(\d{8})", Path(path).name)
        return int(m.group(1)) if m else None

    def list(self) -> list[Path]:
        """Complete checkpoints (``state.json`` present), oldest first."""
        root = Path(self.root)
        if not root.is_dir():
            return []
        found = [p for p in root.iterdir() if p.is_dir() and self.step_of(p) is not None and (p / STATE_NAME).is_file()]
        return sorted(found, key=lambda p: self.step_of(p) or 0)

    def latest(self) -> Path | None:
        """The newest complete checkpoint: ``latest.json`` if valid, else the highest step."""
        ptr = Path(self.root) / LATEST_NAME
        if ptr.is_file():
            try:
                cand = Path(self.root) / json.loads(ptr.read_text())["dir"]
                if (cand / STATE_NAME).is_file():
                    return cand
            except (ValueError, KeyError, OSError, TypeError):
                pass
        found = self.list()
        return found[-1] if found else None

    def save(self, step: int, files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str] | None]],
             state: dict[str, Any], keep_last: int, fmt: str, version: int) -> Path:
        """Write one checkpoint atomically, point ``latest.json`` at it, prune old ones.

        ``files``: file name -> (tensors, safetensors metadata). ``state`` (JSON-able) goes into
        ``state.json`` with ``format``, ``format_version``, ``step``, ``saved_at`` and ``files``
        (the SHA-256 of each tensor file, checked on load).
        """
        root = Path(self.root)
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # left by a killed save (one writer per run)
            shutil.rmtree(stale, ignore_errors=True)
        final = self.dir_for(step)
        tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            digests = {name: save_tensors(tensors, tmp / name, meta) for name, (tensors, meta) in files.items()}
            doc = {"format": fmt, "format_version": version, "step": step, "files": digests,
                   "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **state}
            atomic_write_text(tmp / STATE_NAME, json.dumps(doc, indent=1, sort_keys=True))
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
                old = root / f".old-{final.name}-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(root / LATEST_NAME, json.dumps({"step": step, "dir": final.name}))
        for old in self.list()[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """A step folder's ``state.json``."""
    path = Path(ckpt_dir) / STATE_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint state: {e}") from e


def read_files(ckpt_dir: str | Path, digests: dict[str, str], names: list[str] | None = None,
               verify: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """The tensor files ``names`` (default: every file in ``digests``) of a step folder, each
    checked against its recorded SHA-256 first."""
    out = {}
    for name in names if names is not None else list(digests):
        path = Path(ckpt_dir) / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if verify and file_sha256(path) != digests.get(name):
            raise CheckpointError(f"{path}: SHA-256 does not match state.json (modified or corrupted checkpoint)")
        out[name] = read_tensors(path)[0]
    return out
