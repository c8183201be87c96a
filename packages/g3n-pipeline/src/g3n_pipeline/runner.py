"""A tiny stage runner: each stage is a list of commands whose outputs live in a run folder.

Why subprocesses: every stage is one of the packages' own command lines, so the demo exercises
exactly what a team runs by hand, each stage gets a fresh interpreter (peak memory and thread
settings are its own), and a crash names the stage and its log. A stage that finished wrote a
marker with its commands, the digests of its input files and its outputs' manifest digests; a
re-run skips it while all of them are unchanged. Changed settings (other commands, another
requests file) or a damaged output run it again, and every stage after it (its inputs changed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from g3n_shards import MANIFEST_NAME, ShardSet, atomic_write_bytes, file_sha256


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; the message names the stage, the command and its log."""


@dataclass
class Stage:
    name: str
    title: str
    #: paths (relative to the run folder) this stage produces; shard sets are checked by manifest
    outputs: Sequence[str]
    #: builds the commands (module + arguments) from the run folder
    commands: Callable[[Path], list[list[str]]]
    #: optional in-process step after the commands (e.g. a merge through the Python API)
    after: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: plain files (relative to the run folder) the commands read whose content is a setting
    #: (e.g. a requests file): a change re-runs the stage
    inputs: Sequence[str] = ()
    #: files or folders outside the run folder that the commands read (shipped weights): their
    #: content is part of the fingerprint, so new weights re-run the stage
    external: Sequence[Path] = ()


def _fingerprint(run_dir: Path, stage: Stage, commands: list[list[str]] | None = None) -> dict:
    """What the stage's result depends on beyond earlier stages: its commands (built here unless
    given) and input files."""
    files = {}
    for rel in stage.inputs:
        p = run_dir / rel
        files[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    root = str(run_dir)  # the run folder may move: paths inside it are kept relative
    rel = [[a.replace(root, "{run}", 1) if a.startswith(root) else a for a in argv]
           for argv in (stage.commands(run_dir) if commands is None else commands)]
    fp: dict = {"commands": rel, "inputs": files}
    if stage.external:
        fp["external"] = [_content_digest(Path(p)) for p in stage.external]
    return fp


def _content_digest(path: Path) -> str | None:
    """SHA-256 of a file, or of a folder's files (relative names and contents); None if absent."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if f != path else b"")
        h.update(bytes.fromhex(file_sha256(f)))
    return h.hexdigest()


def output_digest(path: Path) -> str | None:
    """A shard set's manifest digest, or None for a plain file/folder output."""
    if (path / MANIFEST_NAME).is_file():
        return ShardSet.open(path).digest
    return None


def _marker(run_dir: Path, stage: Stage) -> Path:
    return run_dir / ".stages" / f"{stage.name}.json"


def is_done(run_dir: Path, stage: Stage) -> bool:
    marker = _marker(run_dir, stage)
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text())
    try:
        if recorded.get("fingerprint") != _fingerprint(run_dir, stage):
            return False
    except Exception:  # noqa: BLE001 - commands that cannot be built (an input is gone): run the stage again
        return False
    for rel in stage.outputs:
        p = run_dir / rel
        if not p.exists():
            return False
        try:
            if output_digest(p) != recorded["outputs"].get(rel):
                return False
        except Exception:  # noqa: BLE001 - a damaged output means: run the stage again
            return False
    return True


def clear_outputs(run_dir: Path, stage: Stage) -> None:
    """Remove what the stage wrote: the top folder (or file) of each output, e.g. ``mae`` for ``mae/export``.
    A stage killed half way has no marker and keeps its outputs, so that its commands resume."""
    for top in dict.fromkeys(Path(rel).parts[0] for rel in stage.outputs):
        p = run_dir / top
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def run_stage(run_dir: Path, stage: Stage, index: int, total: int, force: bool = False) -> float:
    """Run one stage unless it is already done; returns its wall time in seconds (0 if skipped)."""
    head = f"[{index}/{total}] {stage.title}"
    if not force and is_done(run_dir, stage):
        print(f"{head}: done already, skipped", flush=True)
        return 0.0
    marker = _marker(run_dir, stage)
    if force or marker.is_file():  # a finished stage run again starts over: its commands would resume
        clear_outputs(run_dir, stage)  # from their old checkpoints and keep what no longer holds
        marker.unlink(missing_ok=True)
    print(f"{head} ...", flush=True)
    t = time.perf_counter()
    commands = stage.commands(run_dir)
    fingerprint = _fingerprint(run_dir, stage, commands)  # what runs now is what the marker records
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **stage.env}
    for argv in commands:
        cmd = [sys.executable, "-m", *argv]
        log = log_dir / f"{stage.name}.log"
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd)}\n")
        started = time.perf_counter()
        # stdout to the log; stderr (progress bars, warnings, errors) to the terminal and the log,
        # forwarded in raw chunks so that progress bars redraw in place
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.PIPE, env=env, cwd=run_dir)
            assert proc.stderr is not None
            tail = b""
            while chunk := os.read(proc.stderr.fileno(), 65536):
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                f.write(chunk)
                tail = (tail + chunk)[-4000:]
            rc = proc.wait()
            # each command's wall time, so a slow stage's log says which of its commands was slow
            f.write(f"\n[exit {rc} after {time.perf_counter() - started:.1f} s]\n".encode())
        tail_lines = [ln for ln in tail.decode("utf-8", "replace").replace("\r", "\n").splitlines() if ln.strip()][-12:]
        if rc != 0:
            raise StageFailed(f"stage '{stage.name}' failed (exit {rc}): {' '.join(argv)}\n"
                              f"  log: {log}\n  " + "\n  ".join(tail_lines))
    if stage.after is not None:
        stage.after(run_dir)
    outputs = {}
    for rel in stage.outputs:
        p = run_dir / rel
        if not p.exists():
            raise StageFailed(f"stage '{stage.name}' finished but did not produce {p}")
        outputs[rel] = output_digest(p)
    marker.parent.mkdir(parents=True, exist_ok=True)
    elapsed = time.perf_counter() - t
    atomic_write_bytes(marker, json.dumps({"outputs": outputs, "fingerprint": fingerprint,
                                           "seconds": round(elapsed, 1)}, indent=2).encode())
    print(f"{head}: done in {elapsed:.0f} s", flush=True)
    return elapsed


def run_stages(run_dir: Path, stages: Sequence[Stage], force: bool = False, until: str | None = None) -> list[str]:
    """Run the stages in order (up to and including ``until``); returns the names of those that ran.
    A stage that ran has new outputs, and every later stage reads them: they run too."""
    ran: list[str] = []
    for i, stage in enumerate(stages, 1):
        if run_stage(run_dir, stage, i, len(stages), force=force or bool(ran)) > 0:
            ran.append(stage.name)
        if stage.name == until:
            break
    return ran


def config_data(path: Path | None, run_dir: Path | None) -> dict:
    """The fields of a YAML/JSON run config file (none: {}), with ``--run-dir`` over its run_dir."""
    data: dict = {}
    if path:
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"{path}: a config file must be a mapping of fields, got {type(data).__name__}")
    if run_dir is not None:
        data["run_dir"] = run_dir
    return data
