import numpy as np
import pytest

import g3n_shards as gs

from g3n_shards.testing import brain_like as brain, make_meta, write_volume_set as write_volumes
SHAPE = (16, 20, 16)


def test_volumes_round_trip_within_float16_bound(tmp_path):
    rng = np.random.default_rng(1)
    vols = {}
    with gs.ShardWriter(tmp_path / "v", kind="volumes", producer=gs.Producer(package="t"),
                        geometry=gs.Geometry(shape=SHAPE, patch_size=(4, 4, 4))) as w:
        for i in range(4):
            m = make_meta(i)
            vols[gs.sample_key(m)] = v = brain(rng, scale=10.0 ** (i + 1))
            w.write(gs.sample_key(m), m, {"volume": v, "mask": (v > 0).astype(np.uint8)})
    ss = gs.ShardSet.open(tmp_path / "v", kind="volumes")
    assert ss.manifest.arrays["volume"].dtypes == ["float16"]
    for s in ss:
        x, y = vols[s.key], s.arrays["volume"]
        assert y.dtype == np.float32 and y.shape == SHAPE
        # float16: relative error <= 2**-11 for normal numbers, absolute <= 2**-25 in the subnormal range
        assert np.all(np.abs(x - y) <= np.abs(x) * 2.0**-11 + 2.0**-24)
        assert np.array_equal(s.arrays["mask"], (x > 0).astype(np.uint8))
        assert s.meta == make_meta(int(s.meta.subject[-3:]))


def test_out_of_float16_range_falls_back_to_float32(tmp_path):
    v = np.full(SHAPE, 1e6, np.float32)
    with gs.ShardWriter(tmp_path / "v", kind="volumes", producer=gs.Producer(package="t")) as w:
        w.write("a", make_meta(0), {"volume": v})
    s = next(iter(gs.ShardSet.open(tmp_path / "v")))
    assert np.array_equal(s.arrays["volume"], v)
    assert gs.ShardSet.open(tmp_path / "v").manifest.arrays["volume"].dtypes == ["float32"]


def test_tokens_and_latents_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    tok = rng.normal(size=(60, 12)).astype(np.float32)
    geom = gs.Geometry(shape=(12, 20, 16), patch_size=(4, 4, 4), channels=12)  # 3x5x4 = 60 tokens
    enc = gs.ModelRef(name="g3n-mae", checkpoint_digest="sha256:" + "0" * 64)
    with gs.ShardWriter(tmp_path / "t", kind="tokens", producer=gs.Producer(package="g3n-mae"), geometry=geom, encoder=enc) as w:
        w.write("a", make_meta(0), {"tokens": tok, "mean": tok.mean(0)})
        w.write("b", make_meta(1), {"mean": tok.mean(0) + 1})
    ss = gs.ShardSet.open(tmp_path / "t", kind="tokens")
    a = ss.get("a")
    assert np.allclose(a.arrays["tokens"], tok, rtol=2**-11, atol=1e-7)
    assert np.array_equal(a.arrays["mean"], tok.mean(0))
    assert set(ss.get("b").arrays) == {"mean"}
    assert ss.manifest.encoder == enc

    lat = rng.normal(size=(60, 4)).astype(np.float32)
    tz = gs.ModelRef(name="mae-cnn", entry_point="mae-cnn", checkpoint_digest="sha256:" + "1" * 64)
    with gs.ShardWriter(tmp_path / "l", kind="latents", producer=gs.Producer(package="g3n-tokenizer"), tokenizer=tz,
                        parents=[ss]) as w:
        w.write("a", make_meta(0), {"latent": lat})
    ls = gs.ShardSet.open(tmp_path / "l", kind="latents")
    assert np.array_equal(ls.get("a").arrays["latent"], lat)  # float32: exact
    assert ls.manifest.parents[0].digest == ss.digest and ls.manifest.tokenizer == tz


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"volume": np.full(SHAPE, np.nan, np.float32)}, "NaN/Inf"),
        ({"volume": np.zeros((4, 4, 4), np.float32)}, "geometry"),
        ({"volume": np.zeros((4, 4), np.float32)}, "dimensions"),
        ({"image": np.zeros(SHAPE, np.float32)}, "no array"),
        ({}, "requires array"),
    ],
)
def test_writer_refuses_bad_arrays(tmp_path, arrays, match):
    with gs.ShardWriter(tmp_path / "v", kind="volumes", producer=gs.Producer(package="t"),
                        geometry=gs.Geometry(shape=SHAPE)) as w:
        with pytest.raises(gs.ShardError, match=match):
            w.write("a", make_meta(0), arrays)


def test_writer_refuses_bad_keys_duplicates_and_vocab(tmp_path):
    v = np.zeros(SHAPE, np.float32)
    with gs.ShardWriter(tmp_path / "v", kind="volumes", producer=gs.Producer(package="t"),
                        vocab={"diagnosis": ["HC", "AD"]}) as w:
        for bad in ("../x", "a.b", "A", ""):
            with pytest.raises(gs.ShardError, match="not allowed"):
                w.write(bad, make_meta(0), {"volume": v})
        w.write("k", make_meta(0), {"volume": v})
        with pytest.raises(gs.ShardError, match="duplicate"):
            w.write("k", make_meta(0), {"volume": v})
        with pytest.raises(gs.MetadataError, match="'diagnosis'.*'MCI'"):
            w.write("m", make_meta(2), {"volume": v})
    with pytest.raises(gs.ShardError, match="tokenizer"):
        gs.ShardWriter(tmp_path / "l", kind="latents", producer=gs.Producer(package="t"))


def test_deterministic_bytes_and_digest(tmp_path):
    m1 = write_volumes(tmp_path / "a")
    m2 = write_volumes(tmp_path / "b")
    assert m1.digest == m2.digest
    for s in m1.shards:
        assert (tmp_path / "a" / s.name).read_bytes() == (tmp_path / "b" / s.name).read_bytes()
    assert m1.num_samples == 10 and [s.samples for s in m1.shards] == [3, 3, 3, 1]


def test_size_cap_rolls_shards(tmp_path):
    m = write_volumes(tmp_path / "a", max_shard_samples=None, max_shard_bytes=6000)
    assert len(m.shards) > 1 and all(s.bytes <= 6000 + 10240 for s in m.shards)


def test_select_metadata_and_vocab(volumes_set):
    ss = gs.ShardSet.open(volumes_set)
    assert ss.select(diagnosis="AD") == [k for k, m in ss.metadata().items() if m.diagnosis == "AD"]
    assert len(ss.select(diagnosis=["HC", "AD"], sex="M")) == sum(
        1 for m in ss.metadata().values() if m.diagnosis in ("HC", "AD") and m.sex == "M")
    assert ss.select(lambda m: m.age >= 28) == ["syn-sub-008-ses-1-t1", "syn-sub-009-ses-1-t1"]
    assert ss.manifest.vocab["diagnosis"] == ["AD", "HC", "MCI"]
    with pytest.raises(ValueError, match="unknown metadata field"):
        ss.select(agee=3)


def test_merge_equals_single_write(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(make_meta(i), brain(rng)) for i in range(9)]
    prod = gs.Producer(package="g3n-shards")
    geom = gs.Geometry(shape=SHAPE)

    def write(out, items):
        with gs.ShardWriter(out, kind="volumes", producer=prod, geometry=geom, max_shard_samples=4) as w:
            for m, v in sorted(items, key=lambda mv: gs.sample_key(mv[0])):
                w.write(gs.sample_key(m), m, {"volume": v})
        return out

    whole = gs.ShardSet.open(write(tmp_path / "whole", samples))
    parts = [write(tmp_path / f"p{i}", samples[i::3]) for i in range(3)]
    merged = gs.merge_shard_sets(parts, tmp_path / "merged", max_shard_samples=4)
    assert merged.digest == whole.digest
    assert [s.sha256 for s in merged.shards] == [s.sha256 for s in whole.manifest.shards]


def test_stored_dtype_hands_out_float16(volumes_set):
    as_f32 = gs.ShardSet.open(volumes_set)
    as_f16 = gs.ShardSet.open(volumes_set, stored_dtype=True)
    a, b = as_f32.get(as_f32.keys()[0]), as_f16.get(as_f32.keys()[0])
    assert b.arrays["volume"].dtype == np.float16
    assert np.array_equal(b.arrays["volume"].astype(np.float32), a.arrays["volume"])


def test_subset_keeps_order_vocab_and_names_parent(volumes_set, tmp_path):
    src = gs.ShardSet.open(volumes_set)
    keys = src.keys()[::3]
    m = gs.subset_shard_set(src, keys, tmp_path / "sub")
    sub = gs.ShardSet.open(tmp_path / "sub")
    assert sub.keys() == keys and m.parents[0].digest == src.digest and m.vocab == src.manifest.vocab
    assert np.array_equal(sub.get(keys[1]).arrays["volume"], src.get(keys[1]).arrays["volume"])
    with pytest.raises(gs.ShardError, match="not in"):
        gs.subset_shard_set(src, ["nope"], tmp_path / "sub2")


def test_merge_of_a_set_written_out_of_key_order_reads_each_shard_once(tmp_path, monkeypatch):
    """A set written in completion order (parallel workers) is merged in key order by looking its keys
    up; the lookups go through a cache of the shards read last, so each shard is read once, not once
    per key. A lookup that asks for verification reads its shard again, checked; a pickled set
    (handed to a worker process) leaves its cache behind."""
    import pickle

    from g3n_shards import reader

    rng = np.random.default_rng(1)
    samples = [(make_meta(i), brain(rng)) for i in range(9)]
    prod, geom = gs.Producer(package="g3n-shards"), gs.Geometry(shape=SHAPE)
    shuffled = [samples[i] for i in (4, 0, 8, 2, 6, 1, 7, 3, 5)]
    with gs.ShardWriter(tmp_path / "unsorted", kind="volumes", producer=prod, geometry=geom, max_shard_samples=5) as w:
        for m, v in shuffled:
            w.write(gs.sample_key(m), m, {"volume": v})
    with gs.ShardWriter(tmp_path / "whole", kind="volumes", producer=prod, geometry=geom, max_shard_samples=5) as w:
        for m, v in sorted(samples, key=lambda mv: gs.sample_key(mv[0])):
            w.write(gs.sample_key(m), m, {"volume": v})
    reads: list[tuple[str, bool]] = []
    load = gs.ShardSet._load_shard
    monkeypatch.setattr(gs.ShardSet, "_load_shard", lambda self, info, verify: reads.append((info.name, verify)) or load(self, info, verify))
    src = gs.ShardSet.open(tmp_path / "unsorted")
    assert src.keys() != sorted(src.keys()) and len(src.manifest.shards) == 2
    merged = gs.merge_shard_sets([src], tmp_path / "merged", max_shard_samples=5)
    assert merged.digest == gs.ShardSet.open(tmp_path / "whole").digest
    assert sorted(reads) == [("volumes-000000.tar", True), ("volumes-000001.tar", True)]  # verified by default
    unchecked = gs.ShardSet.open(tmp_path / "unsorted", verify=False)
    key = src.keys()[0]
    reads.clear()
    unchecked.get(key), unchecked.get(key, verify=True), unchecked.get(key, verify=True), unchecked.get(key)
    assert reads == [("volumes-000000.tar", False), ("volumes-000000.tar", True)]  # read once more to verify, then served
    # over the byte budget one shard stays: alternating lookups read again, and still give the right samples
    first, last = src.keys()[0], src.keys()[-1]  # in the first and the second shard
    want = {k: v for m, v in samples for k in (gs.sample_key(m),) if k in (first, last)}
    monkeypatch.setattr(reader, "RECENT_SHARD_BYTES", 1)
    fresh = gs.ShardSet.open(tmp_path / "unsorted")
    reads.clear()
    for k in (first, last, first):
        assert np.allclose(fresh.get(k).arrays["volume"], want[k], rtol=1e-3, atol=1e-3)
    assert [n for n, _ in reads] == ["volumes-000000.tar", "volumes-000001.tar", "volumes-000000.tar"]
    clone = pickle.loads(pickle.dumps(src))
    assert not clone._recent and clone.get(last).key == last
