"""Write a panel run to disk: results (CSV + Markdown), skipped tasks, per-fold predictions,
probe folders and a run record. Also the head-to-head table of ``compare``.

Layout of a run folder::

    results.csv  results.md  skipped.csv  run.json  panel.yaml
    predictions/<task>__<slice>.csv
    permutations/<task>__<slice>.csv                (permutation test: each metric per shuffle)
    probes/<task>__<slice>/probe.json + probe.npz   (fold probes: .../fold<k>/)
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_text
from .panel import PanelResult, SliceResult

#: ``chance``: the same folds scored by a constant predictor (training-part class frequencies or mean);
#: ``perm_p``: permutation p-value over ``permutations`` shuffles, ``perm_null95``: the score to beat
#: for p < 0.05 (the shuffled scores' 95th percentile, 5th for errors); empty where not tested
RESULT_COLUMNS = ["task", "slice", "metric", "mean", "sd", "chance", "perm_p", "perm_null95", "permutations", "folds",
                  "subjects", "volumes", "units", "classes", "notes"]


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return v


def _csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k, "")) for k in columns})
    return buf.getvalue()


def result_rows(res: PanelResult) -> list[dict[str, Any]]:
    """One row per (task, slice, metric)."""
    rows = []
    for r in res.results:
        for m in r.fold_metrics:
            mean, sd, n = r.summary(m)
            p, bound, n_perm = r.permutation(m)
            rows.append(
                {"task": r.task, "slice": r.slice, "metric": m, "mean": mean, "sd": sd, "chance": r.chance(m),
                 "perm_p": p, "perm_null95": bound, "permutations": n_perm or "", "folds": n,
                 "subjects": r.subjects, "volumes": r.volumes, "units": r.units,
                 "classes": len(r.classes) if r.classes else "", "notes": " | ".join(r.notes)}
            )
    return rows


def _pm(mean: float, sd: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def results_markdown(res: PanelResult) -> str:
    lines = [
        f"# Probe panel `{res.panel.name}` on `{res.feature_name}`",
        "",
        f"Features: {res.feature_dim}-d from {json.dumps(res.feature_source, sort_keys=True)}. "
        f"Protocol: {res.protocol.n_splits}-fold stratified subject-grouped CV, seed {res.protocol.seed} "
        f"(digest {res.protocol.digest()}); mean ± SD over folds; chance = the same folds scored by a constant "
        "predictor (the training part's class frequencies or mean)"
        + (f"; p = permutation test over {res.protocol.permutations} shuffles of the labels between subjects "
           "(same folds), with the score to beat for p < 0.05 in brackets." if res.protocol.permutations else "."),
        "",
        "| task | slice | metric | mean ± SD | chance | p (to beat) | folds | subjects | volumes | classes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result_rows(res):
        perm = "" if not row["permutations"] else f"{row['perm_p']:.3g} ({row['perm_null95']:.3f})"
        lines.append(
            f"| {row['task']} | {row['slice']} | {row['metric']} | {_pm(row['mean'], row['sd'])} | {_pm(row['chance'], math.nan)} "
            f"| {perm} | {row['folds']} "
            f"| {row['subjects']} | {row['volumes']} | {row['classes']} |"
        )
    if res.skipped:
        lines += ["", "## Skipped", "", "| task | slice | reason |", "|---|---|---|"]
        lines += [f"| {s.task} | {s.slice} | {s.reason} |" for s in res.skipped]
    notes = [(r.task, r.slice, n) for r in res.results for n in r.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {t}/{s}: {n}" for t, s, n in notes]
    return "\n".join(lines) + "\n"


def probe_info(res: PanelResult, r: SliceResult, fold: int | None = None) -> dict[str, Any]:
    """Provenance stored in probe.json: what the probe predicts and what it was trained on."""
    task = res.panel.task(r.task)
    return {
        "task": task.model_dump(mode="json", by_alias=True),
        "slice": r.slice,
        "fold": fold,
        "panel": res.panel.name,
        "feature_name": res.feature_name,
        "feature_source": res.feature_source,
        "feature_dim": res.feature_dim,
        "protocol": res.protocol.model_dump(mode="json"),
        "protocol_digest": res.protocol.digest(),
        "trained_on": {"subjects": r.subjects, "units": r.units, "volumes": r.volumes},
    }


def write_run(res: PanelResult, out_dir: str | Path) -> Path:
    """Write every output of a panel run under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result_rows(res)
    write_text(out / "results.csv", _csv(rows, RESULT_COLUMNS))
    write_text(out / "results.md", results_markdown(res))
    write_text(out / "skipped.csv", _csv([s.__dict__ for s in res.skipped], ["task", "slice", "reason"]))
    write_text(out / "panel.yaml", yaml.safe_dump(res.panel.model_dump(mode="json", by_alias=True), sort_keys=False))
    for r in res.results:
        stem = f"{r.task}__{r.slice}"
        if len(r.predictions):
            write_text(out / "predictions" / f"{stem}.csv", _csv(r.predictions, list(r.predictions.columns)))
        if r.null_metrics:
            metrics = list(r.null_metrics)
            shuffles = [{"permutation": b, **{m: r.null_metrics[m][b] for m in metrics}}
                        for b in range(len(r.null_metrics[metrics[0]]))]
            write_text(out / "permutations" / f"{stem}.csv", _csv(shuffles, ["permutation", *metrics]))
        if r.probe is not None:
            r.probe.save(out / "probes" / stem, extra=probe_info(res, r))
        for k, p in enumerate(r.fold_probes):
            if p is not None:
                p.save(out / "probes" / stem / f"fold{k}", extra=probe_info(res, r, fold=k))
    run = {
        "feature_name": res.feature_name,
        "feature_source": res.feature_source,
        "feature_dim": res.feature_dim,
        "panel": res.panel.name,
        "protocol": res.protocol.model_dump(mode="json"),
        "protocol_digest": res.protocol.digest(),
        "seconds": res.seconds,
        "scored": len(res.results),
        "skipped": len(res.skipped),
        "slice_seconds": {f"{r.task}/{r.slice}": round(r.seconds, 3) for r in res.results},
    }
    write_text(out / "run.json", json.dumps(run, indent=2, sort_keys=True, default=str) + "\n")
    return out


def compare_rows(results: Sequence[PanelResult], headline_only: bool = False) -> list[dict[str, Any]]:
    """Rows of the head-to-head table: one per (task, slice, metric), one column per feature set."""
    panel = results[0].panel
    if headline_only:
        wanted = [(h.task, h.slice, h.metric) for h in panel.headline]
    else:
        wanted = []
        for t in panel.tasks:
            for s in t.slices:
                for m in t.metric_names():
                    wanted.append((t.name, s, m))
    rows = []
    for task, s, m in wanted:
        row: dict[str, Any] = {"task": task, "title": panel.task(task).title or task, "slice": s, "metric": m}
        for res in results:
            r = res.get(task, s)
            mean, sd, n = r.summary(m) if r is not None else (math.nan, math.nan, 0)
            row[res.feature_name] = mean
            row[f"{res.feature_name}_sd"] = sd
            row[f"{res.feature_name}_folds"] = n
        if any(not math.isnan(row[res.feature_name]) for res in results) or headline_only:
            rows.append(row)
    return rows


_METRIC_TEXT = {"auc": "AUC", "mae": "MAE", "r2": "R²", "balanced_accuracy": "bal. acc.", "accuracy": "accuracy",
                "pearson_r": "Pearson r"}


def compare_markdown(results: Sequence[PanelResult]) -> str:
    names = [r.feature_name for r in results]
    head = "| task (slice) | metric | " + " | ".join(names) + " |"
    sep = "|---|---|" + "---|" * len(names)

    def table(rows: list[dict[str, Any]]) -> list[str]:
        out = [head, sep]
        for row in rows:
            cells = [_pm(row[n], row[f"{n}_sd"]) for n in names]
            out.append(f"| {row['title']} ({row['slice']}) | {_METRIC_TEXT.get(row['metric'], row['metric'])} | " + " | ".join(cells) + " |")
        return out

    lines = [
        "# Frozen-feature probe comparison (identical splits)",
        "",
        f"Panel `{results[0].panel.name}`; protocol digest {results[0].protocol.digest()}; mean ± SD over folds.",
        "",
        "## Headline (docs/method.md Table 1 layout)",
        "",
        *table(compare_rows(results, headline_only=True)),
        "",
        "## All tasks",
        "",
        *table(compare_rows(results)),
    ]
    return "\n".join(lines) + "\n"


def write_compare(results: Sequence[PanelResult], out_dir: str | Path) -> Path:
    """compare.csv (all rows) and compare.md (headline + all rows)."""
    out = Path(out_dir)
    names = [r.feature_name for r in results]
    cols = ["task", "slice", "metric"] + [c for n in names for c in (n, f"{n}_sd", f"{n}_folds")]
    write_text(out / "compare.csv", _csv(compare_rows(results), cols))
    write_text(out / "compare_headline.csv", _csv(compare_rows(results, headline_only=True), cols))
    write_text(out / "compare.md", compare_markdown(results))
    return out
