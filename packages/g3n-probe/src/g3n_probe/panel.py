"""Run the probe panel: labels -> subject-grouped folds -> per-slice fits -> fold metrics.

Protocol (docs/method.md §4): for each task, folds are assigned once per subject over all of the
task's labelled volumes (5-fold, stratified, grouped, seed 2025); every slice reuses that
assignment, so slices and feature sets see identical splits. Inside each fold the scaler and
the probe are fitted on training units only. Too-small classes are dropped and too-small
tasks or slices are skipped, each with a recorded reason; nothing here raises for lack of labels.

With ``permutations`` > 0 the slices that ``permute`` selects are cross-validated again on
shuffled labels (same folds; see permutation.py) for a p-value beside each score.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from .config import Panel, PanelError, ProtocolConfig, TaskSpec
from .features import FeatureSet
from .linear import (FitReport, GramStats, LinearProbe, fit_classifier, fit_on_components, fit_regressor,
                     ridge_from_stats, wide)
from .metrics import classification_metric, regression_metric
from .permutation import block_permutation, null_bound, p_value, slice_seed
from .slices import build_view
from .splits import assign_folds, check_no_leak, regression_strata
from .targets import Labels, extract_labels, subject_id

log = logging.getLogger("g3n_probe")


@dataclass
class Skip:
    """A task or slice that was not scored, and why."""

    task: str
    slice: str
    reason: str


class Predictions:
    """Out-of-fold predictions of one (task, slice), kept by column: a 35,000-unit panel holds
    a few arrays per slice instead of hundreds of thousands of row dicts. Iterating yields rows."""

    def __init__(self) -> None:
        self._chunks: list[dict[str, np.ndarray]] = []
        self.columns: dict[str, np.ndarray] = {}

    def add(self, chunk: dict[str, np.ndarray]) -> None:
        self._chunks.append({k: np.asarray(v) for k, v in chunk.items()})

    def finish(self) -> "Predictions":
        if self._chunks:
            names = list(self._chunks[0])
            self.columns = {n: np.concatenate([c[n] for c in self._chunks]) for n in names}
            self._chunks = []
        return self

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        names = list(self.columns)
        for i in range(len(self)):
            yield {n: _py(self.columns[n][i]) for n in names}


def _fold_mean(vals: Sequence[float]) -> float:
    """Mean over the folds that could be scored (NaN marks one that could not); NaN if none."""
    scored = [v for v in vals if not math.isnan(v)]
    return float(np.mean(scored)) if scored else math.nan


def _py(v: Any) -> Any:
    """numpy scalar -> Python scalar (CSV writing and comparisons)."""
    return v.item() if isinstance(v, np.generic) else v


@dataclass
class SliceResult:
    """Fold metrics, predictions and probes of one (task, slice)."""

    task: str
    title: str
    slice: str
    kind: str
    classes: list[str]
    fold_metrics: dict[str, list[float]]
    subjects: int
    volumes: int
    units: int
    notes: list[str] = field(default_factory=list)
    predictions: "Predictions" = field(default_factory=lambda: Predictions())
    probe: LinearProbe | None = None
    fold_probes: list[LinearProbe | None] = field(default_factory=list)
    seconds: float = 0.0
    #: the same folds scored by a constant predictor (the training part's class frequencies or
    #: mean): the level a probe must beat to show the features carry the label
    chance_metrics: dict[str, list[float]] = field(default_factory=dict)
    #: the fold-mean metric of each cross-validation on shuffled labels (empty: not tested)
    null_metrics: dict[str, list[float]] = field(default_factory=dict)

    def chance(self, metric: str) -> float:
        return _fold_mean(self.chance_metrics.get(metric, []))

    def permutation(self, metric: str) -> tuple[float, float, int]:
        """(p-value, the score to beat for p < 0.05, number of scored permutations); NaNs when untested."""
        null = self.null_metrics.get(metric, [])
        n = sum(not math.isnan(v) for v in null)
        return p_value(self.summary(metric)[0], null, metric), null_bound(null, metric), n

    def summary(self, metric: str) -> tuple[float, float, int]:
        """Mean and sample SD over scored folds, and the number of scored folds."""
        vals = [v for v in self.fold_metrics.get(metric, []) if not math.isnan(v)]
        if not vals:
            return math.nan, math.nan, 0
        sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan
        return float(np.mean(vals)), sd, len(vals)


@dataclass
class PanelResult:
    """Everything one panel run produced, before it is written to disk."""

    feature_name: str
    feature_source: dict[str, Any]
    feature_dim: int
    panel: Panel
    protocol: ProtocolConfig
    results: list[SliceResult] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    folds: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> subject -> fold
    seconds: float = 0.0

    def get(self, task: str, slice_: str) -> SliceResult | None:
        for r in self.results:
            if r.task == task and r.slice == slice_:
                return r
        return None


def _class_subject_counts(y: np.ndarray, subjects: np.ndarray) -> Counter:
    return Counter(c for c, _ in set(zip(y.tolist(), subjects.tolist())))


def _drop_small_classes(
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


def _unit_labels(members: list[np.ndarray], y: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
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
        keep, n = _drop_small_classes(labels.y, subjects, keep, cfg, task.max_classes, "all labelled volumes")
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


def _fit(task: TaskSpec, X: np.ndarray, y: np.ndarray, groups: np.ndarray, cfg: ProtocolConfig, init=None):
    if cfg.pca:
        return fit_on_components(X, cfg.pca, lambda U: _fit(task, U, y, groups, cfg.model_copy(update={"pca": None})))
    if task.kind == "classification":
        # X is a fresh copy (boolean-indexed training rows): standardise it in place
        return fit_classifier(X, y, cfg, init=init, inplace=True)
    return fit_regressor(X, y, cfg, groups=groups)


def _fit_folds(
    task: TaskSpec, X: np.ndarray, y: np.ndarray, subj: np.ndarray, ufold: np.ndarray, scorable: list[int], cfg: ProtocolConfig
) -> dict[Any, tuple[LinearProbe, FitReport]]:
    """Fit every scorable fold (and the final all-data probe) -> {fold or "final": (probe, report)}.

    With ``warm_start``, the first fold is fitted from zero and the others start from its
    solution; the remaining fits run ``n_jobs`` at a time in threads (BLAS work releases the GIL).
    """
    def train_mask(k: Any) -> np.ndarray:
        return np.ones(len(y), dtype=bool) if k == "final" else ufold != k

    def one(k: Any, init: LinearProbe | None) -> tuple[LinearProbe, FitReport]:
        m = train_mask(k)
        return _fit(task, X[m], y[m], subj[m], cfg, init)

    todo: list[Any] = list(scorable) + (["final"] if cfg.save_probes else [])
    fits: dict[Any, tuple[LinearProbe, FitReport]] = {}
    if task.kind == "regression" and cfg.ridge_inner_cv == "gcv" and not wide(*X.shape) and not cfg.pca:
        # one pass over the data: per-fold statistics, summed for each training part
        # (wide features fit fold by fold in the kernel form instead: p x p would not fit)
        stats = {k: GramStats.of(X[ufold == k], y[ufold == k]) for k in np.unique(ufold).tolist()}
        for k in todo:
            parts = [st for j, st in stats.items() if k == "final" or j != k]
            probe, rep, _ = ridge_from_stats(sum(parts[1:], parts[0]), cfg.ridge_alphas, cfg.dtype)
            fits[k] = (probe, rep)
        return fits
    init = None
    if todo and cfg.warm_start and task.kind == "classification":
        fits[todo[0]] = one(todo[0], None)
        init = fits[todo[0]][0]
        todo = todo[1:]
    if cfg.n_jobs > 1 and len(todo) > 1:
        outs = Parallel(n_jobs=cfg.n_jobs, backend="threading")(delayed(one)(k, init) for k in todo)
    else:
        outs = [one(k, init) for k in todo]
    fits.update(zip(todo, outs))
    return fits


def _score(task: TaskSpec, probe: LinearProbe, X: np.ndarray, y: np.ndarray, classes: list[str],
           metric_names: list[str]) -> tuple[dict[str, float], np.ndarray]:
    """Every metric of one fold's test part, and the scores (class columns in ``classes`` order)."""
    scores = probe.predict_scores(X)
    if task.kind != "classification":
        return {m: regression_metric(m, y, scores) for m in metric_names}, scores
    full = np.zeros((len(X), len(classes)), dtype=scores.dtype)
    for j, c in enumerate(probe.classes):
        full[:, classes.index(c)] = scores[:, j]
    return {m: classification_metric(m, y, full, classes) for m in metric_names}, full


def _scorable(task: TaskSpec, y: np.ndarray, ufold: np.ndarray, n_splits: int) -> list[int]:
    return [k for k in range(n_splits) if (ufold == k).any()
            and (task.kind != "classification" or len(set(y[ufold != k].tolist())) >= 2)]


def _shuffled_cv(task: TaskSpec, X: np.ndarray, y: np.ndarray, subj: np.ndarray, ufold: np.ndarray,
                 classes: list[str], cfg: ProtocolConfig) -> dict[str, float]:
    """The fold-mean of every metric of one cross-validation (labels ``y``, folds ``ufold``)."""
    names = task.metric_names()
    scorable = _scorable(task, y, ufold, cfg.n_splits)
    with threadpool_limits(limits=cfg.threads):
        fits = _fit_folds(task, X, y, subj, ufold, scorable, cfg)
    folds: dict[str, list[float]] = {m: [] for m in names}
    for k in scorable:
        test = ufold == k
        for m, v in _score(task, fits[k][0], X[test], y[test], classes, names)[0].items():
            folds[m].append(v)
    return {m: _fold_mean(folds[m]) for m in names}


def _null_metrics(task: TaskSpec, slice_name: str, X: np.ndarray, y: np.ndarray, subj: np.ndarray, ufold: np.ndarray,
                  classes: list[str], cfg: ProtocolConfig,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, list[float]]:
    """The fold-mean of every metric over ``cfg.permutations`` cross-validations on shuffled labels.

    The shuffles are drawn here, in order, from the slice's own seed; with ``n_jobs`` > 1 the
    cross-validations run in that many processes (a logistic fit holds the GIL for much of its
    time, so threads would not overlap them). Either way the results are the same.
    """
    rng = np.random.default_rng(slice_seed(cfg.seed, task.name, slice_name))
    shuffled = [y[block_permutation(subj, rng)] for _ in range(cfg.permutations)]
    one = cfg.model_copy(update={"save_probes": False, "n_jobs": 1})
    if cfg.n_jobs > 1 and len(shuffled) > 1:
        runs = Parallel(n_jobs=cfg.n_jobs, backend="loky", return_as="generator")(
            delayed(_shuffled_cv)(task, X, yb, subj, ufold, classes, one) for yb in shuffled)
    else:
        runs = (_shuffled_cv(task, X, yb, subj, ufold, classes, one) for yb in shuffled)
    null: dict[str, list[float]] = {m: [] for m in task.metric_names()}
    for b, means in enumerate(runs):
        if progress is not None:
            progress(b, cfg.permutations)
        for m, v in means.items():
            null[m].append(v)
    return null


def permuted_slices(panel: Panel, cfg: ProtocolConfig) -> set[tuple[str, str]]:
    """The (task, slice) pairs ``cfg.permute`` selects in ``panel`` (none when permutations = 0).

    An explicit pattern that selects nothing is an error (a typo would silently test nothing).
    """
    if cfg.permutations == 0:
        return set()
    pairs = [(t.name, s) for t in panel.tasks for s in t.slices]
    chosen: set[tuple[str, str]] = set()
    for pattern in cfg.permute:
        if pattern == "headline":
            hit = {(h.task, h.slice) for h in panel.headline} & set(pairs)
            if not hit:
                log.warning("permute: panel %s has no headline rows among its tasks; none tested for 'headline'", panel.name)
        else:
            hit = {(t, s) for t, s in pairs if fnmatchcase(f"{t}/{s}", pattern)}
            if not hit:
                raise PanelError(f"permute pattern {pattern!r} matches no task/slice of panel {panel.name!r} "
                                 f"(e.g. {pairs[0][0]}/{pairs[0][1]}; patterns are TASK/SLICE with * and ?)")
        chosen |= hit
    return chosen


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
    view = build_view(slice_name, fs.X, fs.records, np.flatnonzero(keep), cfg.pooled_min_modalities)
    if len(view.members) == 0:
        return Skip(task.name, slice_name, "no labelled volumes in this slice")
    y, ok = _unit_labels(view.members, labels.y, task.kind)
    notes: list[str] = []
    if (~ok).any():
        notes.append(f"{int((~ok).sum())} session(s) with disagreeing labels left out")
    unit_fold = np.asarray([folds[m[0]] for m in view.members], dtype=np.int64)
    if task.kind == "classification":
        ok, n = _drop_small_classes(y, view.subjects, ok, cfg, None, f"slice {slice_name}")
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
    X, y, subj, ufold = view.X[sel], y[sel], view.subjects[sel], unit_fold[sel]
    members = [view.members[i] for i in sel]
    check_no_leak(subj, ufold)
    metric_names = task.metric_names()
    fold_metrics: dict[str, list[float]] = {m: [] for m in metric_names}
    chance_metrics: dict[str, list[float]] = {m: [] for m in metric_names}
    predictions = Predictions()
    unit_keys = np.asarray(view.unit_keys, dtype=object)
    scorable = _scorable(task, y, ufold, cfg.n_splits)
    for k in range(cfg.n_splits):
        if not (ufold == k).any():
            notes.append(f"fold {k}: no test units in this slice")
        elif k not in scorable:
            notes.append(f"fold {k}: training part has a single class; fold not scored")
    fits = _fit_folds(task, X, y, subj, ufold, scorable, cfg)
    fold_probes: list[LinearProbe | None] = [fits[k][0] if k in fits else None for k in range(cfg.n_splits)]
    not_converged = sum(int(not fits[k][1].converged) for k in scorable)
    for k in scorable:
        test = ufold == k
        probe, rep = fits[k]
        values, scores = _score(task, probe, X[test], y[test], classes, metric_names)
        for m in metric_names:
            fold_metrics[m].append(values[m])
        if task.kind == "classification":
            prior = np.asarray([np.mean(y[~test] == c) for c in classes])
            constant = np.tile(prior, (int(test.sum()), 1))
            for m in metric_names:
                chance_metrics[m].append(classification_metric(m, y[test], constant, classes))
            pred = np.asarray(classes, dtype=object)[np.argmax(scores, axis=1)]
            chunk = {"y_true": y[test], "y_pred": pred, **{f"p_{c}": scores[:, j] for j, c in enumerate(classes)}}
        else:
            constant = np.full(int(test.sum()), float(np.mean(y[~test].astype(np.float64))))
            for m in metric_names:
                chance_metrics[m].append(regression_metric(m, y[test], constant))
            chunk = {"y_true": y[test], "y_pred": scores, "alpha": np.full(int(test.sum()), rep.alpha)}
        ti = np.flatnonzero(test)
        predictions.add({"unit": unit_keys[sel[ti]], "subject": subj[ti], "fold": np.full(len(ti), k), **chunk})
        for m in metric_names:
            if math.isnan(fold_metrics[m][-1]):
                notes.append(f"fold {k}: {m} undefined (a single class in the test part)")
    if not_converged:
        notes.append(f"{not_converged} fold fit(s) stopped at max_iter={cfg.logreg_max_iter} before converging")
    null = _null_metrics(task, slice_name, X, y, subj, ufold, classes, cfg, on_permutation) if permute else {}
    final = fits["final"][0] if "final" in fits else None
    if "final" in fits and not fits["final"][1].converged:
        notes.append(f"final probe stopped at max_iter={cfg.logreg_max_iter} before converging")
    return SliceResult(
        task=task.name,
        title=task.title or task.name,
        slice=slice_name,
        kind=task.kind,
        classes=classes,
        fold_metrics=fold_metrics,
        subjects=n_subj,
        volumes=int(sum(len(m) for m in members)),
        units=len(sel),
        notes=notes,
        predictions=predictions.finish(),
        probe=final,
        fold_probes=fold_probes if cfg.save_fold_probes else [],
        seconds=time.perf_counter() - t0,
        chance_metrics=chance_metrics,
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
