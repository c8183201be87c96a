"""Turn sample metadata into task labels: field lookup, qualification rules, class mapping.

Works on plain mappings (``SampleMeta.model_dump()`` or any dict), so the panel runs on any
feature source whose metadata uses the g3n-shards field names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import QualifyRule, TaskSpec

_MISSING = object()


def canon(value: Any) -> str:
    """Canonical text of a raw label value, so YAML keys, JSON round-trips and metadata agree.

    ``3``, ``3.0`` and ``"3.0"`` all become ``"3.0"``; ``True`` and ``"true"`` become ``"true"``.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return repr(float(value))
    s = str(value).strip()
    if s.lower() in ("true", "false"):
        return s.lower()
    try:
        return repr(float(s))
    except ValueError:
        return s


def _derived(record: Mapping[str, Any], name: str) -> Any:
    """Fields computable from others when the producer did not fill them."""
    if name == "apoe_e4_carrier":
        g = record.get("apoe_genotype")
        if isinstance(g, str) and "/" in g:
            return "e4" in g.split("/")
    return None


def get_field(record: Mapping[str, Any], path: str) -> Any:
    """Value of a (dotted) metadata field; None when absent or unknown."""
    cur: Any = record
    for part in path.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        else:
            cur = _MISSING
            break
    if cur is _MISSING or cur is None:
        cur = _derived(record, path) if "." not in path else None
    if isinstance(cur, float) and math.isnan(cur):
        return None
    return cur


def _rule_ok(rule: QualifyRule, value: Any) -> bool:
    if value is None:
        return rule.in_ is None and rule.min is None and rule.max is None
    c = canon(value)
    if rule.in_ is not None and c not in {canon(v) for v in rule.in_}:
        return False
    if rule.not_in is not None and c in {canon(v) for v in rule.not_in}:
        return False
    if rule.min is not None or rule.max is not None:
        try:
            x = float(value)
        except (TypeError, ValueError):
            return False
        if rule.min is not None and x < rule.min:
            return False
        if rule.max is not None and x > rule.max:
            return False
    return True


def qualifies(task: TaskSpec, record: Mapping[str, Any]) -> bool:
    """True when the sample meets every qualification rule of the task."""
    return all(_rule_ok(r, get_field(record, r.field)) for r in task.qualify)


@dataclass
class Labels:
    """Per-sample labels of one task (aligned with the input records).

    ``y`` holds class-label strings (object array) or floats; ``mask`` marks samples that
    qualify and carry a usable label. ``notes`` explain what was dropped and why.
    """

    y: np.ndarray
    mask: np.ndarray
    notes: list[str] = field(default_factory=list)


def extract_labels(task: TaskSpec, records: Sequence[Mapping[str, Any]]) -> Labels:
    """Labels of ``task`` for every record; unlabelled or non-qualifying samples are masked out."""
    n = len(records)
    mask = np.zeros(n, dtype=bool)
    notes: list[str] = []
    if task.kind == "regression":
        y = np.full(n, np.nan, dtype=np.float64)
        bad = 0
        for i, r in enumerate(records):
            if not qualifies(task, r):
                continue
            v = get_field(r, task.target)
            if v is None or isinstance(v, bool):
                continue
            try:
                x = float(v)
            except (TypeError, ValueError):
                bad += 1
                continue
            if math.isfinite(x):
                y[i], mask[i] = x, True
        if bad:
            notes.append(f"{bad} non-numeric value(s) of {task.target!r} ignored")
        return Labels(y, mask, notes)

    y = np.empty(n, dtype=object)
    mapping = {canon(k): v for k, v in task.classes.items()} if task.classes is not None else None
    unmapped: dict[str, int] = {}
    for i, r in enumerate(records):
        if not qualifies(task, r):
            continue
        v = get_field(r, task.target)
        if v is None:
            continue
        if mapping is not None:
            c = canon(v)
            if c not in mapping:
                unmapped[str(v)] = unmapped.get(str(v), 0) + 1
                continue
            y[i] = str(mapping[c])
        else:
            y[i] = str(v)
        mask[i] = True
    if unmapped:
        shown = ", ".join(f"{k} ({n})" for k, n in sorted(unmapped.items())[:8])
        notes.append(f"values outside the class mapping left out: {shown}")
    return Labels(y, mask, notes)


def subject_id(record: Mapping[str, Any]) -> str:
    """The grouping unit for CV: cohort + subject (subject ids repeat across cohorts)."""
    subj = record.get("subject")
    if subj is None:
        raise ValueError(f"sample {record.get('key', '?')!r} has no subject; grouped CV needs one")
    cohort = record.get("cohort")
    return f"{cohort}/{subj}" if cohort else str(subj)


def session_id(record: Mapping[str, Any]) -> str:
    """The pooling unit for the patient-pooled slice: one subject's session."""
    return f"{subject_id(record)}/{record.get('session') or ''}"
