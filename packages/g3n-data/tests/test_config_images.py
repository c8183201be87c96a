"""Config presets, input checks and orientation/affine round trips."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helpers importable
from datahelpers import ixi_paths, save, save_broken_affine  # noqa: E402

from g3n_data.atlas import load_atlas
from g3n_data.config import PreprocessConfig, load_config, make_config
from g3n_data.images import InputError, grid_affine, load_volume, save_nifti, to_array


def test_presets_geometry():
    paper, demo = make_config("paper"), make_config("demo")
    assert paper.geometry.shape == (160, 192, 160) and paper.geometry.spacing == 1.0
    assert paper.geometry.patch_size == (16, 16, 16)
    assert demo.geometry.shape == (80, 96, 80) and demo.geometry.spacing == 2.0
    for c in (paper, demo):  # 10 x 12 x 10 = 1200 tokens in both
        grid = [s // p for s, p in zip(c.geometry.shape, c.geometry.patch_size)]
        assert grid == [10, 12, 10]
    assert paper.geometry.box_start == (40, 30, -3)
    assert paper.threads == 1 and paper.skullstrip.method == "robex"
    assert paper.digest() != demo.digest()


def test_config_file_refuses_unknown_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: demo\nregistration: {iterashuns: 3}\n")
    with pytest.raises(ValueError, match="iterashuns"):
        load_config(p)
    p.write_text("preset: demo\nskullstrip: {method: none}\n")
    c = load_config(p)
    assert c.preset == "demo" and c.skullstrip.method == "none" and c.geometry.shape == (80, 96, 80)
    with pytest.raises(ValueError, match="patch_size"):
        PreprocessConfig.model_validate({"geometry": {"shape": [80, 96, 81], "patch_size": [8, 8, 8]}})


@pytest.mark.parametrize(
    "name,make,reason",
    [
        ("corrupt", lambda p: p.write_bytes(b"\x1f\x8b not really a gzip nifti"), "unreadable or corrupt file"),
        ("flat2d", lambda p: save(np.random.rand(32, 32).astype(np.float32), p), "not a 3D volume"),
        ("series4d", lambda p: save(np.random.rand(16, 16, 16, 3).astype(np.float32), p), "not a 3D volume"),
        ("nan", lambda p: save(np.where(np.arange(4096).reshape(16, 16, 16) == 7, np.nan, 1.0).astype(np.float32), p),
         "NaN or Inf voxels"),
        ("inf", lambda p: save(np.where(np.arange(4096).reshape(16, 16, 16) == 7, np.inf, 1.0).astype(np.float32), p),
         "NaN or Inf voxels"),
        ("empty", lambda p: save(np.zeros((16, 16, 16), np.float32), p), "empty image"),
        ("zeroaffine", lambda p: save_broken_affine(p, 0.0), "broken affine"),
        ("nanaffine", lambda p: save_broken_affine(p, float("nan")), "broken affine"),
        ("shear", lambda p: save(np.random.rand(16, 16, 16).astype(np.float32), p,
                                 np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])), "broken affine"),
    ],
)
def test_load_refuses_bad_input(tmp_path, name, make, reason):
    p = tmp_path / f"{name}.nii.gz"
    make(p)
    with pytest.raises(InputError) as e:
        load_volume(p)
    assert e.value.reason == reason
    assert str(p) in str(e.value)


def test_trailing_singleton_is_squeezed(tmp_path):
    p = save(np.random.rand(16, 16, 16, 1).astype(np.float32) + 1, tmp_path / "x.nii.gz")
    im, info = load_volume(p)
    assert im.GetSize() == (16, 16, 16) and info["shape"] == [16, 16, 16]


def test_orientation_does_not_matter_and_affine_round_trips(tmp_path):
    """The same IXI scan stored PSR and reoriented to RAS lands on the identical atlas-grid array;
    writing the result with the recorded affine and reading it back gives the same array and grid."""
    src = ixi_paths()[0]
    img = nib.load(str(src))
    assert nib.aff2axcodes(img.affine) == ("P", "S", "R")
    ras = nib.as_closest_canonical(img)
    p_ras = tmp_path / "ras.nii.gz"
    nib.save(ras, str(p_ras))
    cfg = make_config("demo")
    atlas = load_atlas(cfg.atlas, cfg.geometry)
    # put the scan somewhere on the grid with a fixed transform (a stand-in for a registration)
    tx = sitk.TranslationTransform(3, (-118.0, 115.0, -68.0))
    a = to_array(sitk.Resample(load_volume(src)[0], atlas.grid, tx, sitk.sitkLinear, 0.0))
    b = to_array(sitk.Resample(load_volume(p_ras)[0], atlas.grid, tx, sitk.sitkLinear, 0.0))
    assert np.count_nonzero(a) > 0.2 * a.size
    np.testing.assert_allclose(a, b, atol=1e-3)
    # round trip through NIfTI with the grid affine
    out = tmp_path / "out.nii.gz"
    save_nifti(a, atlas.affine, out)
    back, _ = load_volume(out)
    np.testing.assert_allclose(to_array(back), a, atol=1e-4)
    np.testing.assert_allclose(grid_affine(back), atlas.affine, atol=1e-5)
    assert nib.aff2axcodes(nib.load(str(out)).affine) == ("L", "P", "S")


def test_output_grid_is_the_atlas_box():
    """Paper grid = atlas voxels x 40-199, y 30-221, z -3..156 (padded), exactly (1 mm, no interpolation)."""
    cfg = make_config("paper")
    atlas = load_atlas(cfg.atlas, cfg.geometry)
    full = to_array(atlas.brain)
    expect = np.zeros((160, 192, 160), np.float32)
    expect[:, :, 3:158] = full[40:200, 30:222, :]
    np.testing.assert_allclose(atlas.brain_on_grid, expect, atol=1e-3)
    assert atlas.mask_on_grid.sum() == np.count_nonzero(full)  # the box keeps the whole atlas brain
    # the demo grid covers the same millimetres
    demo = make_config("demo")
    ad = load_atlas(demo.atlas, demo.geometry)
    corner = lambda a: a[:3, :3] @ np.array([-0.5, -0.5, -0.5]) + a[:3, 3]
    np.testing.assert_allclose(corner(ad.affine), corner(atlas.affine), atol=1e-6)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_get_the_umask_mode(tmp_path, umask):
    """Every file g3n-data writes goes through g3n_shards' one atomic writer: the umask's mode, never mkstemp's 0600."""
    import os

    from g3n_data.qc import write_montage
    from g3n_data.worklist import write_worklist

    vol = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)
    old = os.umask(umask)
    try:
        save_nifti(vol, np.eye(4), tmp_path / "v.nii.gz")
        write_montage(tmp_path / "qc" / "m.png", vol)
        write_worklist(tmp_path / "wl", [], [], {"kind": "test"})
    finally:
        os.umask(old)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert sorted(p.name for p in files) == ["ingest_report.json", "m.png", "rejects.jsonl", "v.nii.gz", "worklist.jsonl"]
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o666 & ~umask for p in files}
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "v.nii.gz").dataobj), vol)  # gzip: .nii.gz kept
