"""Subject-level splits: no leak, seeded, order-independent, stratified, visits kept together."""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict

import numpy as np
import pytest

import g3n_shards as gs
from g3n_data import splits
from g3n_data.splits import load_splits, parse_fractions, split_subjects, subject_id


def make_items(n_subjects: int = 300, seed: int = 0) -> list[tuple[str, gs.SampleMeta]]:
    """A cohort mix with multi-visit, multi-modality subjects and a few tiny strata."""
    rng = random.Random(seed)
    design = [("ADNI", ["HC", "MCI", "AD"], [0.4, 0.35, 0.25]), ("PPMI", ["HC", "PD"], [0.3, 0.7]),
              ("IXI", ["HC"], [1.0]), ("UPENN", ["GBM", "glioma"], [0.9, 0.1])]  # fmt: skip
    items = []
    for i in range(n_subjects):
        cohort, dxs, w = design[i % len(design)]
        dx = rng.choices(dxs, w)[0]
        subject = f"s{i // len(design):03d}"  # the same ID in every cohort, on purpose
        for v in range(rng.choice([1, 1, 2, 3])):
            for mod in ["T1"] + (["T2", "FLAIR"] if rng.random() < 0.3 else []):
                meta = gs.SampleMeta(subject=subject, session=f"ses-{v + 1}", cohort=cohort, modality=mod,
                                     age=60.0 + v, diagnosis=dx)  # fmt: skip
                items.append((gs.sample_key(meta), meta))
    # a subject whose diagnosis changes: stratified by its baseline diagnosis, still one split
    for v, dx in enumerate(["MCI", "MCI", "AD"]):
        meta = gs.SampleMeta(subject="conv01", session=f"ses-{v + 1}", cohort="ADNI", modality="T1", age=70.0 + v, diagnosis=dx)
        items.append((gs.sample_key(meta), meta))
    return items


def test_no_subject_in_two_splits_and_visits_together():
    items = make_items()
    r = split_subjects(items, "0.8,0.1,0.1", seed=2025)
    key_split = r.split_of_key()
    assert set(key_split) == {k for k, _ in items}  # every key in exactly one split
    assert sum(len(v) for v in r.keys.values()) == len(items)
    per_subject = defaultdict(set)
    for k, m in items:
        per_subject[subject_id(m)].add(key_split[k])
    assert all(len(s) == 1 for s in per_subject.values())
    # same subject ID in two cohorts are two people: both are assigned, independently
    assert "ADNI/s000" in r.subjects and "IXI/s000" in r.subjects
    assert r.merged.get("ADNI|AD") is None  # large enough to stand alone


def test_seeded_and_order_independent():
    items = make_items()
    a = split_subjects(items, "0.8,0.1,0.1", seed=2025)
    shuffled = items[:]
    random.Random(5).shuffle(shuffled)
    b = split_subjects(shuffled, "0.8,0.1,0.1", seed=2025)
    assert a.to_dict() == b.to_dict()
    c = split_subjects(items, "0.8,0.1,0.1", seed=7)
    assert a.subjects != c.subjects


def test_stratification_is_preserved():
    items = make_items(600)
    r = split_subjects(items, "0.8,0.1,0.1", seed=1)
    n = len(r.subjects)
    counts = Counter(r.subjects.values())
    for name, f in r.fractions.items():
        assert abs(counts[name] - f * n) <= 1.0  # global proportions within one subject
    # per stratum proportions (strata are large here)
    for stratum, c in r.strata.items():
        tot = sum(c.values())
        if tot >= 30:
            assert abs(c["train"] / tot - 0.8) < 0.06, (stratum, c)
    # small strata are merged, and the merge is recorded
    small = split_subjects(items[:40], "0.8,0.1,0.1", seed=1)
    assert small.merged and all(v.endswith("|*") for v in small.merged.values())
    assert all(counts > 0 for counts in Counter(small.subjects.values()).values())
    assert set(Counter(small.subjects.values())) == {"train", "val", "test"}


def test_every_split_gets_a_subject_when_possible():
    metas = [gs.SampleMeta(subject=f"x{i}", cohort="C", modality="T1", diagnosis="HC") for i in range(4)]
    r = split_subjects([(gs.sample_key(m), m) for m in metas], "0.8,0.1,0.1", seed=0)
    assert sorted(Counter(r.subjects.values()).values()) == [1, 1, 2]


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        parse_fractions("0.8,0.3,0.1")
    with pytest.raises(ValueError, match="3 splits"):
        parse_fractions("0.5,0.5")
    with pytest.raises(ValueError, match="comma-separated"):
        parse_fractions("a,b,c")
    with pytest.raises(ValueError, match="no samples"):
        split_subjects([], "0.8,0.1,0.1")


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="g3n-data")
    splits.add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_on_a_shard_set(tmp_path, capsys):
    shardset = tmp_path / "vols"
    with gs.ShardWriter(shardset, kind="volumes", producer=gs.Producer(package="g3n-data")) as w:
        for k, m in make_items(40):
            w.write(k, m, {"volume": np.zeros((4, 4, 4), np.float32)})
    out = tmp_path / "splits.json"
    assert run_cli(["split", "--in", str(shardset), "--out", str(out), "--fractions", "0.8,0.1,0.1", "--seed", "2025"]) == 0
    r = load_splits(out)
    assert r.source["digest"] == gs.ShardSet.open(shardset).digest
    assert sum(len(v) for v in r.keys.values()) == len(gs.ShardSet.open(shardset))
    d = json.loads(out.read_text())
    assert d["format"] == "g3n-splits" and d["seed"] == 2025
    # same call again: byte-identical except nothing (deterministic)
    out2 = tmp_path / "splits2.json"
    assert run_cli(["split", "--in", str(shardset), "--out", str(out2), "--seed", "2025"]) == 0
    assert json.loads(out2.read_text())["subjects"] == d["subjects"]
    # errors are one clear line naming the problem
    assert run_cli(["split", "--in", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    assert run_cli(["split", "--in", str(shardset), "--out", str(out), "--fractions", "0.9,0.2,0.1"]) == 2
    assert "sum to 1" in capsys.readouterr().err


def test_split_of_a_synthetic_cohort_keeps_subjects_whole(tmp_path):
    from g3n_data.synth import make_config, write_cohort

    shardset = tmp_path / "syn"
    write_cohort(make_config("tiny", subjects=10, seed=2), shardset, workers=1, progress=False)
    out = tmp_path / "splits.json"
    assert run_cli(["split", "--in", str(shardset), "--out", str(out), "--fractions", "0.6,0.2,0.2"]) == 0
    r = load_splits(out)
    md = gs.ShardSet.open(shardset).metadata()
    key_split = r.split_of_key()
    assert set(key_split) == set(md)
    by_subject = defaultdict(set)
    for k, m in md.items():
        by_subject[m.subject].add(key_split[k])
    assert all(len(v) == 1 for v in by_subject.values())
    assert any(len({m.session for m in md.values() if m.subject == s}) > 1 for s in by_subject)  # visits exist
    assert set(r.subjects.values()) == {"train", "val", "test"}
