"""Run the probe panel: labels -> subject-grouped folds -> per-slice fits -> fold metrics.

Protocol (docs/method.md §4): for each task, folds are assigned once per subject over all of the
task's labelled volumes (5-fold, stratified, grouped, seed 2025); every slice reuses that
assignment, so slices and feature sets see identical splits. Inside each fold the scaler and
the probe are fitted on training units only. Too-small classes are dropped and too-small
tasks or slices are skipped, each with a recorded reason; nothing here raises for lack of labels.

With ``permutations`` > 0 the slices that ``permute`` selects are cross-validated again on
shuffled labels (same folds; see permutation.py) for a p-value beside each score.

Modules, by seam: :mod:`.folds` (which units a task scores, in which fold), :mod:`.crossval`
(fitting and scoring fold by fold, shuffled-label cross-validations), :mod:`.results` (what a run
produces); this module runs one slice and the whole panel.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from .config import Panel, ProtocolConfig, TaskSpec
from .crossval import fit_folds, null_metrics, permuted_slices, scorable_folds, score_fold
from .featureset import FeatureSet
from .folds import drop_small_classes, task_folds, unit_labels
from .linear import FitReport, LinearProbe
from .metrics import classification_metric, regression_metric
from .results import PanelResult, Predictions, SliceResult, Skip
from .slices import build_view
from .splits import check_no_leak
from .targets import Labels, extract_labels, subject_id

__all__ = ["PanelResult", "Predictions", "SliceResult", "Skip", "permuted_slices", "run_panel", "run_slice",
           "task_folds"]

log = logging.getLogger("g3n_probe")


@dataclass
class _Units:
    """The scorable units of one (task, slice): features, labels, subjects, folds and unit keys."""

    X: np.ndarray
    y: np.ndarray
    subj: np.ndarray
    ufold: np.ndarray
    keys: np.ndarray
    classes: list[str]
    subjects: int
    volumes: int
    notes: list[str] = field(default_factory=list)


def _slice_units(task: TaskSpec, slice_name: str, fs: FeatureSet, labels: Labels, keep: np.ndarray,
                 folds: np.ndarray, cfg: ProtocolConfig) -> _Units | Skip:
    """The slice's units (a volume, or a session's pooled volumes) with usable labels, or why none."""
    view = build_view(slice_name, fs.X, fs.records, np.flatnonzero(keep), cfg.pooled_min_modalities)
    if len(view.members) == 0:
        return Skip(task.name, slice_name, "no labelled volumes in this slice")
    y, ok = unit_labels(view.members, labels.y, task.kind)
    notes: list[str] = []
    if (~ok).any():
        notes.append(f"{int((~ok).sum())} session(s) with disagreeing labels left out")
    unit_fold = np.asarray([folds[m[0]] for m in view.members], dtype=np.int64)
    if task.kind == "classification":
        ok, n = drop_small_classes(y, view.subjects, ok, cfg, None, f"slice {slice_name}")
        notes += n
        classes = sorted(set(y[ok].tolist()))
        if len(classes) < 2:
            return Skip(task.name, slice_name, f"{len(classes)} class(es) with >= {cfg.min_class_subjects} subjects; need 2")
    else:
        classes = []
    n_subj = len(set(view.subjects[ok].tolist()))
    if n_subj < max(cfg.min_task_subjects, cfg.n_splits):
        return Skip(task.name, slice_name, f"{n_subj} labelled subject(s) < {max(cfg.min_task_subjects, cfg.n_splits)}")
    sel = np.flatnonzero(ok)
    return _Units(X=view.X[sel], y=y[sel], subj=view.subjects[sel], ufold=unit_fold[sel],
                  keys=np.asarray(view.unit_keys, dtype=object)[sel], classes=classes, subjects=n_subj,
                  volumes=int(sum(len(view.members[i]) for i in sel)), notes=notes)


@dataclass
class _CV:
    """One cross-validation of a slice: fold metrics, the chance level, predictions and fits."""

    fold_metrics: dict[str, list[float]]
    chance_metrics: dict[str, list[float]]
    predictions: Predictions
    fits: dict[Any, tuple[LinearProbe, FitReport]]
    notes: list[str]


def _cross_validate(task: TaskSpec, u: _Units, cfg: ProtocolConfig) -> _CV:
    """Fit every scorable fold (and the final probe), score each fold's test units, and score the
    same folds with a constant predictor (the chance level)."""
    names = task.metric_names()
    cv = _CV({m: [] for m in names}, {m: [] for m in names}, Predictions(), {}, [])
    scorable = scorable_folds(task, u.y, u.ufold, cfg.n_splits)
    for k in range(cfg.n_splits):
        if not (u.ufold == k).any():
            cv.notes.append(f"fold {k}: no test units in this slice")
        elif k not in scorable:
            cv.notes.append(f"fold {k}: training part has a single class; fold not scored")
    cv.fits = fit_folds(task, u.X, u.y, u.subj, u.ufold, scorable, cfg)
    for k in scorable:
        test = u.ufold == k
        probe, rep = cv.fits[k]
        values, scores = score_fold(task, probe, u.X[test], u.y[test], u.classes, names)
        chance, chunk = _fold_outputs(task, u.y, test, scores, u.classes, names, rep.alpha)
        for m in names:
            cv.fold_metrics[m].append(values[m])
            cv.chance_metrics[m].append(chance[m])
        ti = np.flatnonzero(test)
        cv.predictions.add({"unit": u.keys[ti], "subject": u.subj[ti], "fold": np.full(len(ti), k), **chunk})
        for m in names:
            if math.isnan(cv.fold_metrics[m][-1]):
                cv.notes.append(f"fold {k}: {m} undefined (a single class in the test part)")
    not_converged = sum(int(not cv.fits[k][1].converged) for k in scorable)
    if not_converged:
        cv.notes.append(f"{not_converged} fold fit(s) stopped at max_iter={cfg.logreg_max_iter} before converging")
    cv.predictions.finish()
    return cv


def _fold_outputs(task: TaskSpec, y: np.ndarray, test: np.ndarray, scores: np.ndarray, classes: list[str],
                  names: list[str], alpha: float) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """A fold's chance-level metrics (a constant predictor: the training part's class frequencies,
    or its mean) and its prediction columns."""
    n = int(test.sum())
    if task.kind == "classification":
        prior = np.asarray([np.mean(y[~test] == c) for c in classes])
        constant = np.tile(prior, (n, 1))
        chance = {m: classification_metric(m, y[test], constant, classes) for m in names}
        pred = np.asarray(classes, dtype=object)[np.argmax(scores, axis=1)]
        return chance, {"y_true": y[test], "y_pred": pred, **{f"p_{c}": scores[:, j] for j, c in enumerate(classes)}}
    constant = np.full(n, float(np.mean(y[~test].astype(np.float64))))
    chance = {m: regression_metric(m, y[test], constant) for m in names}
    return chance, {"y_true": y[test], "y_pred": scores, "alpha": np.full(n, alpha)}


def run_slice(
    task: TaskSpec,
    slice_name: str,
    fs: FeatureSet,
    labels: Labels,
    keep: np.ndarray,
    folds: np.ndarray,
    subjects: np.ndarray,
    cfg: ProtocolConfig,
    permute: bool = False,
    on_permutation: Callable[[int, int], None] | None = None,
) -> SliceResult | Skip:
    """Cross-validate one task on one slice (fold assignment given), then fit the final probe.

    ``permute``: also cross-validate ``cfg.permutations`` times on shuffled labels (``null_metrics``).
    """
    t0 = time.perf_counter()
    u = _slice_units(task, slice_name, fs, labels, keep, folds, cfg)
    if isinstance(u, Skip):
        return u
    check_no_leak(u.subj, u.ufold)
    cv = _cross_validate(task, u, cfg)
    null = null_metrics(task, slice_name, u.X, u.y, u.subj, u.ufold, u.classes, cfg, on_permutation) if permute else {}
    notes = u.notes + cv.notes
    final = cv.fits["final"][0] if "final" in cv.fits else None
    if "final" in cv.fits and not cv.fits["final"][1].converged:
        notes.append(f"final probe stopped at max_iter={cfg.logreg_max_iter} before converging")
    return SliceResult(
        task=task.name,
        title=task.title or task.name,
        slice=slice_name,
        kind=task.kind,
        classes=u.classes,
        fold_metrics=cv.fold_metrics,
        subjects=u.subjects,
        volumes=u.volumes,
        units=len(u.y),
        notes=notes,
        predictions=cv.predictions,
        probe=final,
        fold_probes=[cv.fits[k][0] if k in cv.fits else None for k in range(cfg.n_splits)] if cfg.save_fold_probes else [],
        seconds=time.perf_counter() - t0,
        chance_metrics=cv.chance_metrics,
        null_metrics=null,
    )


def run_panel(
    fs: FeatureSet,
    panel: Panel,
    cfg: ProtocolConfig,
    progress: bool = True,
    records: Sequence[Mapping[str, Any]] | None = None,
) -> PanelResult:
    """Run every task of ``panel`` on every declared slice of ``fs``.

    ``records`` overrides the feature set's metadata (``compare`` passes one reference copy so
    labels and splits are identical across feature sets).
    """
    t0 = time.perf_counter()
    if records is not None:
        fs = FeatureSet(fs.name, fs.X, fs.keys, [dict(r) for r in records], fs.source)
    res = PanelResult(fs.name, dict(fs.source), fs.dim, panel, cfg)
    permuted = permuted_slices(panel, cfg)
    subjects = np.asarray([subject_id(r) for r in fs.records], dtype=object)
    total = sum(len(t.slices) for t in panel.tasks)
    bar = tqdm(total=total, desc=f"probe {fs.name}", unit="slice", disable=not progress)
    with threadpool_limits(limits=cfg.threads):
        for task in panel.tasks:
            labels = extract_labels(task, fs.records)
            folds, keep, notes, reason = task_folds(task, labels, subjects, cfg)
            for n in notes:
                log.warning("task %s: %s", task.name, n)
            if reason is not None:
                log.warning("task %s skipped: %s", task.name, reason)
                for s in task.slices:
                    res.skipped.append(Skip(task.name, s, reason))
                bar.update(len(task.slices))
                continue
            assert folds is not None
            res.folds[task.name] = {str(s): int(f) for s, f in zip(subjects[keep], folds[keep])}
            for s in task.slices:
                bar.set_postfix_str(f"{task.name}/{s}")
                def shown(b: int, n: int, where: str = f"{task.name}/{s}") -> None:
                    bar.set_postfix_str(f"{where} shuffled labels {b + 1}/{n}")

                out = run_slice(task, s, fs, labels, keep, folds, subjects, cfg, permute=(task.name, s) in permuted,
                                on_permutation=shown)
                if isinstance(out, Skip):
                    log.warning("task %s slice %s skipped: %s", task.name, s, out.reason)
                    res.skipped.append(out)
                else:
                    out.notes = notes + out.notes
                    res.results.append(out)
                bar.update(1)
    bar.close()
    res.seconds = time.perf_counter() - t0
    return res
