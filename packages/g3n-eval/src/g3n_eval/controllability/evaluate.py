"""Fit the probes on real features and apply them to generated ones: one row per task, one
sweep per continuous condition (:func:`evaluate`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .columns import ClassTask, class_controllability, paired_shifts, paired_sweep, pairing_key, value_sweep
from .permutation import BLIND_AUC, PERMUTATION_MAX_SUBJECTS, is_blind, real_null, real_permutation
from .realcv import real_cv
from .reconstructions import recon_column, recon_sweep


def _labels(records: Sequence[Mapping[str, Any]], field: str) -> list[str | None]:
    from ..data import label_of

    return [label_of(r.get(field)) for r in records]


#: Categorical conditions a probe's real training data are matched on (:func:`real_slice`).
MATCH_FIELDS = ("modality",)


def real_slice(generated_records: Sequence[Mapping[str, Any]], field: str, classes: Sequence[str] | None = None,
               match: Sequence[str] = MATCH_FIELDS) -> dict[str, str]:
    """The other conditions that every generated sample of a task asked for, e.g. {"modality": "T1"}
    for the diagnosis rows (their requests all name T1). ``classes=None``: every sample with a value
    for ``field`` (a sweep).

    The probe is fitted on the real samples of this slice only. Fitted on every modality, the HC-vs-AD
    probe also learns what tells the cohorts apart (T2 and FLAIR volumes come from HC-heavy cohorts),
    and a T1 sample asked for AD is then scored partly on how T1 it looks: the request's effect is
    measured against the wrong contrast. Only the contrast is matched by default: matching the
    disease too would fit the IDH1 probe on the few real glioma volumes of one contrast (the GBMs,
    all wildtype, left out), too few for a probe that can see anything."""
    from ..data import label_of

    asked = [r for r in generated_records
             if (label_of(r.get(field)) in classes if classes is not None else r.get(field) is not None)]
    out: dict[str, str] = {}
    for g in match:
        values = {label_of(r.get(g)) for r in asked}
        if g != field and len(values) == 1 and None not in values:
            out[g] = values.pop()
    return out


def _in_slice(records: Sequence[Mapping[str, Any]], where: Mapping[str, str]) -> list[int]:
    from ..data import label_of

    return [i for i, r in enumerate(records) if all(label_of(r.get(g)) == v for g, v in where.items())]


def evaluate(real: Any, generated: Any, tasks: Sequence[ClassTask], sweeps: Sequence[str] = (),
             protocol: Any = None, n_splits: int = 5, match: Sequence[str] = MATCH_FIELDS,
             permutations: int = 0, permutation_max_subjects: int | None = PERMUTATION_MAX_SUBJECTS,
             recon: Any = None) -> dict[str, Any]:
    """Fit one probe per task on the real FeatureSet, apply it to the generated FeatureSet.

    ``real`` and ``generated`` are g3n_probe FeatureSets (the generated one from re-encoded
    decoded samples). Each probe is fitted on the real samples that match the conditions its task's
    samples all asked for (:func:`real_slice` over ``match``; ``()`` fits on every real sample); when
    that slice lacks a class, on every real sample. Each row records its ``real_slice``. With
    ``permutations``, the real column gets a permutation test (:func:`real_null`): ``real.permutation``
    says whether the probe sees the task at all, and so whether its verdict on generated samples means
    anything. Rows fitted on more than ``permutation_max_subjects`` subjects (None: no limit) skip it.
    With ``recon`` (features of the tokenizer's reconstructions of the real volumes, keyed as the
    real ones), each row's ``recon`` column (:func:`recon_column`) and each sweep's
    (:func:`recon_sweep`) say whether the probe still sees its task once a volume has been decoded.
    Returns {"tasks": {name: row}, "sweeps": {field: sweep}, "skipped": {...}}.
    """
    from g3n_probe import protocol_preset

    from ..data import InputError

    if permutations < 0:
        raise InputError(f"permutations must be >= 0, got {permutations}")
    protocol = protocol or protocol_preset("paper")
    if real.dim != generated.dim:
        raise InputError(f"real features are {real.dim}-d, generated {generated.dim}-d: not the same encoder")
    out: dict[str, Any] = {"tasks": {}, "sweeps": {}, "skipped": {}}
    for task in tasks:
        row = class_row(real, generated, task, protocol=protocol, n_splits=n_splits, match=match,
                        permutations=permutations, permutation_max_subjects=permutation_max_subjects, recon=recon)
        if isinstance(row, str):
            out["skipped"][task.name] = row
        else:
            out["tasks"][task.name] = row
    for field in sweeps:
        sweep = sweep_row(real, generated, field, protocol=protocol, n_splits=n_splits, match=match, recon=recon)
        if isinstance(sweep, str):
            out["skipped"][f"{field}:sweep"] = sweep
        else:
            out["sweeps"][field] = sweep
    return out


def class_row(real: Any, generated: Any, task: ClassTask, *, protocol: Any, n_splits: int, match: Sequence[str],
              permutations: int, permutation_max_subjects: int | None, recon: Any) -> dict[str, Any] | str:
    """One task's row (see :func:`evaluate`), or why it was skipped."""
    from g3n_probe import assign_folds, fit_classifier

    y_all = _labels(real.records, task.field)
    where = real_slice(generated.records, task.field, task.classes, match)
    keep = [i for i in _in_slice(real.records, where) if y_all[i] in task.classes]
    if len({y_all[i] for i in keep}) < 2:  # the slice lacks a class: fit on every real sample
        where = {}
        keep = [i for i, v in enumerate(y_all) if v in task.classes]
    present = sorted({y_all[i] for i in keep})
    if len(present) < 2:
        return f"real data have {present or 'no'} of classes {list(task.classes)}"
    X, y = real.X[keep], [y_all[i] for i in keep]
    groups = [str(real.records[i].get("subject") or real.keys[i]) for i in keep]
    probe, _ = fit_classifier(X, np.asarray(y, dtype=object), protocol)
    real_pred = real_proba = folds = None
    n_subjects = len(set(groups))
    k = min(n_splits, n_subjects, min(Counter(y).values()))
    if k >= 2:
        folds = assign_folds(groups, y, k, protocol.seed)
        real_pred, real_proba = real_cv(X, y, groups, protocol, k, task.classes, folds)
    gen_req = _labels(generated.records, task.field)
    sel = [i for i, v in enumerate(gen_req) if v is None or v in task.classes]
    proba_g = _class_scores(probe, generated.X[sel], task.classes)
    row = class_controllability(task.classes, [gen_req[i] for i in sel], proba_g, y, real_pred, real_proba)
    if "real" in row:
        if permutations and permutation_max_subjects is not None and n_subjects > permutation_max_subjects:
            row["real"]["permutation_skipped"] = (f"{n_subjects} subjects > {permutation_max_subjects}: the AUC rule "
                                                  f"(blind at <= {BLIND_AUC}) decides")
        elif permutations:
            from g3n_probe.permutation import slice_seed

            seed = slice_seed(protocol.seed, f"controllability:{task.name}", ",".join(f"{g}={v}" for g, v in where.items()))
            null = real_null(X, y, groups, protocol, k, task.classes, permutations, seed, folds)
            row["real"]["permutation"] = real_permutation(row["real"], null)
        row["real"]["blind"] = is_blind(row["real"])
    if recon is not None and folds is not None:
        from g3n_probe.permutation import slice_seed

        row["recon"] = recon_column(X, y, [real.keys[i] for i in keep], groups, folds, k, protocol, task.classes,
                                    recon, permutations, slice_seed(protocol.seed, f"recon:{task.name}", ""))
    row["field"] = task.field
    row["real_slice"] = where
    row["paired"] = paired_shifts(task.classes, [gen_req[i] for i in sel],
                                  [pairing_key(generated.records[i], task.field) for i in sel], proba_g)
    return row


def _class_scores(probe: Any, X: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """(n, len(classes)) probe probabilities in ``classes`` order; classes absent from training keep p = 0."""
    P = probe.predict_scores(X) if len(X) else np.zeros((0, len(probe.classes)))
    out = np.zeros((len(X), len(classes)))
    for j, c in enumerate(probe.classes):
        out[:, list(classes).index(c)] = P[:, j]
    return out


def sweep_row(real: Any, generated: Any, field: str, *, protocol: Any, n_splits: int, match: Sequence[str],
              recon: Any) -> dict[str, Any] | str:
    """One continuous condition's sweep (see :func:`evaluate`), or why it was skipped."""
    from g3n_probe import fit_regressor

    ys = [r.get(field) for r in real.records]
    where = real_slice(generated.records, field, None, match)
    keep = [i for i in _in_slice(real.records, where) if ys[i] is not None]
    if len(keep) < 3:
        where, keep = {}, [i for i, v in enumerate(ys) if v is not None]
    if len(keep) < 3:
        return f"only {len(keep)} real samples with {field}"
    groups = np.asarray([str(real.records[i].get("subject") or real.keys[i]) for i in keep])
    probe, _ = fit_regressor(real.X[keep], np.asarray([ys[i] for i in keep], dtype=np.float64), protocol, groups)
    req = [r.get(field) for r in generated.records]
    gsel = [i for i, v in enumerate(req) if v is not None]
    if len(gsel) < 2:
        return f"only {len(gsel)} generated samples requested a {field}"
    pred = probe.predict_scores(generated.X[gsel])
    sweep = value_sweep([float(req[i]) for i in gsel], pred)
    sweep["real_slice"] = where
    sweep["paired"] = paired_sweep([float(req[i]) for i in gsel], pred,
                                   [pairing_key(generated.records[i], field) for i in gsel])
    if recon is not None and len(set(groups)) >= 2:
        sweep["recon"] = recon_sweep(real.X[keep], [float(ys[i]) for i in keep], list(groups),
                                     [real.keys[i] for i in keep], recon, protocol, n_splits)
    return sweep
