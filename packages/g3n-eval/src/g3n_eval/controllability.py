"""Controllability (method.md §5, Table 2a): does the generator give what was asked for?

A probe trained on *real* embeddings scores generated samples after they are decoded and
re-encoded by the MAE encoder (exactly how real volumes are embedded). For a condition and a
class pair (or the 4-way modality task) these columns are reported:

* **real**: the probe's cross-validated agreement and AUC on real samples (its ceiling), with a
  permutation test (:func:`real_null`): a probe that does not beat shuffled labels is *blind* and
  cannot judge generated samples either way;
* **cond**: agreement of the probe with the *requested* class on samples generated with that
  request (and the AUC of the probe score against the request);
* **null**: samples generated with the condition left out (the null embedding): the class the
  probe mostly assigns and its fraction -- what the model does when not asked;
* **prior**: the real training set's majority class among the task's classes and its
  fraction -- what a generator that ignores the request would hit by chance.
* **recon** (given the tokenizer's reconstructions of the real volumes): the real column's probes
  scoring the reconstructions of the volumes they held out -- whether the probe still sees the
  task once a volume has been decoded, which decoded samples need (:func:`recon_column`).

Continuous conditions (age) get a sweep: requested vs probe-predicted value, slope and Pearson r.

When requests share their noise (``g3n-dit sample --paired``: sample j of every request starts
from seed + j), a task also gets a **paired** column. Samples with the same seed and the same other
conditions differ only in the requested class, so the change of the probe's score between them is
the request's effect alone; between unpaired samples it is buried under the spread of the noise.
It reports how many such groups moved toward the requested class and a one-sided sign test; a sweep
gets the slope within each group. The pure functions here take predictions; :func:`evaluate` fits
the probes with g3n-probe.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .stats import auc_ovr, line_fit, sign_test


@dataclass(frozen=True)
class ClassTask:
    """A metadata field and the classes compared, e.g. diagnosis HC vs AD."""

    field: str
    classes: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.field}:{'-vs-'.join(self.classes)}" if len(self.classes) == 2 else f"{self.field}:{len(self.classes)}-way"

    @classmethod
    def parse(cls, spec: str) -> "ClassTask":
        """``diagnosis:HC,AD`` -> ClassTask('diagnosis', ('HC', 'AD'))."""
        field, _, rest = spec.partition(":")
        classes = tuple(c.strip() for c in rest.split(",") if c.strip())
        if not field or len(classes) < 2 or len(set(classes)) != len(classes):
            from .data import InputError

            raise InputError(f"task {spec!r}: expected FIELD:CLASS1,CLASS2[,...] with at least two distinct classes")
        return cls(field.strip(), classes)


def _majority(labels: Sequence[str]) -> dict[str, Any]:
    if not labels:
        return {"n": 0, "class": None, "fraction": math.nan, "counts": {}}
    c = Counter(labels)
    top, k = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    return {"n": len(labels), "class": top, "fraction": k / len(labels), "counts": dict(sorted(c.items()))}


def class_controllability(classes: Sequence[str], requested: Sequence[str | None], proba: np.ndarray,
                          real_labels: Sequence[str] = (), real_cv_pred: Sequence[str] | None = None,
                          real_cv_proba: np.ndarray | None = None) -> dict[str, Any]:
    """Table-2a row from probe outputs on generated samples.

    ``requested[i]``: the class sample i was generated for, or None when the condition was not
    requested (null arm). ``proba``: (n, len(classes)) probe probabilities in ``classes`` order.
    Requested values outside ``classes`` are ignored (they belong to another task).
    """
    classes = [str(c) for c in classes]
    P = np.asarray(proba, dtype=np.float64)
    if P.ndim != 2 or P.shape != (len(requested), len(classes)):
        raise ValueError(f"proba must be ({len(requested)}, {len(classes)}), got {P.shape}")
    pred = np.asarray(classes, dtype=object)[np.argmax(P, axis=1)] if len(P) else np.asarray([], dtype=object)
    req = [None if r is None else str(r) for r in requested]
    cond = [i for i, r in enumerate(req) if r in classes]
    null = [i for i, r in enumerate(req) if r is None]
    row: dict[str, Any] = {"classes": classes}
    if cond:
        want = [req[i] for i in cond]
        row["cond"] = {
            "n": len(cond),
            "agreement": float(np.mean([pred[i] == req[i] for i in cond])),
            "auc": auc_ovr(want, P[cond], classes),
            "per_class": {c: {"n": sum(1 for w in want if w == c),
                              "agreement": float(np.mean([pred[i] == c for i in cond if req[i] == c]))
                              if any(w == c for w in want) else math.nan} for c in classes},
        }
    else:
        row["cond"] = {"n": 0, "agreement": math.nan, "auc": math.nan, "per_class": {}}
    row["null"] = _majority([str(pred[i]) for i in null])
    real = [str(v) for v in real_labels if str(v) in classes]
    row["prior"] = _majority(real)
    if real_cv_pred is not None:
        lab = [str(v) for v in real_labels]
        keep = [i for i, v in enumerate(lab) if v in classes]
        row["real"] = {
            "n": len(keep),
            "agreement": float(np.mean([str(real_cv_pred[i]) == lab[i] for i in keep])) if keep else math.nan,
            "auc": auc_ovr([lab[i] for i in keep], np.asarray(real_cv_proba)[keep], classes)
            if real_cv_proba is not None and keep else math.nan,
        }
    return row


def value_sweep(requested: Sequence[float], predicted: Sequence[float]) -> dict[str, Any]:
    """Requested vs predicted (e.g. age): line fit, and mean/std of predictions per requested level."""
    r = np.asarray(requested, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    levels = {}
    for v in np.unique(r):
        sel = p[r == v]
        levels[format(float(v), "g")] = {"n": int(sel.size), "mean": float(sel.mean()),
                                         "std": float(sel.std(ddof=1)) if sel.size > 1 else 0.0}
    return {**line_fit(r, p), "levels": levels}


def pairing_key(record: Mapping[str, Any], field: str) -> tuple | None:
    """Samples with equal keys started from the same noise and were asked for the same conditions
    except ``field``: (seed, the request's other conditions). None without a recorded seed.

    The request names conditions (``disease``), the record fields (``diagnosis``); the condition
    that set ``field`` is the one whose requested value is the record's value."""
    req = record.get("request") or {}
    seed = req.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        return None
    own = _norm(record.get(field))
    others = sorted((str(k), _norm(v)) for k, v in (req.get("conditions") or {}).items() if _norm(v) != own)
    return (seed, *others)


def _norm(v: Any) -> str | None:
    from .data import label_of

    return label_of(float(v)) if isinstance(v, int) and not isinstance(v, bool) else label_of(v)


def _groups(keys: Sequence[tuple | None]) -> dict[tuple, list[int]]:
    out: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        if k is not None:
            out.setdefault(k, []).append(i)
    return out


def paired_shifts(classes: Sequence[str], requested: Sequence[str | None], keys: Sequence[tuple | None],
                  proba: np.ndarray) -> dict[str, Any]:
    """Paired direction of a class task: within each group of samples that share noise and other
    conditions (:func:`pairing_key`) and ask for at least two of the classes, the shift of class c's
    probability between samples asking for c and those asking for another class, averaged over the
    group's classes (for two classes: p_b(asked b) - p_b(asked a)). A group moved when its shift is
    positive; ``p`` is the one-sided sign test over groups (ties dropped)."""
    classes = [str(c) for c in classes]
    P = np.asarray(proba, dtype=np.float64)
    shifts = []
    for idx in _groups(keys).values():
        asked = {c: [i for i in idx if requested[i] == c] for c in classes}
        present = [c for c in classes if asked[c]]
        if len(present) < 2:
            continue
        d = []
        for c in present:
            j = classes.index(c)
            rest = [i for o in present if o != c for i in asked[o]]
            d.append(P[asked[c], j].mean() - P[rest, j].mean())
        shifts.append(float(np.mean(d)))
    return _direction(shifts, "mean_shift")


def paired_sweep(requested: Sequence[float], predicted: Sequence[float], keys: Sequence[tuple | None]) -> dict[str, Any]:
    """Paired sweep: the slope of predicted on requested value within each group that shares noise
    and other conditions and asks for at least two values; a group moved when its slope is positive."""
    r = np.asarray(requested, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    slopes = [line_fit(r[idx], p[idx])["slope"] for idx in _groups(keys).values() if np.unique(r[idx]).size >= 2]
    return _direction(slopes, "mean_slope")


def _direction(values: Sequence[float], name: str) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    up, down = int((v > 0).sum()), int((v < 0).sum())
    return {"n_groups": int(v.size), name: float(v.mean()) if v.size else math.nan,
            "moved": up / v.size if v.size else math.nan, "n_moved": up, "n_against": down, "p": sign_test(up, down)}


# ---- fitting probes through g3n-probe and applying them -------------------------------------


def _labels(records: Sequence[Mapping[str, Any]], field: str) -> list[str | None]:
    from .data import label_of

    return [label_of(r.get(field)) for r in records]


def _fold_probes(X: np.ndarray, y: Sequence[str], folds: np.ndarray, n_splits: int, protocol: Any) -> Iterator[tuple[np.ndarray, Any]]:
    """Per fold: (its test mask, the classifier fitted on the other folds, or the one class they
    hold: a small cohort's fold can leave one class to train on, and then predicts it, as any probe would)."""
    from g3n_probe import fit_classifier

    yarr = np.asarray(y, dtype=object)
    for k in range(n_splits):
        test = folds == k
        train_classes = sorted(set(yarr[~test]))
        yield test, (train_classes[0] if len(train_classes) < 2 else fit_classifier(X[~test], yarr[~test], protocol)[0])


def _fill(proba: np.ndarray, rows: np.ndarray, classes: Sequence[str], fit: Any, X: np.ndarray) -> None:
    """Write a fold's predictions of ``X`` into ``proba[rows]`` (columns in ``classes`` order)."""
    if isinstance(fit, str):
        proba[rows, list(classes).index(fit)] = 1.0
        return
    P = fit.predict_scores(X)
    for j, c in enumerate(fit.classes):
        proba[rows, list(classes).index(c)] = P[:, j]


def cv_predictions(X: np.ndarray, y: Sequence[str], groups: Sequence[str], protocol: Any,
                   n_splits: int, folds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Subject-grouped cross-validated predictions on real data (the 'real' column). ``folds``:
    a fold number per sample (default: g3n-probe's stratified, subject-grouped assignment)."""
    from g3n_probe import assign_folds

    if folds is None:
        folds = assign_folds(list(groups), list(y), n_splits, protocol.seed)
    classes = sorted(set(y))
    proba = np.zeros((len(y), len(classes)))
    for test, fit in _fold_probes(X, y, folds, n_splits, protocol):
        _fill(proba, np.flatnonzero(test), classes, fit, X[test])
    pred = np.asarray(classes, dtype=object)[np.argmax(proba, axis=1)]
    return pred, proba, classes


def recon_column(X: np.ndarray, y: Sequence[str], keys: Sequence[str], groups: Sequence[str], folds: np.ndarray,
                 n_splits: int, protocol: Any, classes: Sequence[str], recon: Any, permutations: int = 0,
                 seed: int = 0) -> dict[str, Any]:
    """The real column's probes applied to the tokenizer's reconstructions of the volumes they held out.

    Decoded samples can only show a class the probe still sees after a volume has been through the
    tokenizer: a probe fitted on real features that cannot tell the *reconstructed* real classes apart
    judges decoded samples as blindly as one that cannot tell the real ones apart. Each
    reconstruction (``recon``: a FeatureSet whose keys are the real volumes' keys) is scored by the
    fold's probe that did not see its volume. With ``permutations``, its AUC is tested against the
    reconstructions' labels shuffled between subjects (g3n-probe's scheme; the scores stay, so
    nothing is refitted): ``blind`` when p > :data:`BLIND_P`; without the test, at AUC <= :data:`BLIND_AUC`."""
    from g3n_probe.permutation import block_permutation, null_bound, p_value

    at = {str(k): i for i, k in enumerate(recon.keys)}
    pairs = [(j, at[str(k)]) for j, k in enumerate(keys) if str(k) in at]
    out: dict[str, Any] = {"n": len(pairs), "auc": math.nan}
    if not pairs:
        out["blind"] = True
        return out
    proba = np.zeros((len(pairs), len(classes)))
    real_idx = np.asarray([j for j, _ in pairs], dtype=np.int64)
    rec_idx = np.asarray([r for _, r in pairs], dtype=np.int64)
    for test, fit in _fold_probes(X, y, folds, n_splits, protocol):
        rows = np.flatnonzero(test[real_idx])
        if rows.size:
            _fill(proba, rows, classes, fit, recon.X[rec_idx[rows]])
    labels = np.asarray([str(y[j]) for j in real_idx], dtype=object)
    out["auc"] = auc_ovr(list(labels), proba, list(classes))
    if permutations:
        rng = np.random.default_rng(seed)
        subj = [str(groups[j]) for j in real_idx]
        null = [auc_ovr(list(labels[block_permutation(subj, rng)]), proba, list(classes)) for _ in range(permutations)]
        out["permutation"] = {"permutations": permutations, "p": p_value(out["auc"], null, "auc"),
                              "null95": null_bound(null, "auc")}
    out["blind"] = is_blind(out)
    return out


def recon_sweep(X: np.ndarray, values: Sequence[float], groups: Sequence[str], keys: Sequence[str], recon: Any,
                protocol: Any, n_splits: int) -> dict[str, Any]:
    """A sweep's regression probe, cross-validated by subject on real data, applied to held-out real
    volumes (``real``) and to the reconstructions of the same volumes (``recon``): true vs predicted
    value, line fit and mean absolute error of each. Where the reconstructions' slope collapses, the
    probe cannot read the value off decoded volumes, and a decoded sweep cannot show it either."""
    from g3n_probe import assign_folds, fit_regressor

    at = {str(k): i for i, k in enumerate(recon.keys)}
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(groups, dtype=object)
    k = min(n_splits, len(set(groups)))
    folds = assign_folds(list(groups), ["all"] * len(v), k, protocol.seed)
    real_pred = np.full(len(v), np.nan)
    rec_pred = np.full(len(v), np.nan)
    for fold in range(k):
        test = folds == fold
        probe, _ = fit_regressor(X[~test], v[~test], protocol, g[~test])
        real_pred[test] = probe.predict_scores(X[test])
        rows = [j for j in np.flatnonzero(test) if str(keys[j]) in at]
        if rows:
            rec_pred[rows] = probe.predict_scores(recon.X[[at[str(keys[j])] for j in rows]])

    def fit(pred: np.ndarray) -> dict[str, Any]:
        ok = np.isfinite(pred)
        return {**line_fit(v[ok], pred[ok]), "n": int(ok.sum()),
                "mae": float(np.abs(pred[ok] - v[ok]).mean()) if ok.any() else math.nan}

    has = np.isfinite(rec_pred)
    return {"folds": k, "real": fit(np.where(has, real_pred, np.nan)), "recon": fit(rec_pred)}


def real_cv(X: np.ndarray, y: Sequence[str], groups: Sequence[str], protocol: Any, n_splits: int,
            classes: Sequence[str], folds: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """The real column: cross-validated predictions and probabilities in ``classes`` order (a class
    absent from ``y`` keeps p = 0). The real labels and every shuffle of them go through this one path."""
    pred, proba, have = cv_predictions(X, y, groups, protocol, n_splits, folds)
    P = np.zeros((len(y), len(classes)))
    for j, c in enumerate(have):
        P[:, list(classes).index(c)] = proba[:, j]
    return list(pred), P


def _shuffled_auc(X: np.ndarray, ys: np.ndarray, groups: Sequence[str], protocol: Any, n_splits: int,
                  folds: np.ndarray, classes: Sequence[str]) -> float:
    _, P = real_cv(X, list(ys), groups, protocol, n_splits, classes, folds)
    return auc_ovr(list(ys), P, list(classes))


def real_null(X: np.ndarray, y: Sequence[str], groups: Sequence[str], protocol: Any, n_splits: int,
              classes: Sequence[str], permutations: int, seed: int, folds: np.ndarray | None = None) -> list[float]:
    """AUCs of the real column's cross-validation re-run on shuffled labels: what a probe that can
    see nothing of the task scores on these subjects by luck. Labels move between subjects as in
    g3n-probe's permutation test (whole subjects of equal size, then within each subject); the
    folds stay those of the real labels (``folds``, the real column's; default: assigned here as
    :func:`cv_predictions` does). The shuffles are drawn here, in order, from ``seed``; with
    the protocol's ``n_jobs`` > 1 their cross-validations run in that many processes (a logistic
    fit holds the GIL), with the same results."""
    from g3n_probe import assign_folds
    from g3n_probe.permutation import block_permutation
    from joblib import Parallel, delayed

    if folds is None:
        folds = assign_folds(list(groups), list(y), n_splits, protocol.seed)
    rng = np.random.default_rng(seed)
    yarr = np.asarray(y, dtype=object)
    shuffled = [yarr[block_permutation(groups, rng)] for _ in range(permutations)]
    if protocol.n_jobs > 1 and permutations > 1:
        one = protocol.model_copy(update={"n_jobs": 1})
        return list(Parallel(n_jobs=protocol.n_jobs, backend="loky")(
            delayed(_shuffled_auc)(X, ys, groups, one, n_splits, folds, classes) for ys in shuffled))
    return [_shuffled_auc(X, ys, groups, protocol, n_splits, folds, classes) for ys in shuffled]


def real_permutation(real: Mapping[str, Any], null: Sequence[float]) -> dict[str, Any]:
    """The real column's permutation test: p of its AUC among the shuffled ones, and the AUC to beat."""
    from g3n_probe.permutation import null_bound, p_value

    return {"permutations": len(null), "p": p_value(real["auc"], null, "auc"), "null95": null_bound(null, "auc")}


#: A probe whose real column's permutation p is above this cannot tell the real classes apart.
BLIND_P = 0.05
#: Without a permutation test (``permutations=0``, a row over ``permutation_max_subjects``, older
#: documents): the cross-validated AUC on real data at or under which a probe counts as blind.
BLIND_AUC = 0.55
#: Rows whose probe is fitted on more subjects skip the permutation test by default: there the null
#: is narrow (the 95th percentile of a two-class AUC on 250 + 250 subjects is about 0.54, close to
#: :data:`BLIND_AUC`), and 99 cross-validations of a paper-sized slice would take hours.
PERMUTATION_MAX_SUBJECTS = 500


def is_blind(real: Mapping[str, Any] | None) -> bool:
    """Whether a row's probe is blind: it does not tell the real classes apart, so its verdict on
    generated samples (cond, paired) cannot show controllability either way. With a permutation
    test: p > :data:`BLIND_P` (on a few dozen subjects a probe that sees nothing often reaches AUC
    0.7); without one: AUC <= :data:`BLIND_AUC`."""
    real = real or {}
    p = (real.get("permutation") or {}).get("p")
    if isinstance(p, float) and not math.isnan(p):
        return p > BLIND_P
    auc = real.get("auc")
    return isinstance(auc, float) and auc <= BLIND_AUC


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
    from .data import label_of

    asked = [r for r in generated_records
             if (label_of(r.get(field)) in classes if classes is not None else r.get(field) is not None)]
    out: dict[str, str] = {}
    for g in match:
        values = {label_of(r.get(g)) for r in asked}
        if g != field and len(values) == 1 and None not in values:
            out[g] = values.pop()
    return out


def _in_slice(records: Sequence[Mapping[str, Any]], where: Mapping[str, str]) -> list[int]:
    from .data import label_of

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
    from g3n_probe import assign_folds, fit_classifier, fit_regressor, protocol_preset
    from g3n_probe.permutation import slice_seed

    from .data import InputError

    if permutations < 0:
        raise InputError(f"permutations must be >= 0, got {permutations}")
    protocol = protocol or protocol_preset("paper")
    if real.dim != generated.dim:
        raise InputError(f"real features are {real.dim}-d, generated {generated.dim}-d: not the same encoder")
    out: dict[str, Any] = {"tasks": {}, "sweeps": {}, "skipped": {}}
    for task in tasks:
        y_all = _labels(real.records, task.field)
        where = real_slice(generated.records, task.field, task.classes, match)
        keep = [i for i in _in_slice(real.records, where) if y_all[i] in task.classes]
        if len({y_all[i] for i in keep}) < 2:  # the slice lacks a class: fit on every real sample
            where = {}
            keep = [i for i, v in enumerate(y_all) if v in task.classes]
        present = sorted({y_all[i] for i in keep})
        if len(present) < 2:
            out["skipped"][task.name] = f"real data have {present or 'no'} of classes {list(task.classes)}"
            continue
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
        Pg = probe.predict_scores(generated.X[sel]) if sel else np.zeros((0, len(probe.classes)))
        proba_g = np.zeros((len(sel), len(task.classes)))  # classes absent from training keep p = 0
        for j, c in enumerate(probe.classes):
            proba_g[:, task.classes.index(c)] = Pg[:, j]
        row = class_controllability(task.classes, [gen_req[i] for i in sel], proba_g, y, real_pred, real_proba)
        if permutations and "real" in row and permutation_max_subjects is not None and n_subjects > permutation_max_subjects:
            row["real"]["permutation_skipped"] = (f"{n_subjects} subjects > {permutation_max_subjects}: the AUC rule "
                                                  f"(blind at <= {BLIND_AUC}) decides")
        elif permutations and "real" in row:
            seed = slice_seed(protocol.seed, f"controllability:{task.name}", ",".join(f"{g}={v}" for g, v in where.items()))
            null = real_null(X, y, groups, protocol, k, task.classes, permutations, seed, folds)
            row["real"]["permutation"] = real_permutation(row["real"], null)
        if "real" in row:
            row["real"]["blind"] = is_blind(row["real"])
        if recon is not None and folds is not None:
            row["recon"] = recon_column(X, y, [real.keys[i] for i in keep], groups, folds, k, protocol, task.classes,
                                        recon, permutations, slice_seed(protocol.seed, f"recon:{task.name}", ""))
        row["field"] = task.field
        row["real_slice"] = where
        row["paired"] = paired_shifts(task.classes, [gen_req[i] for i in sel],
                                      [pairing_key(generated.records[i], task.field) for i in sel], proba_g)
        out["tasks"][task.name] = row
    for field in sweeps:
        ys = [r.get(field) for r in real.records]
        where = real_slice(generated.records, field, None, match)
        keep = [i for i in _in_slice(real.records, where) if ys[i] is not None]
        if len(keep) < 3:
            where, keep = {}, [i for i, v in enumerate(ys) if v is not None]
        if len(keep) < 3:
            out["skipped"][f"{field}:sweep"] = f"only {len(keep)} real samples with {field}"
            continue
        groups = np.asarray([str(real.records[i].get("subject") or real.keys[i]) for i in keep])
        probe, _ = fit_regressor(real.X[keep], np.asarray([ys[i] for i in keep], dtype=np.float64), protocol, groups)
        req = [r.get(field) for r in generated.records]
        gsel = [i for i, v in enumerate(req) if v is not None]
        if len(gsel) < 2:
            out["skipped"][f"{field}:sweep"] = f"only {len(gsel)} generated samples requested a {field}"
            continue
        pred = probe.predict_scores(generated.X[gsel])
        out["sweeps"][field] = value_sweep([float(req[i]) for i in gsel], pred)
        out["sweeps"][field]["real_slice"] = where
        out["sweeps"][field]["paired"] = paired_sweep([float(req[i]) for i in gsel], pred,
                                                      [pairing_key(generated.records[i], field) for i in gsel])
        if recon is not None and len(set(groups)) >= 2:
            out["sweeps"][field]["recon"] = recon_sweep(real.X[keep], [float(ys[i]) for i in keep], list(groups),
                                                        [real.keys[i] for i in keep], recon, protocol, n_splits)
    return out


#: The rows of the paper's Table 2a, as (metadata field, classes).
PAPER_TASKS = ("diagnosis:HC,AD", "diagnosis:HC,MCI", "diagnosis:MCI,AD", "diagnosis:HC,PD", "sex:F,M",
               "modality:T1,T2,FLAIR,T1c", "idh1:wildtype,mutant")


#: Where the probes look. ``volume``: the paper's protocol (generated latents decoded, re-encoded
#: by the MAE encoder, probed like real embeddings). ``latent``: probes on the projected token
#: features themselves (real latents vs generated latents, mean over tokens, as in Table 5's
#: probe columns): what the generator controls, without the tokenizer's decoder in between.
SPACES = ("volume", "latent")


def latent_features(real: Any, generated: Any, limit: int | None = None) -> tuple[Any, Any]:
    """FeatureSets of two ``latents`` sets of one tokenizer: each sample's latent averaged over tokens."""
    from g3n_probe import load_features

    from .data import InputError, open_set

    sets = {"real": open_set(real), "generated": open_set(generated)}
    for role, ss in sets.items():
        if ss.kind != "latents":
            raise InputError(f"{ss.location}: --space latent needs a latents set as {role}, got a {ss.kind} set")
    digests = {role: getattr(ss.manifest.tokenizer, "checkpoint_digest", None) for role, ss in sets.items()}
    if digests["real"] != digests["generated"]:
        raise InputError(f"{generated}: its latents come from tokenizer {digests['generated']}, the real ones in {real} from "
                         f"{digests['real']}: latent features are only comparable within one tokenizer")
    real_fs = load_features(real, latent_reduce="mean")
    gen_fs = load_features(generated, latent_reduce="mean")
    if limit is not None:
        gen_fs = gen_fs.subset(list(gen_fs.keys)[:limit])
    return real_fs, gen_fs


def run_controllability(real: Any, generated: Any, out: Any, tasks: Sequence[str] = PAPER_TASKS,
                        sweeps: Sequence[str] = ("age",), encoder: Any = None, tokenizers: Any = None,
                        protocol: Any = None, n_splits: int = 5, limit: int | None = None,
                        progress: bool = True, space: str = "volume", match: Sequence[str] = MATCH_FIELDS,
                        permutations: int = 0, permutation_max_subjects: int | None = PERMUTATION_MAX_SUBJECTS,
                        recon: Any = None) -> dict[str, Any]:
    """Table 2a from a real feature source and a generated set (tokens / feature table, or a
    latents set that is decoded through the registry and re-encoded by the MAE encoder); with
    ``space="latent"``, from a real and a generated latents set directly (:data:`SPACES`).
    ``recon``: the tokenizer's reconstructions of the real volumes (volumes set, re-encoded like the
    generated ones), for each row's ``recon`` column; volume space only."""
    from pathlib import Path

    from g3n_probe import protocol_preset

    from .figures import volume_montage
    from .records import input_ref, write_metrics
    from .sources import features_of, request_settings

    from .data import InputError

    if space not in SPACES:
        raise InputError(f"space {space!r}: expected one of {', '.join(SPACES)}")
    out = Path(out)
    protocol = protocol or protocol_preset("paper")
    gen_vols = None
    recon_fs = None
    if space == "latent":
        if recon is not None:
            raise InputError("--recon measures decoded volumes: it needs --space volume")
        real_fs, gen_fs = latent_features(real, generated, limit)
    else:
        real_fs, _ = features_of(real, encoder, tokenizers, None, progress)
        gen_fs, gen_vols = features_of(generated, encoder, tokenizers, limit, progress)
        if recon is not None:
            recon_fs, _ = features_of(recon, encoder, tokenizers, None, progress)
            if not set(map(str, recon_fs.keys)) & set(map(str, real_fs.keys)):
                raise InputError(f"{recon}: none of its keys is a key of {real}: not reconstructions of these real volumes")
    parsed = [ClassTask.parse(t) for t in tasks]
    res = evaluate(real_fs, gen_fs, parsed, sweeps, protocol, n_splits, match, permutations, permutation_max_subjects,
                   recon_fs)
    figures: dict[str, str] = {}
    if gen_vols is not None:  # condition sweeps as images: first sample per requested value
        for field in [*sweeps, *dict.fromkeys(t.field for t in parsed)]:
            by_value: dict[str, Any] = {}
            for m, v in zip(gen_vols.metas, gen_vols.arrays):
                val = m.get(field)
                if val is not None and str(val) not in by_value:
                    by_value[str(val)] = v
            if len(by_value) >= 2:
                order = sorted(by_value, key=lambda s: (float(s) if _isnum(s) else float("inf"), s))
                name = f"sweep_{field}.png"
                volume_montage([by_value[k] for k in order], [f"{field}={k}" for k in order], out / name)
                figures[f"sweep_{field}"] = name
    settings = {
        "probe": {"kind": "g3n-probe linear (logistic / ridge)", "protocol": protocol.model_dump(mode="json"),
                  "real_cv_folds": n_splits, "real_permutations": permutations,
                  "real_permutation_max_subjects": permutation_max_subjects, "trained_on": "real features",
                  "matched_on": list(match)},
        "space": space,
        "generated_path": "decoded by the tokenizer and re-encoded by the MAE encoder" if gen_vols is not None
        else "latents averaged over tokens (no decoding)" if space == "latent" else "features given",
        "encoder": None if encoder is None else {"weights": encoder.weights, "digest": encoder.digest},
        "tokenizers": tokenizers.provenance() if tokenizers is not None else [],
        "generation": request_settings(gen_fs.records),
        "tasks": list(tasks), "sweeps": list(sweeps), "limit": limit,
        "arms": {"cond": "generated with the class requested", "null": "generated with the condition not requested",
                 "prior": "majority class of the real training set"},
    }
    inputs = [input_ref(real, "real features"), input_ref(generated, "generated")]
    if recon is not None:
        inputs.append(input_ref(recon, "reconstructed real volumes"))
    return write_metrics(out / "controllability.json", "controllability", settings, inputs, {**res, "figures": figures})


def _isnum(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
