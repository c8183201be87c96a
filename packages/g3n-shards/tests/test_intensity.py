"""The intensity space a volumes set records, and the one brain z-score."""

from __future__ import annotations

import numpy as np
import pytest

import g3n_shards as gs
from g3n_shards.intensity import (SCANNER, ZSCORED_BRAIN, IntensityError, ZScoreError, intensity_of, to_zspace,
                                  zscore_brain)
from g3n_shards.testing import brain_like, make_meta, write_volume_set


def test_zscore_brain_matches_the_formula_and_keeps_background():
    rng = np.random.default_rng(0)
    v = brain_like(rng, (12, 14, 10))
    v[0, 0, 0] = -3.0  # interpolation undershoot: background, as in the loaders
    z, mean, std = zscore_brain(v, "k")
    brain = v > 0
    vals = v[brain].astype(np.float64)
    assert mean == pytest.approx(vals.mean()) and std == pytest.approx(vals.std())
    np.testing.assert_allclose(z[brain], (vals - vals.mean()) / vals.std(), rtol=1e-5, atol=1e-6)
    assert z.dtype == np.float32 and (z[~brain] == 0).all()
    assert z[brain].mean() == pytest.approx(0, abs=1e-5) and z[brain].std() == pytest.approx(1, abs=1e-5)


def test_zscore_brain_edge_cases_name_the_sample():
    z, _, std = zscore_brain(np.where(np.arange(8).reshape(2, 2, 2) > 3, 5.0, 0.0), "const")
    assert std == 1.0 and set(np.unique(z)) == {0.0}  # a constant brain is centred, not divided by 0
    with pytest.raises(ZScoreError, match="sample empty: no brain voxel"):
        zscore_brain(np.zeros((3, 3, 3)), "empty")
    bad = np.ones((3, 3, 3))
    bad[1, 1, 1] = np.nan
    with pytest.raises(ZScoreError, match="sample nan: .*NaN"):
        zscore_brain(bad, "nan")
    assert issubclass(ZScoreError, ValueError)  # the loaders' reject paths catch ValueError


def _manifest(tmp_path, name, producer=None, **writer_kwargs):
    if producer is None:
        return write_volume_set(tmp_path / name, n=2, shape=(8, 8, 8), patch_size=(4, 4, 4), **writer_kwargs)
    with gs.ShardWriter(tmp_path / name, kind="volumes", producer=producer, **writer_kwargs) as w:
        w.write("a", make_meta(0), {"volume": np.ones((4, 4, 4), np.float32)})
    return w.manifest


def test_recorded_space_is_read_never_guessed(tmp_path):
    assert intensity_of(_manifest(tmp_path, "s", extra={"intensity": "scanner"})) == SCANNER
    assert intensity_of(_manifest(tmp_path, "z", extra={"intensity": "zscored-brain"})) == ZSCORED_BRAIN
    with pytest.raises(IntensityError, match=r"the-set: the manifest does not record what its voxel values mean"):
        intensity_of(_manifest(tmp_path, "none"), "the-set")
    with pytest.raises(IntensityError, match="the-set: records intensity space 'minmax'"):
        intensity_of(_manifest(tmp_path, "odd", extra={"intensity": "minmax"}), "the-set")
    assert issubclass(IntensityError, gs.ShardError)


@pytest.mark.parametrize("config", [{"clip_negative": True, "seed": 0}, {"clip_negative": False},
                                    {"synth": {"seed": 1}}])
def test_g3n_data_sets_from_before_the_field_are_scanner_units(tmp_path, config):
    """g3n-data's preprocessing records its whole config (clip_negative among it), its synthetic
    cohort {"synth": ...}: both write scanner units."""
    m = _manifest(tmp_path, "d", producer=gs.Producer(package="g3n-data", config=config))
    assert intensity_of(m) == SCANNER


def test_another_producer_without_the_field_is_refused(tmp_path):
    m = _manifest(tmp_path, "o", producer=gs.Producer(package="g3n-data", config={"something": 1}))
    with pytest.raises(IntensityError, match="'g3n-data'"):
        intensity_of(m)


def test_to_zspace_scores_once():
    rng = np.random.default_rng(1)
    v = brain_like(rng, (8, 8, 8))
    z = to_zspace(v, "scanner")
    np.testing.assert_array_equal(to_zspace(v, "original"), z)
    np.testing.assert_array_equal(to_zspace(z, "zscored-brain"), z)  # z-space volumes stay as they are
    with pytest.raises(IntensityError, match="unknown intensity space"):
        to_zspace(v, "guess")
