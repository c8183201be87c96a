"""g3n-eval raw-features: the raw-voxel baseline as a feature table g3n-probe reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

import g3n_shards as gs
from g3n_eval.baselines import block_mean, raw_voxel_features
from g3n_eval.cli import main
from g3n_eval.models import zscore_brain
from g3n_probe.features import load_features
from g3n_shards.testing import write_volume_set


def test_block_mean_crops_to_whole_blocks():
    v = np.arange(5 * 6 * 4, dtype=np.float32).reshape(5, 6, 4)
    out = block_mean(v, 2)
    assert out.shape == (2, 3, 2)
    assert out[1, 2, 1] == pytest.approx(v[2:4, 4:6, 2:4].mean())
    with pytest.raises(ValueError, match="smaller than one"):
        block_mean(v[:1], 2)


def test_raw_features_are_the_encoders_z_scored_voxels_and_probe_ready(tmp_path):
    src = tmp_path / "vols"
    write_volume_set(src, n=6, shape=(16, 20, 16), extra={"intensity": "scanner"})
    assert main(["raw-features", "--volumes", str(src), "--out", str(tmp_path / "raw"), "--factor", "4",
                 "--no-progress"]) == 0
    fs = load_features(tmp_path / "raw")
    ss = gs.ShardSet.open(src)
    assert fs.X.shape == (6, 4 * 5 * 4)
    first = next(iter(ss))
    row = list(fs.keys).index(first.key)
    np.testing.assert_allclose(fs.X[row], block_mean(zscore_brain(first.arrays["volume"]), 4).ravel(), rtol=1e-5)
    made = json.loads((tmp_path / "raw" / "features.json").read_text())
    assert made["kind"] == "raw-voxels" and made["made_from"]["digest"] == ss.digest


def test_a_volume_without_brain_is_a_reject_not_a_row(tmp_path):
    src = tmp_path / "vols"
    write_volume_set(src, n=3, shape=(8, 8, 8), patch_size=(4, 4, 4), extra={"intensity": "scanner"})
    ss = gs.ShardSet.open(src)
    bad = tmp_path / "with-empty"
    with gs.ShardWriter(bad, kind="volumes", producer=gs.Producer(package="test"), geometry=ss.manifest.geometry,
                        extra={"intensity": "scanner"}) as w:
        for s in ss:
            w.write(s.key, s.meta, s.arrays)
        meta = s.meta.model_copy(update={"subject": "empty"})
        w.write(gs.sample_key(meta), meta, {"volume": np.zeros((8, 8, 8), np.float32)})
    raw_voxel_features(bad, tmp_path / "raw", factor=2, progress=False)
    rejects = [json.loads(line) for line in (tmp_path / "raw" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and "no brain voxel" in rejects[0]["reason"]
    assert len(load_features(tmp_path / "raw").keys) == 3
