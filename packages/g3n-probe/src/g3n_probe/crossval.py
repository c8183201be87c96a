"""Fitting and scoring one (task, slice) fold by fold, and its cross-validations on shuffled
labels for the permutation test (:mod:`g3n_probe.permutation` draws the shuffles)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits

from .config import Panel, PanelError, ProtocolConfig, TaskSpec
from .linear import FitReport, LinearProbe, fit_classifier, fit_on_components
from .metrics import classification_metric, regression_metric
from .permutation import block_permutation, slice_seed
from .results import fold_mean
from .ridge import GramStats, fit_regressor, ridge_by_fold_cv, ridge_from_stats, wide

log = logging.getLogger("g3n_probe")


def _fit(task: TaskSpec, X: np.ndarray, y: np.ndarray, groups: np.ndarray, cfg: ProtocolConfig, init=None):
    """One probe on training rows; ``groups`` are what a ridge's inner CV holds out together."""
    if cfg.pca:
        return fit_on_components(X, cfg.pca, lambda U: _fit(task, U, y, groups, cfg.model_copy(update={"pca": None})))
    if task.kind == "classification":
        # X is a fresh copy (boolean-indexed training rows): standardise it in place
        return fit_classifier(X, y, cfg, init=init, inplace=True)
    return fit_regressor(X, y, cfg, groups=groups)


def fit_folds(
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
        # 'folds': the ridge's inner CV holds out one outer fold at a time (each is subject-grouped)
        return _fit(task, X[m], y[m], (ufold if cfg.ridge_inner_cv == "folds" else subj)[m], cfg, init)

    todo: list[Any] = list(scorable) + (["final"] if cfg.save_probes else [])
    fits: dict[Any, tuple[LinearProbe, FitReport]] = {}
    if task.kind == "regression" and cfg.ridge_inner_cv in ("gcv", "folds") and not wide(*X.shape) and not cfg.pca:
        # one pass over the data: per-fold statistics, summed for each training part
        # (wide features fit fold by fold in the kernel form instead: p x p would not fit)
        rows = {k: (X[ufold == k], y[ufold == k]) for k in np.unique(ufold).tolist()}
        stats = {k: GramStats.of(Xk, yk) for k, (Xk, yk) in rows.items()}
        if cfg.ridge_inner_cv == "folds":
            return ridge_by_fold_cv(stats, rows, todo, cfg.ridge_alphas, cfg.dtype, n_jobs=cfg.n_jobs)
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


def score_fold(task: TaskSpec, probe: LinearProbe, X: np.ndarray, y: np.ndarray, classes: list[str],
           metric_names: list[str]) -> tuple[dict[str, float], np.ndarray]:
    """Every metric of one fold's test part, and the scores (class columns in ``classes`` order)."""
    scores = probe.predict_scores(X)
    if task.kind != "classification":
        return {m: regression_metric(m, y, scores) for m in metric_names}, scores
    full = np.zeros((len(X), len(classes)), dtype=scores.dtype)
    for j, c in enumerate(probe.classes):
        full[:, classes.index(c)] = scores[:, j]
    return {m: classification_metric(m, y, full, classes) for m in metric_names}, full


def scorable_folds(task: TaskSpec, y: np.ndarray, ufold: np.ndarray, n_splits: int) -> list[int]:
    return [k for k in range(n_splits) if (ufold == k).any()
            and (task.kind != "classification" or len(set(y[ufold != k].tolist())) >= 2)]


def shuffled_cv(task: TaskSpec, X: np.ndarray, y: np.ndarray, subj: np.ndarray, ufold: np.ndarray,
                 classes: list[str], cfg: ProtocolConfig) -> dict[str, float]:
    """The fold-mean of every metric of one cross-validation (labels ``y``, folds ``ufold``)."""
    names = task.metric_names()
    scorable = scorable_folds(task, y, ufold, cfg.n_splits)
    with threadpool_limits(limits=cfg.threads):
        fits = fit_folds(task, X, y, subj, ufold, scorable, cfg)
    folds: dict[str, list[float]] = {m: [] for m in names}
    for k in scorable:
        test = ufold == k
        for m, v in score_fold(task, fits[k][0], X[test], y[test], classes, names)[0].items():
            folds[m].append(v)
    return {m: fold_mean(folds[m]) for m in names}


def null_metrics(task: TaskSpec, slice_name: str, X: np.ndarray, y: np.ndarray, subj: np.ndarray, ufold: np.ndarray,
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
            delayed(shuffled_cv)(task, X, yb, subj, ufold, classes, one) for yb in shuffled)
    else:
        runs = (shuffled_cv(task, X, yb, subj, ufold, classes, one) for yb in shuffled)
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
