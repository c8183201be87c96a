"""The Table-2a columns from probe outputs: pure functions of predictions, no fitting.

* :func:`class_controllability`: the cond, null and prior columns (and real, given the
  cross-validated predictions) of one class task;
* :func:`value_sweep`: requested vs predicted value of a continuous condition;
* :func:`pairing_key`, :func:`paired_shifts`, :func:`paired_sweep`: the paired column, within
  groups of samples that share their noise and their other conditions.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..stats import auc_ovr, line_fit, sign_test


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
            from ..data import InputError

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
    from ..data import label_of

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
