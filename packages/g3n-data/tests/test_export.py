"""`g3n-data export-nifti`: any volumes set to .nii.gz files with the atlas affine and an index."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import g3n_shards as gs
import nibabel as nib
import numpy as np
import pytest
from g3n_data.cli import main
from g3n_data.export import INDEX_COLUMNS
from g3n_shards.testing import brain_like, make_meta, write_volume_set

SHAPE = (16, 20, 16)
#: an atlas affine as g3n-data records it: voxel -> world (RAS), x flipped, 2 mm voxels
AFFINE = [[-2.0, 0.0, 0.0, 15.0], [0.0, 2.0, 0.0, -19.0], [0.0, 0.0, 2.0, -15.0], [0.0, 0.0, 0.0, 1.0]]
REQUEST = {"stage": "sample", "conditions": {"diagnosis": "AD", "modality": "T1", "age": 70.0}, "seed": 3, "steps": 50}


@pytest.fixture
def volumes(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """3 real volumes and 1 generated (synthetic, with its request) in a set with an affine."""
    rng = np.random.default_rng(0)
    out = tmp_path / "volumes"
    arrays = {}
    with gs.ShardWriter(out, kind="volumes", producer=gs.Producer(package="g3n-data-tests"), max_shard_samples=2,
                        geometry=gs.Geometry(shape=SHAPE, spacing=(2.0, 2.0, 2.0), patch_size=(4, 4, 4),
                                             affine=AFFINE, space="SRI24")) as w:
        metas = [make_meta(i) for i in range(3)]
        metas.append(gs.SampleMeta(subject="syn-1", cohort="synthetic", modality="T1", diagnosis="AD", age=70.0,
                                   synthetic=True, request=REQUEST))
        for m in metas:
            key = gs.sample_key(m)
            arrays[key] = brain_like(rng, SHAPE) / 800.0 + 0.123  # not exactly representable in float16
            w.write(key, m, {"volume": arrays[key]})
    return out, arrays


def _index(out: Path) -> list[dict[str, str]]:
    with (out / "index.csv").open(newline="") as f:
        r = csv.DictReader(f)
        assert tuple(r.fieldnames or ()) == INDEX_COLUMNS
        return list(r)


def test_export_writes_each_volume_with_the_atlas_affine_and_an_index(volumes, tmp_path):
    src, arrays = volumes
    out = tmp_path / "nifti"
    assert main(["export-nifti", str(src), "--out", str(out), "--no-progress"]) == 0
    ss = gs.ShardSet.open(src)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{k}.nii.gz" for k in arrays] + ["export.json", "index.csv"])
    for key, original in arrays.items():
        img = nib.load(str(out / f"{key}.nii.gz"))
        data = np.asarray(img.dataobj)
        assert data.dtype == np.float32 and data.shape == SHAPE
        np.testing.assert_array_equal(data, ss.get(key).arrays["volume"])  # exactly what the set holds ...
        np.testing.assert_allclose(data, original, rtol=1e-3, atol=1e-3)  # ... which is float16: to tolerance
        assert not np.array_equal(data, original)  # (it was stored as float16 indeed)
        np.testing.assert_array_equal(img.affine, np.array(AFFINE))
        assert int(img.header["sform_code"]) == int(img.header["qform_code"]) == 1
        assert img.header.get_xyzt_units() == ("mm", "unknown")
    rows = _index(out)
    assert [r["key"] for r in rows] == sorted(arrays)
    by_key = {r["key"]: r for r in rows}
    syn = by_key["synthetic-syn-1-t1"]
    assert syn["file"] == "synthetic-syn-1-t1.nii.gz" and syn["synthetic"] == "true" and syn["diagnosis"] == "AD"
    assert json.loads(syn["request"]) == REQUEST and syn["age"] == "70" and syn["session"] == "" and syn["sex"] == ""
    real = by_key[gs.sample_key(make_meta(1))]
    assert real == {"key": real["key"], "file": f"{real['key']}.nii.gz", "subject": "sub-001", "session": "ses-1",
                    "modality": "T1", "diagnosis": "AD", "age": "21", "sex": "F", "synthetic": "false", "request": ""}
    info = json.loads((out / "export.json").read_text())
    assert info["digest"] == ss.digest and info["affine"] == AFFINE and info["files"] == 4


def test_header_is_the_one_tokenizer_decode_writes(volumes, tmp_path):
    """`g3n-tokenizer decode --format nifti` and export-nifti write the same header for one geometry."""
    shardio = pytest.importorskip("g3n_tokenizer.shardio")
    src, arrays = volumes
    out = tmp_path / "nifti"
    assert main(["export-nifti", str(src), "--out", str(out), "--no-progress"]) == 0
    key = sorted(arrays)[0]
    vol = gs.ShardSet.open(src).get(key).arrays["volume"]
    decoded = tmp_path / "decoded.nii.gz"
    shardio.write_nifti(decoded, vol, np.asarray(AFFINE, dtype=np.float64))
    ours, theirs = nib.load(str(out / f"{key}.nii.gz")), nib.load(str(decoded))
    assert ours.header.binaryblock == theirs.header.binaryblock
    np.testing.assert_array_equal(ours.affine, theirs.affine)
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))


def test_selection_keys_where_limit(volumes, tmp_path):
    src, arrays = volumes
    keys = sorted(arrays)

    def exported(*args: str) -> list[str]:
        out = tmp_path / f"sel{len(list(tmp_path.iterdir()))}"
        assert main(["export-nifti", str(src), "--out", str(out), "--no-progress", *args]) == 0
        return [r["key"] for r in _index(out)]

    assert exported("--keys", keys[2], keys[0]) == [keys[0], keys[2]]
    assert exported("--where", "diagnosis=AD") == sorted([gs.sample_key(make_meta(1)), "synthetic-syn-1-t1"])
    assert exported("--where", "diagnosis=AD", "--where", "synthetic=false") == [gs.sample_key(make_meta(1))]
    assert exported("--where", "synthetic=true", "--where", "age=70") == ["synthetic-syn-1-t1"]
    assert exported("--limit", "2") == keys[:2]


def test_bad_requests_are_refused_with_a_clear_message(volumes, tmp_path, capsys):
    src, _ = volumes
    out = tmp_path / "nifti"
    assert main(["export-nifti", str(src), "--out", str(out), "--keys", "no-such-key", "--no-progress"]) == 2
    assert "no-such-key" in capsys.readouterr().err
    assert main(["export-nifti", str(src), "--out", str(out), "--where", "colour=blue", "--no-progress"]) == 2
    assert "unknown metadata field 'colour'" in capsys.readouterr().err
    assert not out.exists()
    # a set without an affine: refused, naming the set, nothing written
    plain = tmp_path / "no-affine"
    write_volume_set(plain, n=2, shape=SHAPE)
    assert main(["export-nifti", str(plain), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(plain) in err and "no affine" in err
    assert not out.exists()


def test_rerun_refuses_without_overwrite(volumes, tmp_path, capsys):
    src, arrays = volumes
    out = tmp_path / "nifti"
    assert main(["export-nifti", str(src), "--out", str(out), "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    # again into the same folder: refused before anything is written, the earlier export untouched
    assert main(["export-nifti", str(src), "--out", str(out), "--limit", "1", "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite replaces the files; the export is deterministic (same bytes), no temp file is left
    assert main(["export-nifti", str(src), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a folder with other files only (not in the way) is fine
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["export-nifti", str(src), "--out", str(other), "--keys", sorted(arrays)[0], "--no-progress"]) == 0
    assert (other / "notes.txt").read_text() == "mine" and len(_index(other)) == 1
