"""Volumes reach the encoder in brain z-space because their set says what they hold, never because
of the sign of a voxel; and only real input errors are reported as bad input (exit 2)."""

from __future__ import annotations

import numpy as np
import pytest

import g3n_shards as gs
from g3n_eval.cli import main
from g3n_eval.data import InputError
from g3n_eval.models import MAEFeatures
from g3n_eval.sources import features_of, volumes_of
from g3n_shards.intensity import zscore_brain
from g3n_shards.testing import brain_like, make_meta

SHAPE = (32, 32, 32)  # the test MAE preset's input (conftest.SHAPE)

PREPROCESS = {"preset": "demo", "clip_negative": True, "interpolation": "bspline", "seed": 0}


def _write(path, vols, producer, extra=None):
    with gs.ShardWriter(path, kind="volumes", producer=producer, extra=extra or {},
                        geometry=gs.Geometry(shape=SHAPE, spacing=(2.0, 2.0, 2.0), patch_size=(8, 8, 8))) as w:
        for i, v in enumerate(vols):
            m = make_meta(i)
            w.write(gs.sample_key(m), m, {"volume": v})
    return path


@pytest.fixture(scope="module")
def raw_volumes():
    """Scanner-unit volumes, and the same with the negative undershoot a B-spline resampling leaves
    around the brain when ``clip_negative`` is false (what preprocessing clips by default)."""
    rng = np.random.default_rng(0)
    clipped = [brain_like(rng, SHAPE) for _ in range(3)]
    unclipped = []
    for v in clipped:
        u = v.copy()
        rim = (v == 0) & (np.roll(v, 1, 0) > 0)  # background voxels next to the brain
        u[rim] = -rng.uniform(1, 40, int(rim.sum()))
        assert (u < 0).any()
        unclipped.append(u)
    return clipped, unclipped


@pytest.fixture(scope="module")
def sets(tmp_path_factory, raw_volumes):
    root = tmp_path_factory.mktemp("intensity")
    clipped, unclipped = raw_volumes
    return {
        "clipped": _write(root / "clipped", clipped, gs.Producer(package="g3n-data", config=PREPROCESS)),
        "unclipped": _write(root / "unclipped", unclipped,
                            gs.Producer(package="g3n-data", config={**PREPROCESS, "clip_negative": False})),
        "zspace": _write(root / "zspace", [zscore_brain(v)[0] for v in clipped], gs.Producer(package="elsewhere"),
                         extra={"intensity": "zscored-brain"}),
        "unrecorded": _write(root / "unrecorded", clipped, gs.Producer(package="elsewhere")),
        "unknown": _write(root / "unknown", clipped, gs.Producer(package="elsewhere"), extra={"intensity": "minmax"}),
    }


def test_clip_negative_false_set_is_z_scored_like_the_loaders(sets, raw_volumes):
    """The old rule (a negative voxel means z-space) passed these volumes to the encoder in scanner
    units (values ~800). Read from the manifest, they are z-scored, negatives counting as background
    exactly as in g3n-mae's loader, so they equal the clipped set's."""
    stored = {s.key: s.arrays["volume"] for s in gs.ShardSet.open(sets["unclipped"])}  # float16 on disk
    got = volumes_of(sets["unclipped"], None)
    for key, z in zip(got.keys, got.arrays):
        u = stored[key]
        assert float(u.min()) < 0 and np.abs(z).max() < 10 < np.abs(u).max()
        np.testing.assert_array_equal(z, zscore_brain(np.clip(u, 0, None))[0])
    np.testing.assert_array_equal(np.stack(got.arrays), np.stack(volumes_of(sets["clipped"], None).arrays))


def test_encoder_features_do_not_depend_on_the_clipping(sets, mae_weights):
    enc = MAEFeatures(mae_weights)
    a, _ = features_of(sets["clipped"], enc, None)
    b, _ = features_of(sets["unclipped"], enc, None)
    np.testing.assert_array_equal(a.X, b.X)


def test_z_space_set_is_used_as_it_is(sets):
    stored = {s.key: s.arrays["volume"] for s in gs.ShardSet.open(sets["zspace"])}
    got = volumes_of(sets["zspace"], None)
    for key, z in zip(got.keys, got.arrays):
        np.testing.assert_array_equal(z, stored[key])  # not z-scored a second time
        assert not np.allclose(z, zscore_brain(stored[key])[0], atol=1e-3)


@pytest.mark.parametrize("name, why", [("unrecorded", "does not record what its voxel values mean"),
                                       ("unknown", "records intensity space 'minmax'")])
def test_sets_without_a_usable_space_are_refused(sets, name, why, tmp_path, capsys):
    with pytest.raises(InputError, match=why):
        volumes_of(sets[name], None)
    assert main(["raw-features", "--volumes", str(sets[name]), "--out", str(tmp_path / "raw"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("g3n-eval raw-features: error: ") and why in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_recon_reads_the_spaces_of_both_sets(sets, tmp_path):
    """Real volumes in scanner units against their z-space twins: a perfect reconstruction."""
    assert main(["recon", "--volumes", str(sets["unclipped"]), "--recon", str(sets["zspace"]),
                 "--out", str(tmp_path / "r"), "--save-recon", "--no-progress"]) == 0
    import json

    doc = json.loads((tmp_path / "r" / "recon.json").read_text())
    assert doc["settings"]["intensity"] == {"real": "scanner", "recon": "zscored-brain"}
    assert doc["results"]["summary"]["mse_brain"]["mean"] < 1e-5  # float16 storage of the z values
    saved = gs.ShardSet.open(tmp_path / "r" / "recon-volumes")
    assert saved.manifest.extra["intensity"] == "zscored-brain"  # what eval writes says what it holds


# ---- exit 2 only for input errors --------------------------------------------------------------


def test_input_errors_exit_2_with_one_line(sets, tmp_path, capsys):
    cases = [
        ["raw-features", "--volumes", str(sets["clipped"]), "--factor", "0"],
        ["recon", "--volumes", str(sets["clipped"])],
        ["controllability", "--real", str(sets["clipped"]), "--generated", str(sets["clipped"]), "--task", "sex"],
        ["memorisation", "--synthetic", str(tmp_path / "nope.npy"), "--train", str(sets["clipped"]),
         "--heldout", str(sets["clipped"])],
        ["forecast", "--forecasts", str(sets["clipped"]), "--baselines", str(sets["clipped"]), "--encoder", "x"],
    ]
    for argv in cases:
        assert main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"g3n-eval {argv[0]}: error: ") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("a bug"), FileNotFoundError("a bug")])
def test_internal_errors_keep_their_traceback(sets, tmp_path, monkeypatch, exc):
    """A ValueError/KeyError from inside the program is a bug, not bad input: it propagates (the
    interpreter prints its traceback and exits 1) instead of becoming a one-line exit 2."""
    import g3n_eval.baselines

    def broken(*a, **k):
        raise exc

    monkeypatch.setattr(g3n_eval.baselines, "raw_voxel_features", broken)
    with pytest.raises(type(exc), match="a bug"):
        main(["raw-features", "--volumes", str(sets["clipped"]), "--out", str(tmp_path / "o"), "--no-progress"])
