"""The MAE candidates' choice: the rule on known figures, the copy of the kept export, and the
errors a broken candidate or a too small validation set give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from g3n_pipeline import mae_select


def _probe_run(folder: Path, age: float | None, auc: float, age_chance: float = 13.0) -> Path:
    folder.mkdir(parents=True)
    rows = ["task,slice,metric,mean,sd,chance", f"disease,all,auc,{auc},0.05,0.5", "sex,all,auc,0.99,0.01,0.5"]
    if age is not None:
        rows.append(f"brain_age,T1,mae,{age},1.0,{age_chance}")
    (folder / "results.csv").write_text("\n".join(rows) + "\n")
    (folder / "skipped.csv").write_text("task,slice,reason\n" + ("" if age is not None else
                                        "brain_age,T1,12 labelled subject(s) < 20\n"))
    return folder


def _candidate(root: Path, name: str, age: float | None, auc: float) -> Path:
    c = root / name
    _probe_run(c / "probe-val", age, auc)
    (c / "export").mkdir()
    (c / "export" / "model.safetensors").write_bytes(name.encode())
    (c / "export" / "config.json").write_text(json.dumps({"name": name}))
    (c / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5, "seed": name}) + "\n")
    return c


def test_the_smallest_worst_shortfall_is_kept():
    raw = {"brain_age": {"mean": 6.0, "sd": 1.0, "chance": 14.0}, "disease": {"mean": 0.8, "sd": 0.05, "chance": 0.5}}
    cand = lambda age, auc: {"brain_age": {"mean": age, "sd": 1.0, "chance": 14.0},  # noqa: E731
                             "disease": {"mean": auc, "sd": 0.05, "chance": 0.5}}
    rec = mae_select.choose(raw, {"a": cand(8.0, 0.80), "b": cand(7.0, 0.77), "c": cand(6.0, 0.68), "d": cand(7.0, 0.77)})
    rows = {r["name"]: r for r in rec["candidates"]}
    # a: 2 of the raw voxels' 8 years from chance behind (0.25), level on disease (0)
    assert rows["a"]["shortfall"] == pytest.approx({"brain_age": 0.25, "disease": 0.0})
    assert rows["b"]["worst"] == pytest.approx(0.125) and rows["c"]["worst"] == pytest.approx(0.4)
    assert rec["kept"] == "b"  # d ties with b: the first listed wins
    # ahead of the raw voxels on both: negative shortfalls; y's lead on age does not buy its thin one on disease
    rec = mae_select.choose(raw, {"x": cand(5.0, 0.85), "y": cand(4.0, 0.81)})
    assert rec["kept"] == "x" and all(r["worst"] < 0 for r in rec["candidates"])
    with pytest.raises(mae_select.SelectionError, match="at chance"):
        mae_select.choose({**raw, "disease": {"mean": 0.5, "sd": 0.0, "chance": 0.5}}, {"a": cand(8.0, 0.8)})


def test_select_copies_the_kept_export_and_records_every_candidate(tmp_path, capsys):
    raw = _probe_run(tmp_path / "raw", 6.0, 0.80)
    cands = [_candidate(tmp_path, "mae-s1", 9.0, 0.80), _candidate(tmp_path, "mae-s2", 7.0, 0.79)]
    out = tmp_path / "mae"
    assert mae_select.main(["--raw", str(raw), "--out", str(out), *map(str, cands)]) == 0
    assert (out / "export" / "model.safetensors").read_bytes() == b"mae-s2"
    assert (out / "metrics.jsonl").read_text() == (cands[1] / "metrics.jsonl").read_text()
    rec = json.loads((out / "selection.json").read_text())
    assert rec["kept"] == "mae-s2" and [r["name"] for r in rec["candidates"]] == ["mae-s1", "mae-s2"]
    assert rec["raw"] == {"brain_age": 6.0, "disease": 0.8}
    assert "mae-s2 | 7.000 (+0.14) | 0.790 (+0.03)  <- kept" in capsys.readouterr().out
    # a re-run that keeps the other candidate replaces the export whole
    (cands[0] / "probe-val" / "results.csv").write_text((cands[0] / "probe-val" / "results.csv").read_text()
                                                       .replace("brain_age,T1,mae,9.0", "brain_age,T1,mae,6.5"))
    assert mae_select.main(["--raw", str(raw), "--out", str(out), *map(str, cands)]) == 0
    assert (out / "export" / "model.safetensors").read_bytes() == b"mae-s1"
    assert sorted(p.name for p in out.iterdir()) == ["export", "metrics.jsonl", "selection.json"]


def test_a_candidate_without_its_export_or_a_task_is_named(tmp_path, capsys):
    raw = _probe_run(tmp_path / "raw", 6.0, 0.80)
    ok = _candidate(tmp_path, "mae-s1", 8.0, 0.8)
    broken = _candidate(tmp_path, "mae-s2", 8.0, 0.8)
    (broken / "export" / "model.safetensors").unlink()
    assert mae_select.main(["--raw", str(raw), "--out", str(tmp_path / "mae"), str(ok), str(broken)]) == 1
    assert f"{broken / 'export' / 'model.safetensors'}: missing" in capsys.readouterr().err
    small = _candidate(tmp_path, "mae-s3", None, 0.8)
    assert mae_select.main(["--raw", str(raw), "--out", str(tmp_path / "mae"), str(ok), str(small)]) == 1
    err = capsys.readouterr().err
    assert "no brain_age/T1/mae row" in err and "skipped, 12 labelled subject(s) < 20" in err
    assert "mae_val_subjects" in err and not (tmp_path / "mae" / "export").exists()
