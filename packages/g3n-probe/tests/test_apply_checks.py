"""``apply`` on real-world inputs: bad rows end in rejects.jsonl (the rest scored exactly as on
clean data), and features of another kind or encoder than a probe's training are refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import g3n_shards as gs
from g3n_probe import Panel, apply_probes, find_probes, from_arrays, load_features, protocol_preset, run_panel, write_feature_table, write_run
from g3n_probe.apply import FeatureMismatchError, apply_probe
from g3n_probe.cli import main
from g3n_probe.linear import LinearProbe

PANEL = Panel.model_validate({
    "name": "checks",
    "tasks": [
        {"name": "sex", "target": "sex", "kind": "classification", "slices": ["all", "pooled"]},
        {"name": "site", "target": "site", "kind": "classification", "slices": ["T1"]},
        {"name": "brain_age", "target": "age", "kind": "regression", "slices": ["all"]},
    ],
})


def _body(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "key"}


@pytest.fixture(scope="module")
def trained(make, tmp_path_factory):
    """Probes trained on a clean feature table, and that table."""
    X, recs = make(n_subjects=60, signal=2.0, seed=5)
    X = X.astype(np.float32)
    d = tmp_path_factory.mktemp("trained")
    write_feature_table(d / "clean", X, [r["key"] for r in recs], [_body(r) for r in recs])
    fs = load_features(d / "clean")
    res = run_panel(fs, PANEL, protocol_preset("paper"), progress=False)
    write_run(res, d / "run")
    return d / "run", d / "clean", X, recs


def _preds(folder: Path, name: str) -> dict[str, dict[str, str]]:
    with (folder / f"{name}.csv").open() as f:
        return {row["unit"]: row for row in csv.DictReader(f)}


def test_nan_and_missing_modality_rows_are_rejected_rest_scored_exactly(trained, tmp_path, capsys):
    run, clean, X, recs = trained
    base = tmp_path / "base"
    assert main(["apply", "--probes", str(run), "--features", str(clean), "--out", str(base)]) == 0
    assert gs.RejectLog(base).records() == []  # clean data: an empty rejects file, written all the same

    t1 = [i for i, r in enumerate(recs) if r["modality"] == "T1"]
    nan_i, nomod_i = t1[3], t1[10]
    Xd = X.copy()
    Xd[nan_i, 4] = np.nan
    bodies = [_body(r) for r in recs]
    del bodies[nomod_i]["modality"]
    dirty = tmp_path / "dirty"
    write_feature_table(dirty, Xd, [r["key"] for r in recs], bodies)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["apply", "--probes", str(run), "--features", str(dirty), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rejected: 1 bad row(s), 1 slice refusal(s), 2 distinct sample(s)" in printed

    rej = gs.RejectLog(out).records()
    nan_key, nomod_key = recs[nan_i]["key"], recs[nomod_i]["key"]
    assert len(rej) == 2
    by_key = {r["key"]: r for r in rej}
    assert by_key[nan_key]["step"] == "features" and by_key[nan_key]["probe"] is None
    assert "non-finite" in by_key[nan_key]["reason"] and by_key[nan_key]["path"] == str(dirty)
    assert by_key[nan_key]["subject"] == recs[nan_i]["subject"]
    assert by_key[nomod_key]["probe"] == "site__T1" and "no modality" in by_key[nomod_key]["reason"]

    # every other unit is scored exactly as on the clean table (CSV values are exact reprs)
    for name, gone in [("sex__all", {nan_key}), ("brain_age__all", {nan_key}), ("site__T1", {nan_key, nomod_key})]:
        want, got = _preds(base, name), _preds(out, name)
        assert set(got) == set(want) - gone, name
        assert all(got[u] == want[u] for u in got), name
    # pooled: the NaN volume's session is now the mean of its other volume; all others unchanged
    nan_session = f"C/{recs[nan_i]['subject']}/{recs[nan_i]['session']}"
    want, got = _preds(base, "sex__pooled"), _preds(out, "sex__pooled")
    assert set(got) == set(want)
    assert got[nan_session] != want[nan_session]
    assert all(got[u] == want[u] for u in got if u != nan_session)
    summary = {r["probe"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert summary["site__T1"]["rejected"] == "1" and summary["sex__all"]["rejected"] == "0"


def test_more_bad_rows_never_crash(trained, tmp_path):
    run, _, X, recs = trained
    bodies = [_body(r) for r in recs]
    keys = [r["key"] for r in recs]
    Xd = X.copy()
    Xd[0, 0] = np.inf
    bodies[1]["session"] = None  # pooled needs it; per-volume slices do not
    del bodies[2]["subject"]  # every slice needs it
    bodies[3]["age"] = -4.0  # invalid metadata: no probe can use the sample
    folder = tmp_path / "t"
    write_feature_table(folder, Xd, keys, bodies)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    (folder / "metadata.jsonl").write_text("\n".join([l for l in lines if json.loads(l)["key"] != keys[5]]) + "\n")
    rejects: list = []
    fs = load_features(folder, rejects=rejects)
    reasons = {r.key: r.reason for r in rejects}
    assert set(reasons) == {keys[0], keys[3], keys[5]}
    assert "non-finite" in reasons[keys[0]] and "age" in reasons[keys[3]] and "no line" in reasons[keys[5]]
    assert len(fs) == len(keys) - 3
    res = {a.name: a for a in apply_probes(find_probes([run]), fs, tmp_path / "o", rejects=rejects)}
    pooled = {r.key: r.reason for r in res["sex__pooled"].rejects}
    assert "no session" in pooled[keys[1]] and "no subject" in pooled[keys[2]]
    assert [r.key for r in res["sex__all"].rejects] == [keys[2]]
    assert len(gs.RejectLog(tmp_path / "o").records()) == len(rejects) + sum(len(a.rejects) for a in res.values())


def test_wrong_width_row_in_a_shard_set_is_rejected(tmp_path):
    prod = gs.Producer(package="test")
    metas = [gs.SampleMeta(subject=f"s{i}", session="ses-1", modality="T1", sex="F" if i % 2 else "M") for i in range(5)]
    with gs.ShardWriter(tmp_path / "tok", kind="tokens", producer=prod) as w:
        for i, m in enumerate(metas):
            w.write(gs.sample_key(m), m, {"mean": np.ones(6 if i == 2 else 4, dtype=np.float32)})
    rejects: list = []
    fs = load_features(tmp_path / "tok", rejects=rejects, expected_dim=4)
    assert len(fs) == 4 and fs.dim == 4
    assert [r.key for r in rejects] == [gs.sample_key(metas[2])] and "6 values, not 4" in rejects[0].reason
    with pytest.raises(Exception, match="differs"):  # run/compare stay strict
        load_features(tmp_path / "tok")


def test_pooled_sessions_short_of_modalities_are_rejected_not_dropped(trained):
    run, clean, _, recs = trained
    probe = LinearProbe.load(run / "probes" / "sex__pooled")
    probe.info["protocol"]["pooled_min_modalities"] = 2
    fs = load_features(clean)
    lone = recs[0]["key"]
    fs = fs.subset([k for k in fs.keys if k != lone])
    a = apply_probe(probe, fs, "sex__pooled")
    assert len(a.rejects) == 1 and "has 1 volume(s)" in a.rejects[0].reason
    assert a.rejects[0].key == recs[1]["key"]  # the session's other volume


# ---- feature compatibility ----


@pytest.fixture(scope="module")
def shard_sets(make, tmp_path_factory):
    """The same 12-d vectors as a tokens set (two encoders) and as latents whose token mean is
    the vector: equal width, different features."""
    X, recs = make(n_subjects=40, signal=2.0, seed=7)
    X = X.astype(np.float32)
    d = tmp_path_factory.mktemp("sets")
    prod = gs.Producer(package="test")
    for name, digest in [("tok_a", "sha256:" + "a" * 64), ("tok_b", "sha256:" + "b" * 64)]:
        with gs.ShardWriter(d / name, kind="tokens", producer=prod,
                            encoder=gs.ModelRef(name=f"mae-{name}", checkpoint_digest=digest)) as w:
            for x, r in zip(X, recs):
                w.write(r["key"], _body(r), {"mean": x})
    with gs.ShardWriter(d / "lat", kind="latents", producer=prod, tokenizer=gs.ModelRef(name="tok")) as w:
        for x, r in zip(X, recs):
            w.write(r["key"], _body(r), {"latent": np.stack([x, x])})
    fs = load_features(d / "tok_a")
    res = run_panel(fs, Panel.model_validate({"name": "k", "tasks": [PANEL.tasks[0].model_dump(by_alias=True)]}),
                    protocol_preset("paper"), progress=False)
    write_run(res, d / "run")
    return d


def test_kind_mismatch_of_equal_width_is_refused_naming_both(shard_sets, tmp_path, capsys):
    d = shard_sets
    out = tmp_path / "o"
    rc = main(["apply", "--probes", str(d / "run"), "--features", str(d / "lat"), "--latent-reduce", "mean",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(d / "run" / "probes") in err and str(d / "lat") in err and str(d / "tok_a") in err
    assert "tokens (mean over tokens)" in err and "latents (latent_reduce=mean)" in err
    assert "--allow-feature-mismatch" in err
    assert not (out / "summary.csv").exists()  # refused before anything was written
    with pytest.raises(FeatureMismatchError, match="latent_reduce=mean"):
        apply_probes(find_probes([d / "run"]), load_features(d / "lat", latent_reduce="mean"))


def test_encoder_checkpoint_mismatch_is_refused(shard_sets, capsys, tmp_path):
    d = shard_sets
    assert main(["apply", "--probes", str(d / "run"), "--features", str(d / "tok_b"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "a" * 64 in err and "b" * 64 in err and "mae-tok_a" in err and "mae-tok_b" in err
    # same encoder: accepted
    assert main(["apply", "--probes", str(d / "run"), "--features", str(d / "tok_a"), "--out", str(tmp_path / "ok")]) == 0


def test_override_scores_with_a_warning(shard_sets, tmp_path, capsys):
    d = shard_sets
    ref, out = tmp_path / "ref", tmp_path / "o"
    assert main(["apply", "--probes", str(d / "run"), "--features", str(d / "tok_a"), "--out", str(ref)]) == 0
    capsys.readouterr()
    assert main(["apply", "--probes", str(d / "run"), "--features", str(d / "lat"), "--latent-reduce", "mean",
                 "--out", str(out), "--allow-feature-mismatch"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "scored anyway" in err and "latents (latent_reduce=mean)" in err and "sex__all" in err
    # the latent means equal the token means here, so the forced predictions are the same numbers
    assert _preds(out, "sex__all") == _preds(ref, "sex__all")
    # the width still has to match: flattened latents are 24-d, no override scores them
    assert main(["apply", "--probes", str(d / "run"), "--features", str(d / "lat"), "--latent-reduce", "flatten",
                 "--out", str(tmp_path / "w"), "--allow-feature-mismatch"]) == 2
    assert "expects 12-d" in capsys.readouterr().err


def test_unrecorded_kind_is_a_note_not_a_refusal(shard_sets, tmp_path):
    d = shard_sets
    fs = load_features(d / "tok_a")
    table = from_arrays(fs.X, fs.records)  # in-memory arrays record no kind
    a = apply_probes(find_probes([d / "run"]), table)
    assert a[0].rows and a[0].mismatch is None and any("cannot be checked" in n for n in a[0].notes)


def test_latent_reduce_defaults_to_the_probes(shard_sets, tmp_path):
    d = shard_sets
    fs = load_features(d / "lat", latent_reduce="mean")
    res = run_panel(fs, Panel.model_validate({"name": "k", "tasks": [PANEL.tasks[0].model_dump(by_alias=True)]}),
                    protocol_preset("paper"), progress=False)
    write_run(res, tmp_path / "run")
    # no --latent-reduce: the probes' recorded "mean" is used, not the 24-d "flatten"
    assert main(["apply", "--probes", str(tmp_path / "run"), "--features", str(d / "lat"), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "sex__all.csv").is_file()
