"""Probes saved as JSON + npz (no pickle) reproduce the reported predictions exactly."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from g3n_probe import LinearProbe, Panel, ProbeFileError, apply_probes, find_probes, from_arrays, protocol_preset, run_panel, write_run
from g3n_probe.slices import build_view

PANEL = Panel.model_validate({
    "name": "files",
    "tasks": [
        {"name": "sex", "target": "sex", "kind": "classification", "slices": ["all", "pooled"]},
        {"name": "site", "target": "site", "kind": "classification", "slices": ["T1"]},
        {"name": "brain_age", "target": "age", "kind": "regression", "slices": ["all"]},
    ],
})


@pytest.fixture(scope="module")
def run_dir(make, tmp_path_factory):
    X, recs = make(n_subjects=60, signal=2.0, seed=5)
    fs = from_arrays(X, recs, name="toy")
    res = run_panel(fs, PANEL, protocol_preset("paper", save_fold_probes=True), progress=False)
    out = write_run(res, tmp_path_factory.mktemp("run"))
    return fs, res, out


def test_fold_probes_reproduce_cv_predictions_exactly(run_dir):
    fs, res, out = run_dir
    for r in res.results:
        view = build_view(r.slice, fs.X, fs.records, np.arange(len(fs)))
        pos = {u: i for i, u in enumerate(view.unit_keys)}
        for k in range(5):
            probe = LinearProbe.load(out / "probes" / f"{r.task}__{r.slice}" / f"fold{k}")
            rows = [p for p in r.predictions if p["fold"] == k]
            Xk = view.X[[pos[p["unit"]] for p in rows]]
            scores = probe.predict_scores(Xk)
            if r.kind == "classification":
                want = np.asarray([[p[f"p_{c}"] for c in probe.classes] for p in rows])
            else:
                want = np.asarray([p["y_pred"] for p in rows])
            assert np.array_equal(scores, want), (r.task, r.slice, k)


def test_final_probe_roundtrip_and_apply(run_dir, tmp_path):
    fs, res, out = run_dir
    r = res.get("sex", "pooled")
    loaded = LinearProbe.load(out / "probes" / "sex__pooled")
    view = build_view("pooled", fs.X, fs.records, np.arange(len(fs)))
    assert np.array_equal(loaded.predict_scores(view.X), r.probe.predict_scores(view.X))
    assert loaded.classes == r.classes and loaded.info["slice"] == "pooled"
    applied = {a.name: a for a in apply_probes(find_probes([out]), fs, tmp_path / "apply")}
    assert set(applied) == {"sex__all", "sex__pooled", "site__T1", "brain_age__all"}
    a = applied["sex__pooled"]
    assert [row["unit"] for row in a.rows] == view.unit_keys
    assert np.array_equal(np.asarray([row["p_F"] for row in a.rows]), r.probe.predict_scores(view.X)[:, 0])
    assert a.metrics["auc"] > 0.8 and a.labelled == len(view.unit_keys)  # in-sample, labels present
    assert (tmp_path / "apply" / "summary.csv").is_file()


def test_probe_files_need_no_pickle_and_detect_tampering(run_dir, tmp_path):
    _, _, out = run_dir
    folder = out / "probes" / "brain_age__all"
    with np.load(folder / "probe.npz", allow_pickle=False) as z:
        assert set(z.files) == {"mean", "scale", "coef", "intercept"}
    doc = json.loads((folder / "probe.json").read_text())
    assert doc["format"] == "g3n-probe/linear" and doc["info"]["task"]["name"] == "brain_age"
    # a changed byte in the arrays is refused, naming the file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "probe.json").write_text((folder / "probe.json").read_text())
    with zipfile.ZipFile(folder / "probe.npz") as zin, zipfile.ZipFile(bad / "probe.npz", "w") as zout:
        for item in zin.infolist():
            data = bytearray(zin.read(item))
            if item.filename == "coef.npy":
                data[-1] ^= 1
            zout.writestr(item, bytes(data))
    with pytest.raises(ProbeFileError, match="probe.npz"):
        LinearProbe.load(bad)
    with pytest.raises(ProbeFileError, match="probe.json"):
        LinearProbe.load(tmp_path)


def test_apply_refuses_wrong_dimension(run_dir):
    fs, _, out = run_dir
    small = from_arrays(fs.X[:, :3], fs.records)
    with pytest.raises(ProbeFileError, match="expects 12-d"):
        apply_probes(find_probes([out / "probes" / "sex__all"]), small)
