"""The permutation test: what it shuffles, its p-value, and that it changes no score."""

from __future__ import annotations

import csv
import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from g3n_probe import Panel, from_arrays, protocol_preset, run_panel
from g3n_probe.cli import main
from g3n_probe.config import PanelError
from g3n_probe.panel import permuted_slices
from g3n_probe.permutation import block_permutation, null_bound, p_value, slice_seed

PANEL = Panel.model_validate({
    "name": "perm",
    "tasks": [
        {"name": "sex", "target": "sex", "kind": "classification", "slices": ["all", "T1"]},
        {"name": "brain_age", "target": "age", "kind": "regression", "slices": ["all"]},
        {"name": "modality", "target": "modality", "kind": "classification", "slices": ["all"]},
    ],
    "headline": [{"task": "sex", "slice": "T1", "metric": "auc"}],
})


def _units(subjects):
    out = defaultdict(list)
    for i, s in enumerate(subjects):
        out[s].append(i)
    return out


def test_block_permutation_swaps_whole_subjects_of_equal_size():
    # 30 subjects with 1, 2 or 4 units; labels: a per-subject constant and a per-unit sequence
    subjects = [f"s{s:02d}" for s in range(30) for _ in range((1, 2, 4)[s % 3])]
    units = _units(subjects)
    src = block_permutation(subjects, np.random.default_rng(0))
    assert sorted(src.tolist()) == list(range(len(subjects)))  # a bijection: every label used once
    donor_of = {}
    for s, idx in units.items():
        donors = {subjects[j] for j in src[idx]}
        assert len(donors) == 1  # a subject's labels come from one subject...
        (d,) = donors
        assert len(units[d]) == len(idx)  # ... with as many units
        assert sorted(src[idx].tolist()) == units[d]  # ... all of them
        donor_of[s] = d
    assert any(s != d for s, d in donor_of.items())  # and subjects do move
    # a label that varies inside subjects the same way for everybody moves too (within-block shuffle)
    modality = np.asarray([("T1", "T1c", "T2", "FLAIR")[i - units[s][0]] if len(units[s]) == 4 else "T1"
                           for i, s in enumerate(subjects)])
    assert (modality[src] != modality).any()
    assert Counter(modality[src].tolist()) == Counter(modality.tolist())
    # reproducible from the seed
    assert np.array_equal(src, block_permutation(subjects, np.random.default_rng(0)))


def test_p_value_and_bound_by_hand():
    null = [0.4, 0.5, 0.6, 0.7, math.nan]
    assert p_value(0.65, null, "auc") == pytest.approx((1 + 1) / (1 + 4))  # 0.7 is as good
    assert p_value(0.9, null, "auc") == pytest.approx(1 / 5)  # the smallest p 4 shuffles allow
    assert p_value(0.45, null, "mae") == pytest.approx((1 + 1) / 5)  # errors: lower is better (0.4)
    assert math.isnan(p_value(math.nan, null, "auc")) and math.isnan(p_value(0.5, [math.nan], "auc"))
    assert null_bound(null, "auc") == pytest.approx(np.quantile([0.4, 0.5, 0.6, 0.7], 0.95))
    assert null_bound(null, "mae") == pytest.approx(np.quantile([0.4, 0.5, 0.6, 0.7], 0.05))
    assert slice_seed(2025, "sex", "all") != slice_seed(2025, "sex", "T1")


def _run(make, signal, **cfg):
    X, recs = make(signal=signal, n_subjects=60, seed=4)
    return run_panel(from_arrays(X, recs, name="toy"), PANEL, protocol_preset("paper", **cfg), progress=False)


@pytest.fixture(scope="module")
def tested(make):
    return _run(make, 3.0, permutations=19, permute=["*/all"])


def test_signal_gets_the_smallest_p_and_noise_does_not(make, tested):
    for task, metric in (("sex", "auc"), ("brain_age", "mae"), ("brain_age", "r2"), ("modality", "auc")):
        p, bound, n = tested.get(task, "all").permutation(metric)
        assert n == 19 and p == pytest.approx(1 / 20), (task, metric, p)
        observed = tested.get(task, "all").summary(metric)[0]
        assert (observed < bound) if metric == "mae" else (observed > bound)
    # the shuffled scores sit around chance: a probe that learned nothing
    null_auc = tested.get("sex", "all").null_metrics["auc"]
    assert abs(np.mean(null_auc) - 0.5) < 0.1
    noise = _run(make, 0.0, permutations=19, permute=["sex/all"])
    p, _, _ = noise.get("sex", "all").permutation("auc")
    assert p > 0.1, p
    # only the selected slices are tested
    assert not tested.get("sex", "T1").null_metrics and math.isnan(tested.get("sex", "T1").permutation("auc")[0])


def test_the_test_changes_no_score(make, tested):
    plain = _run(make, 3.0)
    for r in plain.results:
        t = tested.get(r.task, r.slice)
        assert t.fold_metrics == r.fold_metrics and t.chance_metrics == r.chance_metrics
        assert np.allclose(t.probe.coef, r.probe.coef)
    assert tested.protocol.digest() == plain.protocol.digest()
    # reproducible, and the same whether the shuffled cross-validations run in 2 processes or in this one
    again = _run(make, 3.0, permutations=19, permute=["*/all"], n_jobs=1)
    for task in ("sex", "brain_age", "modality"):
        assert again.get(task, "all").null_metrics == tested.get(task, "all").null_metrics, task


def test_which_slices():
    cfg = protocol_preset("paper", permutations=5)
    assert permuted_slices(PANEL, cfg) == {("sex", "T1")}  # 'headline' by default
    both = protocol_preset("paper", permutations=5, permute=["headline", "brain_age/*"])
    assert permuted_slices(PANEL, both) == {("sex", "T1"), ("brain_age", "all")}
    assert permuted_slices(PANEL, protocol_preset("paper")) == set()  # permutations 0: none
    with pytest.raises(PanelError, match="'sexx/all' matches no task/slice"):
        permuted_slices(PANEL, protocol_preset("paper", permutations=5, permute=["sexx/all"]))


def test_cli(tmp_path, capsys):
    table = tmp_path / "t"
    assert main(["synth", "--out", str(table), "--volumes", "400", "--dim", "12", "--seed", "2"]) == 0
    out = tmp_path / "run"
    assert main(["run", str(table), "--out", str(out), "--tasks", "sex,modality", "-q",
                 "--permutations", "9", "--permute", "sex/all, modality/all"]) == 0
    rows = {(r["task"], r["slice"], r["metric"]): r for r in csv.DictReader((out / "results.csv").open())}
    assert rows[("sex", "all", "auc")]["permutations"] == "9" and float(rows[("sex", "all", "auc")]["perm_p"]) == 0.1
    assert rows[("sex", "T1", "auc")]["perm_p"] == "" and rows[("sex", "T1", "auc")]["permutations"] == ""
    shuffles = list(csv.DictReader((out / "permutations" / "modality__all.csv").open()))
    assert len(shuffles) == 9 and {"permutation", "auc", "balanced_accuracy"} == set(shuffles[0])
    md = (out / "results.md").read_text()
    assert "permutation test over 9 shuffles" in md and "| 0.1 (" in md
    capsys.readouterr()
    assert main(["run", str(table), "--out", str(tmp_path / "bad"), "--tasks", "sex", "-q",
                 "--permutations", "9", "--permute", "disease/all"]) == 2
    assert "'disease/all' matches no task/slice" in capsys.readouterr().err
