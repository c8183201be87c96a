import io
import json
import re
import tarfile

import numpy as np
import pytest
import zstandard as zstd

import g3n_shards as gs
from g3n_shards.manifest import canonical_json, sha256_hex

from g3n_shards.testing import make_meta, write_volume_set as write_volumes
SHAPE = (16, 20, 16)


def _consume(ss):
    return [s.key for s in ss]


def test_flipped_byte_detected_naming_shard(volumes_set):
    shard = volumes_set / "volumes-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1500] ^= 0xFF  # inside the first member's payload
    shard.write_bytes(bytes(data))
    ss = gs.ShardSet.open(volumes_set)
    with pytest.raises(gs.ChecksumError, match="volumes-000001.tar.*SHA-256"):
        ss.verify()
    with pytest.raises(gs.ShardError, match="volumes-000001.tar"):
        list(ss.iter_split(shuffle=False, verify=True))


def test_flipped_payload_byte_caught_without_verify(volumes_set):
    """zstd frame checksums catch payload damage even when the SHA-256 check is off."""
    shard = volumes_set / "volumes-000000.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as t:
        member = [m for m in t.getmembers() if m.name.endswith(".volume.zst")][0]
    data[member.offset_data + member.size // 2] ^= 0x55
    shard.write_bytes(bytes(data))
    with pytest.raises(gs.ShardError, match="volumes-000000.tar"):
        _consume(gs.ShardSet.open(volumes_set))


def test_truncated_tar_detected(volumes_set):
    shard = volumes_set / "volumes-000002.tar"
    shard.write_bytes(shard.read_bytes()[:4000])
    ss = gs.ShardSet.open(volumes_set)
    with pytest.raises(gs.ChecksumError, match="volumes-000002.tar: truncated"):
        _consume(ss)
    with pytest.raises(gs.ChecksumError, match="volumes-000002.tar"):
        ss.verify()


def test_missing_shard_detected(volumes_set):
    (volumes_set / "volumes-000003.tar").unlink()
    ss = gs.ShardSet.open(volumes_set)
    with pytest.raises(gs.ShardError, match="missing file .*volumes-000003.tar"):
        _consume(ss)
    with pytest.raises(gs.ChecksumError, match="volumes-000003.tar"):
        ss.verify()


def _rewrite_manifest(path, mutate):
    m = json.loads((path / "manifest.json").read_text())
    mutate(m)
    body = {k: v for k, v in m.items() if k not in ("digest", "created")}
    m["digest"] = "sha256:" + sha256_hex(canonical_json(body))
    (path / "manifest.json").write_text(json.dumps(m))


def test_unknown_kind_and_major_version_refused(volumes_set):
    _rewrite_manifest(volumes_set, lambda m: m.update(schema_version="2.0"))
    with pytest.raises(gs.ShardFormatError, match=r"unsupported schema version 2\.0 of kind 'volumes'.*1\.x"):
        gs.ShardSet.open(volumes_set)
    _rewrite_manifest(volumes_set, lambda m: m.update(schema_version="1.7"))
    assert len(gs.ShardSet.open(volumes_set)) == 10  # a newer minor version is readable
    _rewrite_manifest(volumes_set, lambda m: m.update(kind="meshes", schema_version="1.0"))
    with pytest.raises(gs.ShardFormatError, match="unknown shard kind 'meshes'"):
        gs.ShardSet.open(volumes_set)


def test_edited_manifest_and_index_detected(volumes_set):
    idx = volumes_set / "index.jsonl"
    idx.write_text(idx.read_text().replace('"age":20.0', '"age":21.0'))
    with pytest.raises(gs.ChecksumError, match="index.jsonl"):
        gs.ShardSet.open(volumes_set)
    m = json.loads((volumes_set / "manifest.json").read_text())
    m["num_samples"] = 11
    (volumes_set / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(gs.ShardFormatError, match="digest mismatch"):
        gs.ShardSet.open(volumes_set)


def test_killed_or_failed_writer_leaves_no_valid_set(tmp_path):
    out = tmp_path / "v"
    with pytest.raises(RuntimeError):
        with gs.ShardWriter(out, kind="volumes", producer=gs.Producer(package="t"), max_shard_samples=1) as w:
            for i in range(3):
                w.write(f"k{i}", make_meta(i), {"volume": np.ones(SHAPE, np.float32)})
            raise RuntimeError("killed")
    assert not any(out.iterdir())
    with pytest.raises(gs.ShardError, match="no manifest.json"):
        gs.ShardSet.open(out)
    # a writer that never closes leaves only its staging folder: no set (see test_files.py for who removes it)
    w = gs.ShardWriter(out, kind="volumes", producer=gs.Producer(package="t"))
    w.write("k", make_meta(0), {"volume": np.ones(SHAPE, np.float32)})
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))
    w.abort()
    write_volumes(out, n=2)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(gs.ShardError, match="already holds a shard set"):
        write_volumes(out, n=2)


def _hostile_set(tmp_path, members):
    """A set whose only shard holds ``members`` (name, bytes[, type]) with a matching manifest."""
    out = tmp_path / "h"
    write_volumes(out, n=1, max_shard_samples=None)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data, *kind in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if kind:
                info.type, info.size, info.linkname = kind[0], 0, "/etc/passwd"
            t.addfile(info, io.BytesIO(data) if not kind else None)
    raw = buf.getvalue()
    (out / "volumes-000000.tar").write_bytes(raw)
    _rewrite_manifest(out, lambda m: m["shards"][0].update(bytes=len(raw), sha256=sha256_hex(raw)))
    return gs.ShardSet.open(out)


def _doc(key, shape=list(SHAPE), dtype="float16"):
    return canonical_json({"key": key, "meta": make_meta(0).model_dump(mode="json"),
                           "arrays": {"volume": {"dtype": dtype, "shape": shape}}})


@pytest.mark.parametrize("name", ["../evil.json", "/abs.json", "dir/x.json", "..json"])
def test_hostile_member_names_refused(tmp_path, name):
    ss = _hostile_set(tmp_path, [(name, b"{}")])
    with pytest.raises(gs.ShardError, match="member name"):
        _consume(ss)
    assert not (tmp_path / "evil.json").exists()


def test_links_refused(tmp_path):
    ss = _hostile_set(tmp_path, [("x.json", b"", tarfile.SYMTYPE)])
    with pytest.raises(gs.ShardError, match="non-regular member"):
        _consume(ss)


def test_decompression_bomb_refused(tmp_path):
    bomb = zstd.ZstdCompressor(level=19).compress(bytes(50_000_000))  # 50 MB of zeros in a few KB
    key = "syn-sub-000-ses-1-t1"
    ss = _hostile_set(tmp_path, [(f"{key}.json", _doc(key)), (f"{key}.volume.zst", bomb)])
    with pytest.raises(gs.ShardError, match="would decompress to 50000000 bytes"):
        _consume(ss)


@pytest.mark.parametrize("dtype,shape,match", [("object", list(SHAPE), "not allowed"),
                                               ("float16", [10**6, 10**6, 10**6], "the set's geometry is"),
                                               ("float16", [1024, 512, 512], "the set's geometry is"),
                                               ("float16", [16, 20], "not allowed")])
def test_bad_declarations_refused(tmp_path, dtype, shape, match):
    key = "syn-sub-000-ses-1-t1"
    payload = zstd.ZstdCompressor().compress(bytes(16))
    ss = _hostile_set(tmp_path, [(f"{key}.json", _doc(key, shape, dtype)), (f"{key}.volume.zst", payload)])
    with pytest.raises(gs.ShardError, match=match):
        _consume(ss)


def test_declared_size_limit_without_geometry():
    """Where the set records no shape, the byte ceiling still refuses a huge declaration before decoding."""
    from g3n_shards.codec import decode_array

    payload = zstd.ZstdCompressor().compress(bytes(16))
    with pytest.raises(gs.ShardError, match="exceeds"):
        decode_array(payload, "float16", [10**6, 10**6, 10**6], "x")


def test_pickle_payload_never_unpickled(tmp_path):
    key = "syn-sub-000-ses-1-t1"
    ss = _hostile_set(tmp_path, [(f"{key}.json", _doc(key)), (f"{key}.volume.pickle", b"cos\nsystem\n(S'touch pwned'\ntR.")])
    with pytest.raises(gs.ShardError, match="do not match the declared arrays"):
        _consume(ss)


# ---- edits a normal read must refuse, and `g3n-shards verify` must report ---------------------------
def _edit_label(path, resign: bool):
    """Same-length edit of one sample's sex (F -> M) inside its shard's JSON member; with ``resign`` the
    manifest is rewritten to the edited shard's size and SHA-256 (and its digest recomputed)."""
    shard = path / "volumes-000000.tar"
    data = shard.read_bytes()
    at = data.index(b'"sex":"F"')
    edited = data[:at] + b'"sex":"M"' + data[at + 9 :]
    shard.write_bytes(edited)
    if resign:
        _rewrite_manifest(path, lambda m: m["shards"][0].update(bytes=len(edited), sha256=sha256_hex(edited)))
    return "syn-sub-001-ses-1-t1"  # make_meta(1) is the first F of the first shard


def test_label_edit_refused_by_a_normal_read_naming_the_shard(volumes_set):
    key = _edit_label(volumes_set, resign=False)
    ss = gs.ShardSet.open(volumes_set)
    with pytest.raises(gs.ChecksumError, match=r"volumes-000000\.tar: SHA-256 mismatch: the shard was modified"):
        _consume(ss)
    with pytest.raises(gs.ChecksumError, match=r"volumes-000000\.tar: SHA-256 mismatch"):
        ss.get(key)
    with pytest.raises(gs.ChecksumError, match="SHA-256"):
        list(ss.iter_split(0, 2, 0, 2, seed=1))
    # the opt-out skips the hash, but the sample's JSON still has to agree with the index
    with pytest.raises(gs.ShardError, match=rf"volumes-000000\.tar:{key}: .*differs from index\.jsonl "
                                            r"\(sex: index 'F', sample JSON 'M'\)"):
        _consume(gs.ShardSet.open(volumes_set, verify=False))
    # other shards are untouched and still read
    assert len(list(gs.ShardSet.open(volumes_set).iter_split(1, 4, 0, 1, shuffle=False))) == 3


def test_label_edit_with_a_resigned_manifest_refused_by_reader_and_verify(volumes_set, capsys):
    from g3n_shards.cli import main

    key = _edit_label(volumes_set, resign=True)
    ss = gs.ShardSet.open(volumes_set)  # the manifest checks out: only the cross-check can tell
    with pytest.raises(gs.ShardError, match=rf"{key}: .*differs from index\.jsonl \(sex: index 'F', sample JSON 'M'\)"):
        _consume(ss)
    assert main(["verify", "-q", str(volumes_set)]) == 1
    err = capsys.readouterr().err
    assert f"volumes-000000.tar:{key}" in err and "sex: index 'F', sample JSON 'M'" in err


def _payload():
    from g3n_shards.codec import encode_array

    return encode_array(np.zeros(SHAPE, np.float32), "float16")


KEY = "syn-sub-000-ses-1-t1"
HOSTILE = {  # members of the set's only shard (the index lists KEY, with make_meta(0)) -> the reason refused
    "zstd bomb under valid JSON": (lambda: [(f"{KEY}.json", _doc(KEY)),
                                            (f"{KEY}.volume.zst", zstd.ZstdCompressor(level=19).compress(bytes(8_000_000)))],
                                   KEY, "would decompress to 8000000 bytes"),
    "pickle bytes as a payload": (lambda: [(f"{KEY}.json", _doc(KEY)), (f"{KEY}.volume.pickle", b"cos\nsystem\n(S'x'\ntR.")],
                                  KEY, "do not match the declared arrays"),
    "an extra .pyd member": (lambda: [(f"{KEY}.json", _doc(KEY)), (f"{KEY}.volume.zst", _payload()), (f"{KEY}.pyd", b"MZ")],
                             KEY, "do not match the declared arrays"),
    "a key absent from the index": (lambda: [("stranger.json", _doc("stranger")), ("stranger.volume.zst", _payload())],
                                    "stranger", "is in the shard but not in index.jsonl"),
    "a shape the geometry does not allow": (lambda: [(f"{KEY}.json", _doc(KEY, [1024, 512, 512], "float32")),
                                                     (f"{KEY}.volume.zst", _payload())],
                                            KEY, "the set's geometry is"),
    "malformed sample JSON": (lambda: [(f"{KEY}.json", b'{"key": "' + KEY.encode() + b'", "meta": {'),
                                       (f"{KEY}.volume.zst", _payload())],
                              KEY, "malformed sample JSON"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_verify_reports_whatever_a_normal_read_refuses(tmp_path, capsys, case):
    from g3n_shards.cli import main

    members, key, reason = HOSTILE[case]
    ss = _hostile_set(tmp_path, members())  # the manifest is re-signed to the hostile shard: it opens
    with pytest.raises(gs.ShardError, match=re.escape(reason)):
        _consume(ss)
    assert main(["verify", "-q", str(tmp_path / "h")]) == 1
    err = capsys.readouterr().err
    assert f"volumes-000000.tar:{key}" in err and reason in err, err
    problems = gs.ShardSet.open(tmp_path / "h").scan()
    assert len(problems) == 1 and reason in problems[0]


def test_an_empty_set_reads_as_empty(tmp_path, capsys):
    """A set with 0 samples (a cohort whose every input was rejected) has no shards: every reader gets nothing."""
    from g3n_shards.cli import main

    with gs.ShardWriter(tmp_path / "e", kind="volumes", producer=gs.Producer(package="t")):
        pass
    ss = gs.ShardSet.open(tmp_path / "e", kind="volumes")
    assert len(ss) == 0 and ss.manifest.shards == [] and list(ss) == []
    assert list(ss.iter_split(1, 2, 1, 3, seed=0, epoch=4)) == [] and ss.verify() == [] and ss.scan() == []
    assert main(["verify", "-q", str(tmp_path / "e")]) == 0
    assert "0 shards, 0 samples" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "e")]) == 0
    assert "0 samples" in capsys.readouterr().out
