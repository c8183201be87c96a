"""Shared helpers for the ingest/preprocess tests (real volumes kept in the repository, fast settings).

Real data (see data/real/PROVENANCE.md): the 10 IXI T1 volumes are the demo's built-in cohort in
g3n-pipeline (read here by path, not imported); their DLMUSE labels for the two subjects the tests
use, and the TCGA-FG-6692 glioma case (native space, and in SRI24 space), reduced to 2 mm in
plane / isotropic, are under ``tests/data/real``. Nothing is read from outside the repository.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[3]
DATA = Path(__file__).resolve().parent / "data" / "real"
IXI = REPO / "packages" / "g3n-pipeline" / "src" / "g3n_pipeline" / "cohort" / "ixi10"
IXI_LABELS = DATA / "ixi10-dlmuse"
TCGA = DATA / "tcga-fg-6692-native"
TCGA_SRI = DATA / "tcga-fg-6692-sri24"

TCGA_FILES = {
    "T1": "T1_AX_OtherEXampleTCIA_TCGA-FG-6692_Si_TCGA-FG-6692_T1_AX_SE_10_se2d1_t1.nii.gz",
    "T1c": "MRHR_T1_AX_POST_GAD_OtherEXampleTCIA_TCGA-FG-6692_Si_TCGA-FG-6692_MRHR_T1_AX_POST_GAD_SE_13_se2d1r_t1c.nii.gz",
    "T2": "MRHR_T2_AX_OtherEXampleTCIA_TCGA-FG-6692_Si_TCGA-FG-6692_MRHR_T2_AX_SE_2_tse2d1_11_t2.nii.gz",
    "FLAIR": "MRHR_FLAIR_AX_OtherEXampleTCIA_TCGA-FG-6692_Si_TCGA-FG-6692_MRHR_FLAIR_AX_SE_IR_5_tir2d1_21_fla.nii.gz",
}
TCGA_SRI_FILES = {"T1": "OtherEXampleFromTCIA_t1_bet.nii.gz", "T2": "OtherEXampleFromTCIA_t2_bet.nii.gz",
                  "FLAIR": "OtherEXampleFromTCIA_fla_bet.nii.gz"}  # the T1c is not kept (no test uses it)


def ixi_paths() -> list[Path]:
    paths = sorted(IXI.glob("*.nii.gz"))
    assert len(paths) == 10, f"{IXI}: expected the 10 IXI T1 volumes of g3n-pipeline's built-in cohort"
    return paths


def ixi_demographics() -> dict[str, tuple[str, str]]:
    """subject (MRID) -> (age, sex) as text, from the cohort's CSV manifest."""
    with open(IXI / "ixi10.csv", newline="", encoding="utf-8") as f:
        return {row["subject"]: (row["age"], row["sex"]) for row in csv.DictReader(f)}


def ixi_labels(t1: Path) -> Path:
    """The subject's DLMUSE region labels (kept for IXI012 and IXI014, the subjects the tests use)."""
    p = IXI_LABELS / t1.name.replace("_ds.nii.gz", "_ds_DLMUSE.nii.gz")
    assert p.is_file(), f"{p}: no labels kept for {t1.name} (see data/real/PROVENANCE.md)"
    return p


#: quick settings for tests: coarse N4 and registration (the paper settings are the defaults)
FAST = {
    "skullstrip": {"method": "atlas"},
    "n4": {"shrink": 6, "iterations": [20, 20]},
    "registration": {"shrink_factors": [6, 4, 2], "smoothing_sigmas": [3, 2, 1], "iterations": 300,
                     "max_step_mm": 0.5, "intra_iterations": 100, "intra_shrink_factors": [4, 2],
                     "intra_smoothing_sigmas": [2, 1], "intra_max_step_mm": 1.0},
}

#: cheapest settings: inputs already in atlas space and skull-stripped (resume/partition tests)
CHEAP = {"skullstrip": {"method": "none"}, "n4": {"enabled": False}, "registration": {"enabled": False}}


def link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)
    return dst


def save(arr: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path


def save_broken_affine(path: Path, value: float = 0.0) -> Path:
    """A volume whose sform is all ``value`` (0 or NaN) and qform unset: a broken header affine."""
    img = nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4))
    h = img.header
    for row in ("srow_x", "srow_y", "srow_z"):
        h[row] = [value] * 4
    h["sform_code"] = 1
    h["qform_code"] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, h), str(path))
    return path
