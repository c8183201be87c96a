"""Feature sources: g3n-shards tokens/latents sets and plain feature tables read alike."""

from __future__ import annotations

import numpy as np
import pytest

import g3n_shards as gs
from g3n_probe import FeatureSourceError, load_features, write_feature_table
from g3n_probe.features import FeatureSet


def _metas(n: int):
    out = []
    for i in range(n):
        m = gs.SampleMeta(subject=f"s{i}", session="ses-1", cohort="IXI", site="IXI-Guys",
                          modality="T1" if i % 2 else "T2", age=20.0 + i, sex="F" if i % 2 else "M")
        out.append((gs.sample_key(m), m))
    return out


def test_tokens_set_mean_and_tokens(tmp_path):
    rng = np.random.default_rng(0)
    metas = _metas(6)
    toks = {k: rng.normal(size=(8, 5)).astype(np.float32) for k, _ in metas}
    prod = gs.Producer(package="test")
    with gs.ShardWriter(tmp_path / "mean", kind="tokens", producer=prod) as w:
        for k, m in metas:
            w.write(k, m, {"mean": toks[k].mean(axis=0)})
    with gs.ShardWriter(tmp_path / "tok", kind="tokens", producer=prod) as w:
        for k, m in metas:
            w.write(k, m, {"tokens": toks[k]})
    a = load_features(tmp_path / "mean")
    b = load_features(tmp_path / "tok", name="tok")
    assert a.keys == sorted(k for k, _ in metas) == b.keys
    want = np.stack([toks[k].mean(axis=0) for k in a.keys])
    np.testing.assert_allclose(a.X, want, rtol=1e-6)
    np.testing.assert_allclose(b.X, want, rtol=1e-3, atol=1e-3)  # tokens may be stored as float16
    assert a.records[0]["age"] is not None and a.source["kind"] == "tokens" and a.source["digest"]
    assert b.name == "tok"


def test_latents_set_flatten_or_mean(tmp_path):
    rng = np.random.default_rng(1)
    metas = _metas(4)
    lat = {k: rng.normal(size=(8, 3)).astype(np.float32) for k, _ in metas}
    ref = gs.ModelRef(name="tok-test")
    with gs.ShardWriter(tmp_path / "lat", kind="latents", producer=gs.Producer(package="test"), tokenizer=ref) as w:
        for k, m in metas:
            w.write(k, m, {"latent": lat[k]})
    flat = load_features(tmp_path / "lat")
    mean = load_features(tmp_path / "lat", latent_reduce="mean")
    assert flat.dim == 24 and mean.dim == 3
    np.testing.assert_array_equal(flat.X[0], lat[flat.keys[0]].reshape(-1))
    np.testing.assert_allclose(mean.X[0], lat[mean.keys[0]].mean(axis=0), rtol=1e-6)


def test_volumes_set_is_refused(tmp_path):
    metas = _metas(1)
    with gs.ShardWriter(tmp_path / "vol", kind="volumes", producer=gs.Producer(package="test")) as w:
        w.write(metas[0][0], metas[0][1], {"volume": np.zeros((4, 4, 4), np.float32)})
    with pytest.raises(FeatureSourceError, match="volumes"):
        load_features(tmp_path / "vol")


def test_feature_table_roundtrip_and_errors(tmp_path):
    metas = _metas(5)
    X = np.arange(15, dtype=np.float32).reshape(5, 3)
    write_feature_table(tmp_path / "t", X, [k for k, _ in metas], [m for _, m in metas])
    fs = load_features(tmp_path / "t")
    order = np.argsort([k for k, _ in metas])
    np.testing.assert_array_equal(fs.X, X[order])
    assert fs.records[0]["subject"] == metas[order[0]][1].subject
    # bad metadata names the file and line
    lines = (tmp_path / "t" / "metadata.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"age": 22.0', '"age": -5')
    (tmp_path / "t" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(FeatureSourceError, match=r"metadata.jsonl:3.*age"):
        load_features(tmp_path / "t")
    with pytest.raises(FeatureSourceError, match="neither a shard set"):
        load_features(tmp_path)


def test_featureset_checks():
    with pytest.raises(FeatureSourceError, match="non-finite"):
        FeatureSet("x", np.array([[np.nan]]), ["a"], [{"subject": "a"}])
    with pytest.raises(FeatureSourceError, match="duplicate"):
        FeatureSet("x", np.zeros((2, 1)), ["a", "a"], [{}, {}])


def test_feature_table_sidecar_records_what_made_the_features(tmp_path):
    """A table written with its source is checked like that source; a stale sidecar is an error."""
    import pytest

    from g3n_probe import load_features, write_feature_table
    from g3n_probe.features import FeatureSourceError

    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    recs = [{"subject": f"s{i}", "modality": "T1"} for i in range(3)]
    src = {"type": "shards", "kind": "tokens", "path": "/data/tokens", "digest": "sha256:" + "1" * 64, "array": "mean",
           "encoder": {"role": "encoder", "name": "g3n-mae", "checkpoint_digest": "abc"}}
    write_feature_table(tmp_path / "t", X, ["a", "b", "c"], recs, source=src)
    fs = load_features(tmp_path / "t")
    assert fs.source["type"] == "table" and fs.source["kind"] == "tokens"
    assert fs.source["encoder"]["checkpoint_digest"] == "abc" and fs.source["made_from"]["path"] == "/data/tokens"
    write_feature_table(tmp_path / "u", X, ["a", "b", "c"], recs, source=src)
    (tmp_path / "u" / "features.npz").write_bytes((tmp_path / "t" / "features.npz").read_bytes())  # same: fine
    load_features(tmp_path / "u")
    write_feature_table(tmp_path / "v", X + 1, ["a", "b", "c"], recs)  # no source: plain table
    assert load_features(tmp_path / "v").source["kind"] == "feature-table"
    (tmp_path / "v" / "features.json").write_text((tmp_path / "t" / "features.json").read_text())
    with pytest.raises(FeatureSourceError, match="describes features"):
        load_features(tmp_path / "v")
    write_feature_table(tmp_path / "v", X + 1, ["a", "b", "c"], recs)  # rewriting without a source drops it
    assert not (tmp_path / "v" / "features.json").exists()
