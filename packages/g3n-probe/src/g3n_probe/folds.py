"""Which volumes a task scores and in which fold: labelled volumes, too-small classes dropped,
session units labelled, subject-grouped stratified folds assigned once per task."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from .config import ProtocolConfig, TaskSpec
from .splits import assign_folds, regression_strata
from .targets import Labels

log = logging.getLogger("g3n_probe")


def _class_subject_counts(y: np.ndarray, subjects: np.ndarray) -> Counter:
    return Counter(c for c, _ in set(zip(y.tolist(), subjects.tolist())))


def drop_small_classes(
    y: np.ndarray, subjects: np.ndarray, keep: np.ndarray, cfg: ProtocolConfig, max_classes: int | None, where: str
) -> tuple[np.ndarray, list[str]]:
    """Mask out classes with fewer than ``min_class_subjects`` subjects (and beyond ``max_classes``)."""
    notes: list[str] = []
    counts = _class_subject_counts(y[keep], subjects[keep])
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    drop: set[str] = set()
    if max_classes is not None and len(ranked) > max_classes:
        extra = [c for c, _ in ranked[max_classes:]]
        drop.update(extra)
        notes.append(f"{where}: kept the {max_classes} classes with most subjects; {len(extra)} others left out")
    small = {c: n for c, n in ranked if n < cfg.min_class_subjects and c not in drop}
    if small:
        drop.update(small)
        shown = ", ".join(f"{c} ({n})" for c, n in sorted(small.items()))
        notes.append(f"{where}: class(es) with < {cfg.min_class_subjects} subjects dropped: {shown}")
    if drop:
        keep = keep & ~np.isin(y.astype(str), np.asarray(sorted(map(str, drop)), dtype=str)) if len(y) else keep
    for n in notes:
        log.info(n)
    return keep, notes


def unit_labels(members: list[np.ndarray], y: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Label of each unit from its member volumes; units whose members disagree are unusable."""
    out = np.empty(len(members), dtype=object if kind == "classification" else np.float64)
    ok = np.ones(len(members), dtype=bool)
    for u, m in enumerate(members):
        vals = {str(v) if kind == "classification" else float(v) for v in y[m]}
        if len(vals) == 1:
            out[u] = vals.pop()
        else:
            ok[u] = False
            if kind != "classification":
                out[u] = np.nan
    return out, ok


def task_folds(
    task: TaskSpec, labels: Labels, subjects: np.ndarray, cfg: ProtocolConfig
) -> tuple[np.ndarray | None, np.ndarray, list[str], str | None]:
    """Subject folds for one task over its labelled volumes.

    Returns (folds per volume or None, final mask, notes, skip reason or None).
    """
    keep = labels.mask.copy()
    notes = list(labels.notes)
    if task.kind == "classification":
        keep, n = drop_small_classes(labels.y, subjects, keep, cfg, task.max_classes, "all labelled volumes")
        notes += n
        n_classes = len(set(labels.y[keep].tolist()))
        if n_classes < 2:
            return None, keep, notes, f"{n_classes} class(es) with >= {cfg.min_class_subjects} subjects; need 2"
    n_subj = len(set(subjects[keep].tolist()))
    if n_subj < max(cfg.min_task_subjects, cfg.n_splits):
        return None, keep, notes, f"{n_subj} labelled subject(s) < {max(cfg.min_task_subjects, cfg.n_splits)}"
    idx = np.flatnonzero(keep)
    if task.kind == "classification":
        strata = labels.y[idx].astype(str)
    else:
        strata = regression_strata(labels.y[idx], cfg.regression_strata)
    folds = np.full(len(keep), -1, dtype=np.int64)
    folds[idx] = assign_folds(subjects[idx], strata, cfg.n_splits, cfg.seed)
    return folds, keep, notes, None
