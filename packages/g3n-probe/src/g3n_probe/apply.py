"""Apply saved probes to new embeddings (e.g. a hospital site scoring its own cached features).

A probe knows its slice: a ``T1`` probe scores T1 volumes, a ``pooled`` probe scores
session means, exactly as in training. When the new data carry the task's labels, the
metrics are reported too.

Two guarantees:

* **nothing is lost silently.** A sample no probe can score (bad row, see
  :mod:`g3n_probe.features`) or one a probe's slice cannot take (no modality for a ``T1``
  probe, no subject, no session for ``pooled``, a session with fewer volumes than the probe was
  trained on) is one line of ``rejects.jsonl``; the rest are scored.
* **a probe only scores the features it was trained on.** Width is not enough: a probe on
  96-d token means would happily score 96-d latent means. ``probe.json`` records the training
  features (``feature_source``: kind, reduction, encoder/tokenizer checkpoint digest); a
  mismatch is refused (:class:`FeatureMismatchError`) unless explicitly allowed, which turns it
  into a warning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import MODALITIES, TaskSpec
from .features import FeatureSet
from .linear import LinearProbe, ProbeFileError
from .metrics import classification_metric, regression_metric
from .rejects import STEP_SLICE, Reject, write_rejects
from .report import _csv
from .atomic import write_text
from .slices import build_view
from .targets import extract_labels, session_id

SUMMARY_COLUMNS = ["probe", "task", "slice", "metric", "value", "units", "labelled", "rejected"]
OVERRIDE_HINT = "--allow-feature-mismatch (allow_mismatch=True) scores anyway"


class FeatureMismatchError(ProbeFileError):
    """Features of another kind, reduction or encoder than the probe was trained on."""


def find_probes(paths: list[str | Path], include_folds: bool = False) -> list[Path]:
    """Probe folders under the given paths: a probe folder itself, a run folder, or any parent."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "probe.json").is_file():
            found.append(p)
            continue
        if not p.is_dir():
            raise ProbeFileError(f"{p}: not a probe folder or a run folder")
        hits = sorted(j.parent for j in p.rglob("probe.json"))
        if not include_folds:
            hits = [h for h in hits if not h.name.startswith("fold")]
        if not hits:
            raise ProbeFileError(f"{p}: no probe.json found below it")
        found.extend(hits)
    return found


def feature_kind(source: Mapping[str, Any]) -> str | None:
    """What a feature vector *is*, from a feature-source record, or None when unrecorded.

    Tokens sets give the mean over tokens whichever array is read (the stored ``mean`` is that
    mean, computed before float16 storage), so ``array`` does not change the kind; latents give
    a flattened grid or a mean over tokens, which are different features.
    """
    kind = source.get("kind")
    if kind == "tokens":
        return "tokens (mean over tokens)"
    if kind == "latents":
        return f"latents (latent_reduce={source.get('latent_reduce') or 'flatten'})"
    return None  # a feature table or in-memory arrays do not record what made them


def _describe(source: Mapping[str, Any]) -> str:
    kind = feature_kind(source)
    if kind is None:
        kind = "a feature table" if source.get("type") == "table" else f"{source.get('type') or 'unrecorded'} features"
    enc = source.get("encoder") or {}
    if enc.get("name") or enc.get("checkpoint_digest"):
        kind += f" by {enc.get('role', 'encoder')} {enc.get('name')!r}"
    return kind


def _encoder_digest(source: Mapping[str, Any]) -> str | None:
    enc = source.get("encoder")
    return enc.get("checkpoint_digest") if isinstance(enc, Mapping) else None


def feature_mismatches(info: Mapping[str, Any], fs: FeatureSet) -> tuple[list[str], list[str]]:
    """Compare the probe's recorded training features with ``fs``.

    Returns (mismatches, notes): a mismatch is a recorded difference (kind or latent reduction;
    encoder/tokenizer checkpoint when both sides name one); a note says what could not be
    checked because one side does not record it (a feature table, in-memory arrays).
    """
    trained = info.get("feature_source") or {}
    new = fs.source or {}
    bad: list[str] = []
    notes: list[str] = []
    tk, nk = feature_kind(trained), feature_kind(new)
    if tk is not None and nk is not None:
        if tk != nk:
            bad.append("a different feature kind or reduction")
    elif tk != nk:
        notes.append(f"features {new.get('path') or fs.name} ({_describe(new)}) cannot be checked against "
                     f"probes trained on {_describe(trained)}: one side does not record its feature kind")
    td, nd = _encoder_digest(trained), _encoder_digest(new)
    if td and nd and td != nd:
        bad.append(f"a different encoder/tokenizer checkpoint (trained on {td}, given {nd})")
    return bad, notes


def check_features(
    probe: LinearProbe, fs: FeatureSet, name: str, folder: str | Path | None = None, allow_mismatch: bool = False
) -> tuple[str | None, list[str]]:
    """Refuse features the probe cannot or must not score.

    A width mismatch is always an error (no override can score it). A kind/reduction/encoder
    mismatch raises :class:`FeatureMismatchError`, naming the probe folder and both feature
    sources, unless ``allow_mismatch``. Returns (the mismatch, when allowed; notes on what could
    not be checked); the mismatch text leaves the probe out so callers can group probes by it.
    """
    where = str(folder) if folder is not None else name
    trained = probe.info.get("feature_source") or {}
    src = fs.source.get("path") or fs.name
    origin = f" from {trained['path']}" if trained.get("path") else ""
    if fs.dim != probe.n_features:
        raise ProbeFileError(
            f"probe {where} expects {probe.n_features}-d features ({_describe(trained)}{origin}); "
            f"{src} has {fs.dim}-d ({_describe(fs.source)})"
        )
    bad, notes = feature_mismatches(probe.info, fs)
    if not bad:
        return None, notes
    what = f"features {src} are {_describe(fs.source)}, not {_describe(trained)}{origin}: {'; '.join(bad)}"
    if not allow_mismatch:
        raise FeatureMismatchError(f"probe {where}: {what}. Refused, its predictions would be meaningless; "
                                   f"{OVERRIDE_HINT}")
    return what, notes


@dataclass
class Applied:
    """Predictions of one probe on one feature set, with metrics when labels are present, the
    samples its slice refused, and what the user must be warned of."""

    name: str
    task: str
    slice: str
    rows: list[dict[str, Any]]
    metrics: dict[str, float] = field(default_factory=dict)
    labelled: int = 0
    rejects: list[Reject] = field(default_factory=list)
    mismatch: str | None = None  # the allowed feature mismatch it was scored despite
    notes: list[str] = field(default_factory=list)  # what could not be checked


def slice_candidates(
    slice_name: str, fs: FeatureSet, probe_name: str, min_modalities: int = 1
) -> tuple[np.ndarray, list[Reject]]:
    """Rows the probe's slice can take, and a Reject for each row whose metadata keeps it out.

    A row of another modality is simply outside a per-modality slice (not a reject); a row whose
    modality is unknown might belong, so it is refused with its reason. Every unit needs a
    subject (predictions are named and grouped by it); a pooled unit is one session, so it needs
    a session, and at least ``min_modalities`` volumes, as in training.
    """
    where = str(fs.source.get("path") or fs.name)
    rejects: list[Reject] = []
    ok: list[int] = []
    for i, r in enumerate(fs.records):
        subj = r.get("subject")
        if subj in (None, ""):
            why = "metadata has no subject; every prediction is named and grouped by subject"
        elif slice_name in MODALITIES and not r.get("modality"):
            why = f"metadata has no modality; the {slice_name} probe scores {slice_name} volumes only"
        elif slice_name == "pooled" and not r.get("session"):
            why = "metadata has no session; the pooled probe scores the mean of one session's volumes"
        else:
            ok.append(i)
            continue
        rejects.append(Reject(fs.keys[i], where, STEP_SLICE, why, subj, probe_name))
    if slice_name == "pooled" and min_modalities > 1:
        groups: dict[str, list[int]] = {}
        for i in ok:
            groups.setdefault(session_id(fs.records[i]), []).append(i)
        short = {i for g in groups.values() if len(g) < min_modalities for i in g}
        for i in sorted(short):
            n = len(groups[session_id(fs.records[i])])
            rejects.append(Reject(fs.keys[i], where, STEP_SLICE,
                                  f"session {session_id(fs.records[i])} has {n} volume(s); the pooled probe was trained "
                                  f"on sessions with at least {min_modalities}", fs.records[i].get("subject"), probe_name))
        ok = [i for i in ok if i not in short]
    return np.asarray(ok, dtype=np.int64), rejects


def apply_probe(
    probe: LinearProbe,
    fs: FeatureSet,
    name: str | None = None,
    folder: str | Path | None = None,
    allow_mismatch: bool = False,
) -> Applied:
    """Score every unit of the probe's slice in ``fs``; refuse incompatible features
    (:func:`check_features`) and record the rows the slice cannot take (:func:`slice_candidates`)."""
    info = probe.info
    slice_name = info.get("slice", "all")
    task_doc = info.get("task")
    task = TaskSpec.model_validate(task_doc) if task_doc else None
    task_name = task.name if task else info.get("task_name", "probe")
    label = name or f"{task_name}__{slice_name}"
    mismatch, notes = check_features(probe, fs, label, folder, allow_mismatch)
    min_mod = int(info.get("protocol", {}).get("pooled_min_modalities", 1))
    idx, rejects = slice_candidates(slice_name, fs, label, min_mod)
    view = build_view(slice_name, fs.X, fs.records, idx, min_mod)
    out = Applied(label, task_name, slice_name, [], rejects=rejects, mismatch=mismatch, notes=notes)
    if len(view.members) == 0:
        return out
    scores = probe.predict_scores(view.X)
    y_true = None
    if task is not None:
        labels = extract_labels(task, fs.records)
        y_true = []
        for m in view.members:
            vals = {str(v) if task.kind == "classification" else float(v) for v in labels.y[m][labels.mask[m]]}
            y_true.append(vals.pop() if len(vals) == 1 and labels.mask[m].all() else None)
    for u in range(len(view.members)):
        row: dict[str, Any] = {"unit": view.unit_keys[u], "subject": view.subjects[u]}
        if probe.kind == "classification":
            row["y_pred"] = probe.classes[int(np.argmax(scores[u]))]
            row.update({f"p_{c}": float(scores[u, j]) for j, c in enumerate(probe.classes)})
        else:
            row["y_pred"] = float(scores[u])
        if y_true is not None:
            row["y_true"] = "" if y_true[u] is None else y_true[u]
        out.rows.append(row)
    if y_true is not None and task is not None:
        if probe.kind == "classification":
            sel = [u for u, v in enumerate(y_true) if v is not None and v in probe.classes]
        else:
            sel = [u for u, v in enumerate(y_true) if v is not None]
        out.labelled = len(sel)
        if sel:
            yt = np.asarray([y_true[u] for u in sel], dtype=object if probe.kind == "classification" else np.float64)
            for m in task.metric_names():
                if probe.kind == "classification":
                    out.metrics[m] = classification_metric(m, yt, scores[sel], probe.classes)
                else:
                    out.metrics[m] = regression_metric(m, yt, scores[sel])
    return out


def probe_name(folder: Path) -> str:
    """Output name of a probe folder: its own name, prefixed by its parent's for fold probes."""
    return folder.name if not folder.name.startswith("fold") else f"{folder.parent.name}__{folder.name}"


def recorded_latent_reduce(probes: Sequence[LinearProbe]) -> str | None:
    """The latent reduction the probes were trained with, when they agree on one (so ``apply``
    reads a latents set the way the probes need without the user repeating it); else None."""
    seen = {(p.info.get("feature_source") or {}).get("latent_reduce") for p in probes} - {None}
    return seen.pop() if len(seen) == 1 else None


def apply_probes(
    probe_dirs: list[Path],
    fs: FeatureSet,
    out_dir: str | Path | None = None,
    rejects: Sequence[Reject] = (),
    allow_mismatch: bool = False,
    probes: Sequence[LinearProbe] | None = None,
) -> list[Applied]:
    """Apply each probe folder; with ``out_dir`` write ``<name>.csv`` per probe, ``summary.csv``
    and ``rejects.jsonl`` (``rejects``: rows refused while reading ``fs``, plus each probe's).

    Every probe's features are checked before anything is scored or written, so a refusal
    leaves no partial output. ``probes``: the loaded probes of ``probe_dirs``, if already loaded.
    """
    loaded = list(probes) if probes is not None else [LinearProbe.load(d) for d in probe_dirs]
    for d, probe in zip(probe_dirs, loaded):
        check_features(probe, fs, probe_name(d), d, allow_mismatch)
    results = [apply_probe(p, fs, name=probe_name(d), folder=d, allow_mismatch=allow_mismatch)
               for d, p in zip(probe_dirs, loaded)]
    if out_dir is not None:
        out = Path(out_dir)
        summary = []
        for a in results:
            if a.rows:
                write_text(out / f"{a.name}.csv", _csv(a.rows, list(a.rows[0].keys())))
            base = {"probe": a.name, "task": a.task, "slice": a.slice, "units": len(a.rows), "labelled": a.labelled,
                    "rejected": len(a.rejects)}
            for m, v in a.metrics.items():
                summary.append({**base, "metric": m, "value": v})
            if not a.metrics:
                summary.append({**base, "metric": "", "value": math.nan})
        write_text(out / "summary.csv", _csv(summary, SUMMARY_COLUMNS))
        write_rejects(out, [*rejects, *(r for a in results for r in a.rejects)])
    return results
