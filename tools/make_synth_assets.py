#!/usr/bin/env python
"""Regenerate ``g3n_data/synth_assets/mni152_sri24_2mm.npz`` from ``../shared`` (run once, offline).

Why: the synthetic cohort (``g3n-data synth``) builds every volume from a real brain template,
but package code must never read ``../shared`` at run time. This script makes the small asset
the package ships, so its provenance is reproducible:

1. Load the MNI152 2009a T1 brain and its GM / WM probability maps (nilearn 0.14.1 copies,
   ``shared/data/real/mni152-2009a``, 1 mm, RAS, uint8 0-255).
2. Affinely register the MNI T1 brain to the SRI24 skull-stripped T1 (BraTS space,
   ``shared/data/real/sri24-atlas``) with SimpleITK: moments-centred initialisation, Mattes MI
   (32 bins), REGULAR 20 % sampling, shrink 6/4/2/1, step re-estimated each iteration, 0.25 mm
   maximum step (the setup that worked in shared/design/notes.md).
3. Resample T1, GM, WM (linear) onto the SRI24 paper crop (160x192x160 at 1 mm: SRI24 voxel
   x 40-199, y 30-221, z -3..156, LPS) and average 2x2x2 blocks to the demo grid 80x96x80 at 2 mm.
4. Store uint8 maps (0-255 = probability 0-1, T1 rescaled to 0-255), the grid's voxel->world
   affine (nibabel convention, SRI24 BraTS-space world) and the voxel->MNI-mm affine (the
   inverse registration composed with the grid), so that region definitions written in MNI
   millimetres (hippocampus, ventricles, substantia nigra...) can be evaluated on the grid.

Usage: ``uv run python tools/make_synth_assets.py --shared ../shared [--out packages/...npz]`` (the
source folder is always given: nothing in the repository reads ``../shared`` by itself)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "packages/g3n-data/src/g3n_data/synth_assets/mni152_sri24_2mm.npz"
MNI = "data/real/mni152-2009a"
SRI = "data/real/sri24-atlas"
# SRI24 BraTS-space voxel index of the paper crop's first voxel, and the crop shape (1 mm).
CROP_START = (40, 30, -3)
CROP_SHAPE = (160, 192, 160)


def _load_nib(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32).squeeze(), img.affine.astype(np.float64)


def _to_sitk(arr: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """nibabel (x,y,z) array + RAS affine -> SimpleITK image in LPS physical space."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(v) for v in (lps / spacing).ravel()))
    img.SetOrigin(tuple(float(v) for v in (np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3])))
    return img


def register_mni_to_sri(mni_t1: sitk.Image, sri_t1: sitk.Image) -> sitk.AffineTransform:
    """Affine transform mapping SRI24 (fixed) LPS points to MNI (moving) LPS points."""
    init = sitk.CenteredTransformInitializer(
        sri_t1, mni_t1, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricSamplingPercentage(0.2, seed=2025)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsGradientDescent(
        learningRate=1.0, numberOfIterations=200, convergenceMinimumValue=1e-6, convergenceWindowSize=10,
        estimateLearningRate=reg.EachIteration, maximumStepSizeInPhysicalUnits=0.25,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([6, 4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([3, 2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(init, inPlace=False)
    out = reg.Execute(sitk.Cast(sri_t1, sitk.sitkFloat32), sitk.Cast(mni_t1, sitk.sitkFloat32))
    print(f"registration: metric {reg.GetMetricValue():.4f}, stop: {reg.GetOptimizerStopConditionDescription()}")
    comp = sitk.CompositeTransform(out)
    comp.FlattenTransform()
    return sitk.AffineTransform(comp.GetNthTransform(0))


def _affine_4x4(tx: sitk.AffineTransform) -> np.ndarray:
    """x -> A (x - c) + c + t as a 4x4 matrix (LPS physical, fixed -> moving)."""
    a = np.array(tx.GetMatrix()).reshape(3, 3)
    c = np.array(tx.GetCenter())
    t = np.array(tx.GetTranslation())
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = -a @ c + c + t
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, required=True,
                   help="folder holding data/real/mni152-2009a and data/real/sri24-atlas (e.g. ../shared)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    shared = args.shared.resolve()
    mni_dir, sri_dir = shared / MNI, shared / SRI

    t1, mni_aff = _load_nib(mni_dir / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gm, _ = _load_nib(mni_dir / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
    wm, _ = _load_nib(mni_dir / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
    sri, sri_aff = _load_nib(sri_dir / "t1_skullstripped_brats_space.nii.gz")
    sri = np.clip(sri, 0, None)

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)  # multi-threaded sums differ run to run
    tx = register_mni_to_sri(_to_sitk(t1, mni_aff), _to_sitk(sri, sri_aff))

    # The 1 mm paper crop in SRI24 voxel space.
    crop_aff = sri_aff @ np.array(
        [[1, 0, 0, CROP_START[0]], [0, 1, 0, CROP_START[1]], [0, 0, 1, CROP_START[2]], [0, 0, 0, 1.0]]
    )
    ref = _to_sitk(np.zeros(CROP_SHAPE, np.float32), crop_aff)
    maps = {}
    for name, arr in (("t1", t1), ("gm", gm), ("wm", wm)):
        res = sitk.Resample(_to_sitk(arr, mni_aff), ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        maps[name] = sitk.GetArrayFromImage(res).transpose(2, 1, 0)  # back to (x, y, z)
    sri_crop = sitk.GetArrayFromImage(
        sitk.Resample(_to_sitk(sri, sri_aff), ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ).transpose(2, 1, 0)
    mni_mask = maps["t1"] > 8  # brain-extracted template: background is 0
    sri_mask = sri_crop > 0
    dice = 2 * (mni_mask & sri_mask).sum() / (mni_mask.sum() + sri_mask.sum())
    print(f"brain Dice MNI-registered vs SRI24 (1 mm crop): {dice:.3f}")

    def down(a: np.ndarray) -> np.ndarray:
        x, y, z = a.shape
        return a.reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5))

    out = {k: np.clip(np.rint(down(v)), 0, 255).astype(np.uint8) for k, v in maps.items()}
    grid_aff = crop_aff @ np.diag([2.0, 2.0, 2.0, 1.0])
    grid_aff[:3, 3] = (crop_aff @ np.array([0.5, 0.5, 0.5, 1.0]))[:3]
    # grid voxel -> SRI24 RAS world -> LPS -> (registration) MNI LPS -> MNI RAS (= MNI mm)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    vox2mni = flip @ _affine_4x4(tx) @ flip @ grid_aff
    src = {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(mni_dir.glob("*.nii.gz")) + [sri_dir / "t1_skullstripped_brats_space.nii.gz"]
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {**out, "affine": grid_aff, "vox2mni": vox2mni, "registration_dice": np.float64(dice),
              "sources": np.array([f"{k} sha256={v}" for k, v in src.items()])}
    buf = io.BytesIO()
    # a zip with fixed timestamps, so that a rerun gives the same bytes (np.savez stamps the time)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue(), compresslevel=9)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.chmod(tmp, 0o644)
    os.replace(tmp, args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, sha256 {digest})")
    print("grid affine:\n", np.round(grid_aff, 3), "\nvox2mni:\n", np.round(vox2mni, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
