"""Keep one MAE among candidates pretrained with different seeds, chosen on a validation set.

Why: one pretraining recipe gives an encoder whose brain age (the token mean through a ridge probe)
lands anywhere from 7.7 to 11.8 y, by the seed alone (docs/results.md, "How much one pretraining
run's brain age owes to chance"). A build that trains one seed ships a draw. Training several and
keeping the best is only honest if "best" is judged on subjects that no model saw and that are not
the demo's test split: `g3n-zoo-build` draws a validation set of new synthetic subjects (their own
seed), encodes it with each candidate and runs the probe panel there, beside the raw voxels.

The rule follows issue 21's target, that the encoder beat the raw voxels on brain age and on disease.
Each candidate's **shortfall** on a task is its distance behind the raw voxels as a fraction of the
raw voxels' own distance from chance, ``(raw - x) / (raw - chance)``, the same formula for an MAE
(lower is better) and an AUC (higher is better); below 0 it beats them. The kept candidate has the
smallest worst shortfall over the tasks (the first listed on a tie). One number per task and no
weights to tune: a candidate cannot win on one task by giving up the other.

    python -m g3n_pipeline.mae_select --raw RUN/mae-val/probe-raw --out RUN/mae RUN/mae-s2025 RUN/mae-s2026

Each candidate folder holds the trainer's ``metrics.jsonl``, its ``export`` and ``probe-val`` (a
g3n-probe run on the validation set). ``--out`` receives the kept ``export``, its ``metrics.jsonl``
and ``selection.json`` (every candidate's figures and the rule).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

from g3n_shards import atomic_write_bytes

#: the probe rows the choice reads: name -> (task, slice, metric); the demo's headline rows for the
#: encoder against its baselines (headline.BASELINE_ROWS)
TASKS: dict[str, tuple[str, str, str]] = {"brain_age": ("brain_age", "T1", "mae"), "disease": ("disease", "all", "auc")}
RULE = ("shortfall on a task = (raw - x) / (raw - chance), raw = the raw voxels' figure on the validation set (below 0: "
        "the candidate beats them); kept: the smallest worst shortfall over " + ", ".join(
            f"{t} ({s}, {m})" for t, s, m in TASKS.values()))


class SelectionError(RuntimeError):
    """A candidate or the raw voxels' probe run lacks what the choice needs; the message names the file."""


def read_scores(probe_run: Path) -> dict[str, dict[str, float]]:
    """``{task: {"mean", "sd", "chance"}}`` of a g3n-probe run folder's ``results.csv``, for TASKS."""
    f = probe_run / "results.csv"
    if not f.is_file():
        raise SelectionError(f"{f}: no probe results (the g3n-probe run did not finish)")
    rows = {(r["task"], r["slice"], r["metric"]): r for r in csv.DictReader(f.open())}
    out = {}
    for name, key in TASKS.items():
        r = rows.get(key)
        if r is None or not r.get("mean") or not r.get("chance"):
            skipped = probe_run / "skipped.csv"
            why = [f"{row['reason']}" for row in (csv.DictReader(skipped.open()) if skipped.is_file() else [])
                   if (row["task"], row["slice"]) == key[:2]]
            raise SelectionError(f"{f}: no {'/'.join(key)} row with a mean and a chance level"
                                 + (f": skipped, {why[0]} (a larger validation set: mae_val_subjects)" if why else ""))
        out[name] = {"mean": float(r["mean"]), "sd": float(r["sd"] or "nan"), "chance": float(r["chance"])}
    return out


def shortfall(x: float, raw: float, chance: float) -> float:
    """How far ``x`` is behind ``raw``, as a fraction of ``raw``'s distance from chance (< 0: ahead)."""
    if raw == chance:
        raise SelectionError(f"the raw voxels score at chance ({raw:.4g}): they cannot scale a shortfall")
    return (raw - x) / (raw - chance)


def choose(raw: dict[str, dict[str, float]], candidates: dict[str, dict[str, dict[str, float]]]) -> dict:
    """The selection record: each candidate's figures and shortfalls, and the kept one's name."""
    rows = []
    for name, scores in candidates.items():
        short = {t: shortfall(scores[t]["mean"], raw[t]["mean"], raw[t]["chance"]) for t in TASKS}
        rows.append({"name": name, "scores": {t: scores[t]["mean"] for t in TASKS},
                     "sd": {t: scores[t]["sd"] for t in TASKS}, "shortfall": short, "worst": max(short.values())})
    if not rows:
        raise SelectionError("no candidates to choose from")
    kept = min(rows, key=lambda r: r["worst"])["name"]  # min keeps the first of equals
    return {"rule": RULE, "raw": {t: raw[t]["mean"] for t in TASKS}, "chance": {t: raw[t]["chance"] for t in TASKS},
            "candidates": rows, "kept": kept}


def select(raw_run: Path, candidates: list[Path], out: Path) -> dict:
    """Score ``candidates`` (folders) against the raw voxels' probe run, copy the kept one's export and
    metrics into ``out`` and write ``out/selection.json``. Returns the selection record."""
    for c in candidates:
        for need in ("export/model.safetensors", "export/config.json", "metrics.jsonl"):
            if not (c / need).is_file():
                raise SelectionError(f"{c / need}: missing (the candidate's training or export did not finish)")
    record = choose(read_scores(raw_run), {c.name: read_scores(c / "probe-val") for c in candidates})
    kept = next(c for c in candidates if c.name == record["kept"])
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(kept / "export", tmp)
    shutil.rmtree(out / "export", ignore_errors=True)
    tmp.rename(out / "export")
    atomic_write_bytes(out / "metrics.jsonl", (kept / "metrics.jsonl").read_bytes())
    atomic_write_bytes(out / "selection.json", (json.dumps(record, indent=1) + "\n").encode())
    return record


def table(record: dict) -> list[str]:
    """The choice as text lines: one per candidate, then the raw voxels."""
    head = " | ".join(f"{t} {TASKS[t][2]} (shortfall)" for t in TASKS)
    lines = [f"candidate | {head}"]
    for r in record["candidates"]:
        mark = "  <- kept" if r["name"] == record["kept"] else ""
        lines.append(f"{r['name']} | " + " | ".join(f"{r['scores'][t]:.3f} ({r['shortfall'][t]:+.2f})" for t in TASKS)
                     + mark)
    lines.append("raw voxels | " + " | ".join(f"{record['raw'][t]:.3f}" for t in TASKS))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m g3n_pipeline.mae_select", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("candidates", nargs="+", type=Path, help="candidate folders (metrics.jsonl, export/, probe-val/)")
    p.add_argument("--raw", type=Path, required=True, help="the raw voxels' g3n-probe run on the validation set")
    p.add_argument("--out", type=Path, required=True, help="where the kept export, its metrics and selection.json go")
    a = p.parse_args(argv)
    try:
        record = select(a.raw, a.candidates, a.out)
    except SelectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(table(record)))
    print(f"kept {record['kept']} -> {a.out / 'export'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
