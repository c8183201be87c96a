"""Apply saved probes to new embeddings (e.g. a hospital site scoring its own cached features).

A probe knows its slice: a ``T1`` probe scores T1 volumes, a ``pooled`` probe scores
session means, exactly as in training. When the new data carry the task's labels, the
metrics are reported too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import TaskSpec
from .features import FeatureSet
from .linear import LinearProbe, ProbeFileError
from .metrics import classification_metric, regression_metric
from .report import _csv
from .atomic import write_text
from .slices import build_view
from .targets import extract_labels


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


@dataclass
class Applied:
    """Predictions of one probe on one feature set, with metrics when labels are present."""

    name: str
    task: str
    slice: str
    rows: list[dict[str, Any]]
    metrics: dict[str, float] = field(default_factory=dict)
    labelled: int = 0


def apply_probe(probe: LinearProbe, fs: FeatureSet, name: str | None = None) -> Applied:
    """Score every unit of the probe's slice in ``fs``."""
    info = probe.info
    slice_name = info.get("slice", "all")
    task_doc = info.get("task")
    task = TaskSpec.model_validate(task_doc) if task_doc else None
    task_name = task.name if task else info.get("task_name", "probe")
    if fs.dim != probe.n_features:
        raise ProbeFileError(
            f"probe {name or task_name} expects {probe.n_features}-d features; {fs.name} has {fs.dim}-d"
        )
    min_mod = int(info.get("protocol", {}).get("pooled_min_modalities", 1))
    view = build_view(slice_name, fs.X, fs.records, np.arange(len(fs)), min_mod)
    out = Applied(name or f"{task_name}__{slice_name}", task_name, slice_name, [])
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


def apply_probes(probe_dirs: list[Path], fs: FeatureSet, out_dir: str | Path | None = None) -> list[Applied]:
    """Apply each probe folder; write ``<name>.csv`` per probe and ``summary.csv`` if ``out_dir``."""
    results = []
    for d in probe_dirs:
        probe = LinearProbe.load(d)
        name = d.name if not d.name.startswith("fold") else f"{d.parent.name}__{d.name}"
        results.append(apply_probe(probe, fs, name=name))
    if out_dir is not None:
        out = Path(out_dir)
        summary = []
        for a in results:
            if a.rows:
                write_text(out / f"{a.name}.csv", _csv(a.rows, list(a.rows[0].keys())))
            for m, v in a.metrics.items():
                summary.append({"probe": a.name, "task": a.task, "slice": a.slice, "metric": m, "value": v,
                                "units": len(a.rows), "labelled": a.labelled})
            if not a.metrics:
                summary.append({"probe": a.name, "task": a.task, "slice": a.slice, "metric": "", "value": math.nan,
                                "units": len(a.rows), "labelled": a.labelled})
        write_text(out / "summary.csv", _csv(summary, ["probe", "task", "slice", "metric", "value", "units", "labelled"]))
    return results
