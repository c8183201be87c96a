"""The panel on plain arrays: known signal scores high, noise scores ~0.5, missing labels are
handled (dropped classes, skipped tasks with reasons), folds leak no subject."""

from __future__ import annotations

import numpy as np
import pytest

from g3n_probe import Panel, from_arrays, protocol_preset, run_panel
from g3n_probe.splits import check_no_leak

PANEL = Panel.model_validate({
    "name": "test",
    "tasks": [
        {"name": "sex", "target": "sex", "kind": "classification", "classes": {"F": "F", "M": "M"},
         "slices": ["all", "T1", "T2", "pooled"]},
        {"name": "brain_age", "target": "age", "kind": "regression", "slices": ["all", "T1"]},
        {"name": "idh1", "target": "idh1", "kind": "classification", "slices": ["all"]},
        {"name": "disease", "target": "diagnosis", "kind": "classification", "slices": ["all", "T1c"]},
        {"name": "mmse", "target": "mmse", "kind": "regression", "slices": ["all"]},
        {"name": "site", "target": "site", "kind": "classification", "slices": ["all"]},
    ],
})


def _run(make, signal: float, seed: int = 0, **cfg):
    X, recs = make(signal=signal, seed=seed)
    fs = from_arrays(X, recs, name="toy")
    return run_panel(fs, PANEL, protocol_preset("paper", **cfg), progress=False)


@pytest.fixture(scope="module")
def signal_run(make):
    return _run(make, 3.0)


def test_known_signal_gives_high_auc_and_low_error(signal_run):
    sex = signal_run.get("sex", "all")
    auc, sd, n = sex.summary("auc")
    assert n == 5 and auc > 0.9, auc
    age = signal_run.get("brain_age", "all")
    r2, _, _ = age.summary("r2")
    mae, _, _ = age.summary("mae")
    assert r2 > 0.7 and mae < 8.0, (r2, mae)


def test_chance_column_is_a_constant_predictor_on_the_same_folds(signal_run):
    age = signal_run.get("brain_age", "all")
    preds = age.predictions.columns
    want = []
    for k in range(5):
        test = np.asarray(preds["fold"]) == k
        y = np.asarray(preds["y_true"], dtype=float)
        want.append(np.mean(np.abs(y[test] - y[~test].mean())))
    assert age.chance("mae") == pytest.approx(np.mean(want))
    assert age.summary("mae")[0] < 0.5 * age.chance("mae")  # the signal beats chance clearly
    assert signal_run.get("sex", "all").chance("auc") == pytest.approx(0.5)


def test_pure_noise_gives_chance(make):
    res = _run(make, 0.0, seed=3)
    auc, _, n = res.get("sex", "all").summary("auc")
    assert n == 5 and abs(auc - 0.5) < 0.1, auc
    r2, _, _ = res.get("brain_age", "all").summary("r2")
    assert r2 < 0.1


def test_folds_leak_no_subject(signal_run):
    for r in signal_run.results:
        subj = np.asarray([p["subject"] for p in r.predictions])
        fold = np.asarray([p["fold"] for p in r.predictions])
        check_no_leak(subj, fold)  # each subject's predictions all come from one fold
        assert len(r.predictions) == r.units  # every unit predicted exactly once, out of fold
    for task, mapping in signal_run.folds.items():
        assert set(mapping.values()) == set(range(5)), task


def test_slices_and_pooling(signal_run):
    all_, t1, pooled = (signal_run.get("sex", s) for s in ("all", "T1", "pooled"))
    assert all_.units == 120 * 2 * 2 and t1.units == 120 * 2
    assert pooled.units == 120 * 2 and pooled.volumes == 120 * 2 * 2  # one unit per session, mean of 2 modalities
    assert all_.subjects == t1.subjects == pooled.subjects == 120
    # identical subject folds across slices of one task
    f_all = {p["subject"]: p["fold"] for p in all_.predictions}
    assert all(f_all[p["subject"]] == p["fold"] for p in pooled.predictions)


def test_missing_labels_are_handled(signal_run):
    skipped = {(s.task, s.slice): s.reason for s in signal_run.skipped}
    # idh1: only 6 subjects labelled -> skipped with reason, no crash
    assert "labelled subject" in skipped[("idh1", "all")] or "class" in skipped[("idh1", "all")]
    # mmse: nobody has it
    assert ("mmse", "all") in skipped
    # a modality with no volumes
    assert "no labelled volumes" in skipped[("disease", "T1c")]
    assert signal_run.get("disease", "all") is not None


def test_too_small_class_is_dropped_with_a_message(make):
    X, recs = make(signal=3.0)
    for r in recs:  # 3 subjects get a rare diagnosis
        if r["subject"] in ("s0001", "s0002", "s0003"):
            r["diagnosis"] = "PD"
    res = run_panel(from_arrays(X, recs), PANEL.subset(["disease"]), protocol_preset("paper"), progress=False)
    r = res.get("disease", "all")
    assert r.classes == ["AD", "HC"]
    assert any("PD (3)" in n for n in r.notes)


def test_max_classes_keeps_most_frequent(make):
    X, recs = make(signal=1.0)
    panel = Panel.model_validate({"name": "t", "tasks": [
        {"name": "site", "target": "site", "kind": "classification", "max_classes": 2, "slices": ["all"]}]})
    res = run_panel(from_arrays(X, recs), panel, protocol_preset("paper"), progress=False)
    r = res.get("site", "all")
    assert len(r.classes) == 2
    assert any("kept the 2 classes" in n for n in r.notes)
