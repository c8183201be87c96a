"""What a resumed run may change: the requested config is compared with the checkpoint's.

A resume continues a run, so the settings that define the run (model, data recipe, seed, batch
size, learning rate, ...) must be the checkpoint's; only those that say how far to go or how the
run is executed and logged may change (each stage lists them). :func:`resolve_resume_config`

* applies an allowed change, with a log line per field;
* refuses any other difference with a :class:`ResumeConfigError` naming each field with the
  checkpoint's and the requested value;
* or, when the caller passes ``accept_checkpoint=True`` (the CLIs' ``--accept-checkpoint-config``),
  keeps the checkpoint's values for those fields and logs each one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any


class ResumeConfigError(ValueError):
    """A resume was asked with settings that differ from the checkpoint's in fields that cannot change."""


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Nested JSON dicts -> {"a.b.c": leaf}; lists and scalars are leaves."""
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: cfg}


def _set(cfg: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        cfg = cfg.setdefault(p, {})
    cfg[leaf] = value


def _allowed(path: str, mutable: Iterable[str]) -> bool:
    return any(path == m or path.startswith(m + ".") for m in mutable)


def resolve_resume_config(
    requested: dict[str, Any],
    saved: dict[str, Any],
    mutable: Iterable[str],
    accept_checkpoint: bool = False,
    log: Callable[[str], None] = print,
    where: str = "the checkpoint",
    ignore: Iterable[str] = (),
    acceptable: bool = True,
) -> dict[str, Any]:
    """The config a resume runs with (JSON dicts in, JSON dict out; see the module doc).

    ``mutable``: dotted field paths (or prefixes) a resume may change. ``ignore``: paths not
    compared at all (e.g. a preset's name, when its values are compared field by field). The result
    is the checkpoint's config with the allowed requested changes applied. ``acceptable=False``:
    differences cannot be resolved by keeping the checkpoint's values (the caller has already built
    something from the requested ones), so they are always refused.
    """
    mutable, ignore = list(mutable), list(ignore)
    saved, requested = json.loads(json.dumps(saved)), json.loads(json.dumps(requested))  # tuples -> lists
    old, new = flatten(saved), flatten(requested)
    differing = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and not _allowed(k, ignore)]
    applied = [k for k in differing if _allowed(k, mutable)]
    refused = [k for k in differing if not _allowed(k, mutable)]
    if refused and not (accept_checkpoint and acceptable):
        fields = "; ".join(f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} requested" for k in refused)
        accept_hint = ", or pass --accept-checkpoint-config to continue with the checkpoint's values" if acceptable else ""
        raise ResumeConfigError(
            f"resume from {where}: the requested config differs in fields a resume cannot change: {fields}. "
            f"Resume with the run's own settings or start a new run (another run folder, or without resume){accept_hint}"
        )
    out = _deepcopy(saved)
    for k in refused:
        log(f"resume: keeping the checkpoint's {k} = {old.get(k)!r} (requested {new.get(k)!r}; "
            "--accept-checkpoint-config)")
    for k in applied:
        log(f"resume: {k} changes from {old.get(k)!r} to {new.get(k)!r}")
        _set(out, k, new.get(k))
    return out


def _deepcopy(cfg: Any) -> Any:
    if isinstance(cfg, dict):
        return {k: _deepcopy(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [_deepcopy(v) for v in cfg]
    return cfg
