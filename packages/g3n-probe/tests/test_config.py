"""The panel file: the shipped 23-task panel, adding a task by YAML, clear errors."""

from __future__ import annotations

import pytest

from g3n_probe import PanelError, from_arrays, load_panel, load_protocol, protocol_preset, run_panel
from g3n_probe.targets import canon, extract_labels


def test_default_panel_has_the_23_tasks():
    panel = load_panel()
    kinds = [t.kind for t in panel.tasks]
    assert len(panel.tasks) == 23
    assert kinds.count("classification") == 15 and kinds.count("regression") == 8
    names = {t.name for t in panel.tasks}
    assert {"disease", "sex", "modality", "site", "idh1", "tumour_grade", "cdr_staging", "brain_age", "mmse",
            "updrs3", "scopa_aut"} <= names
    assert len(set(panel.task("disease").classes.values())) == 8
    assert len(set(panel.task("modality").classes.values())) == 4
    assert panel.task("site").max_classes == 19
    assert len(set(panel.task("cdr_staging").classes.values())) == 5
    assert len(panel.headline) == 8


def test_paper_protocol():
    cfg = protocol_preset("paper")
    assert (cfg.n_splits, cfg.seed, cfg.logreg_max_iter) == (5, 2025, 1000)


def test_class_mapping_matches_numbers_and_bools():
    panel = load_panel()
    recs = [{"subject": "a", "cdr": 0.5, "field_strength": 3, "apoe_genotype": "e3/e4", "tumour_grade": 4},
            {"subject": "b", "cdr": 7.0, "field_strength": 1.5, "apoe_e4_carrier": False}]
    assert list(extract_labels(panel.task("cdr_staging"), recs).y) == ["CDR0.5", None]
    assert list(extract_labels(panel.task("field_strength"), recs).y) == ["3T", "1.5T"]
    assert list(extract_labels(panel.task("apoe_e4_carrier"), recs).y) == ["carrier", "non-carrier"]
    assert list(extract_labels(panel.task("apoe_genotype"), recs).y) == ["e4x1", None]
    assert canon(3) == canon("3.0") == canon(3.0) and canon(True) == "true"


def test_adding_a_task_is_a_yaml_edit(tmp_path, make):
    text = """
name: custom
tasks:
  - name: my_score
    target: extra.score
    kind: regression
    qualify: [{field: diagnosis, in: [HC]}]
    slices: [all]
  - name: old_vs_young
    target: age
    kind: regression
    qualify: [{field: age, min: 30}]
    slices: [T1]
"""
    (tmp_path / "p.yaml").write_text(text)
    panel = load_panel(tmp_path / "p.yaml")
    X, recs = make(signal=3.0)
    for r in recs:
        r["extra"] = {"score": float(r["age"]) * 2}
    res = run_panel(from_arrays(X, recs), panel, protocol_preset("paper"), progress=False)
    r = res.get("my_score", "all")
    assert r is not None and r.summary("r2")[0] > 0.5
    assert r.units == sum(1 for x in recs if x["diagnosis"] == "HC")
    assert res.get("old_vs_young", "T1").units == sum(1 for x in recs if x["modality"] == "T1" and x["age"] >= 30)


@pytest.mark.parametrize(
    "text, match",
    [
        ("name: x\ntasks: [{name: a, target: age, kind: ranking}]", "kind"),
        ("name: x\ntasks: [{name: a, target: age, kind: regression, slices: [T3]}]", "unknown slice"),
        ("name: x\ntasks: [{name: a, target: age, kind: regression, classes: {1: a}}]", "classification"),
        ("name: x\ntasks: [{name: a, target: age, kind: regression}, {name: a, target: sex, kind: classification}]", "duplicate"),
        ("name: x\ntasks: [\n", "not valid YAML"),
        ("- just a list", "mapping"),
    ],
)
def test_invalid_panel_names_file_and_reason(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(PanelError, match=match) as e:
        load_panel(p)
    assert "bad.yaml" in str(e.value)


def test_protocol_file_overrides_preset(tmp_path):
    (tmp_path / "proto.yaml").write_text("n_splits: 3\nseed: 7\n")
    cfg = load_protocol(tmp_path / "proto.yaml")
    assert (cfg.n_splits, cfg.seed, cfg.logreg_max_iter) == (3, 7, 1000)
    (tmp_path / "bad.yaml").write_text("n_folds: 3\n")
    with pytest.raises(PanelError, match="bad.yaml"):
        load_protocol(tmp_path / "bad.yaml")
