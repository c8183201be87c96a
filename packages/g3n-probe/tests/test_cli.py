"""The command line end to end: synth -> run -> apply -> compare, and --help everywhere."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from g3n_probe import load_features
from g3n_probe.cli import main

TASKS = "sex,brain_age,modality,idh1"


@pytest.mark.parametrize("cmd", [[], ["tasks"], ["run"], ["apply"], ["compare"], ["synth"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: g3n-probe" in capsys.readouterr().out


def test_tasks_lists_23(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "23 tasks" in out and "cdr_staging" in out and "scopa_aut" in out


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    d = tmp_path_factory.mktemp("feat")
    assert main(["synth", "--out", str(d / "a"), "--volumes", "900", "--dim", "16", "--seed", "1"]) == 0
    return d / "a"


def test_run_apply(table, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(table), "--out", str(out), "--tasks", TASKS, "-q"]) == 0
    for f in ("results.csv", "results.md", "skipped.csv", "run.json", "panel.yaml"):
        assert (out / f).is_file(), f
    rows = list(csv.DictReader((out / "results.csv").open()))
    got = {(r["task"], r["slice"], r["metric"]): r for r in rows}
    assert float(got[("modality", "all", "auc")]["mean"]) > 0.95
    assert int(got[("sex", "all", "auc")]["subjects"]) > 100
    assert {"task", "slice", "metric", "mean", "sd", "folds", "subjects", "volumes"} <= set(rows[0])
    assert (out / "predictions" / "sex__all.csv").is_file() and (out / "probes" / "sex__all" / "probe.npz").is_file()
    # idh1 is rare: skipped or scored, never a crash; if skipped the reason is written
    skipped = list(csv.DictReader((out / "skipped.csv").open()))
    assert all(r["reason"] for r in skipped)
    ap = tmp_path / "apply"
    assert main(["apply", "--probes", str(out), "--features", str(table), "--out", str(ap)]) == 0
    summary = list(csv.DictReader((ap / "summary.csv").open()))
    assert any(r["probe"] == "sex__all" and r["metric"] == "auc" for r in summary)
    preds = list(csv.DictReader((ap / "sex__T1.csv").open()))
    fs = load_features(table)
    assert len(preds) == sum(1 for r in fs.records if r["modality"] == "T1")


def test_compare_identical_splits(table, tmp_path, capsys):
    # a second "encoder": the same samples with noisier features, written as another table
    fs = load_features(table)
    rng = np.random.default_rng(0)
    from g3n_probe import write_feature_table

    noisy = fs.X + rng.normal(0, 3, fs.X.shape).astype(np.float32)
    recs = [{k: v for k, v in r.items() if k != "key"} for r in fs.records]
    write_feature_table(tmp_path / "b", noisy[:-5], fs.keys[:-5], recs[:-5])  # 5 samples missing
    out = tmp_path / "cmp"
    assert main(["compare", f"ours={table}", f"noisy={tmp_path / 'b'}", "--out", str(out), "--tasks", TASKS, "-q"]) == 0
    md = (out / "compare.md").read_text()
    assert "| ours | noisy |" in md and "sex (T1)" in md and "brain age (T1)" in md
    rows = {(r["task"], r["slice"], r["metric"]): r for r in csv.DictReader((out / "compare.csv").open())}
    r = rows[("sex", "all", "auc")]
    assert float(r["ours"]) > float(r["noisy"])
    # identical splits: per-unit fold of both runs agree
    folds = []
    for name in ("ours", "noisy"):
        with (out / name / "predictions" / "sex__all.csv").open() as f:
            folds.append({row["unit"]: row["fold"] for row in csv.DictReader(f)})
    assert folds[0] == folds[1] and len(folds[0]) > 0


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "neither a shard set" in capsys.readouterr().err
    assert main(["tasks", "--panel", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
