"""Loading and checking input volumes, and moving them between nibabel and SimpleITK.

All geometry is handled in physical space (SimpleITK, LPS), so the input orientation (IXI is PSR,
TCGA oblique LAS, the atlas LPS) never matters: the output is written once, on the atlas grid,
in the atlas orientation, with its affine recorded. Nothing from the NIfTI header except the
voxel grid is used: descriptions, names and dates in the header never reach metadata.

Conventions: nibabel arrays are (x, y, z) with a RAS affine; SimpleITK arrays are (z, y, x) with an
LPS origin/direction. :func:`to_sitk` and :func:`grid_affine` convert between the two.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import locale
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from g3n_shards import atomic_path
from g3n_shards import file_sha256 as sha256_file  # noqa: F401 - the sample's source_sha256

_LPS = np.diag([-1.0, -1.0, 1.0])


class InputError(ValueError):
    """An input volume that cannot be used; ``reason`` is the short reject reason."""

    def __init__(self, path: str | Path, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def _checked_affine(path: str | Path, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a RAS affine into LPS direction, spacing and origin; refuse broken ones.

    Small non-orthogonality (rounding in headers) is removed by polar decomposition; a real
    shear, a zero or non-finite column, or a singular matrix is refused.
    """
    if affine is None or not np.all(np.isfinite(affine)):
        raise InputError(path, "broken affine", "non-finite values")
    m = affine[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing < 1e-6) or abs(np.linalg.det(m)) < 1e-9:
        raise InputError(path, "broken affine", "singular matrix or zero voxel size")
    if np.any(spacing > 50):
        raise InputError(path, "broken affine", f"implausible voxel size {np.round(spacing, 3).tolist()} mm")
    d = m / spacing
    u, _, vt = np.linalg.svd(d)
    ortho = u @ vt
    if np.max(np.abs(ortho - d)) > 1e-2:
        raise InputError(path, "broken affine", "sheared (non-orthogonal) axes")
    direction = _LPS @ ortho
    origin = _LPS @ affine[:3, 3]
    return direction, spacing, origin


SOURCE_CHANGED = "source changed since ingest"


def _nifti_from_bytes(data: bytes) -> nib.spatialimages.SpatialImage:
    """A NIfTI-1 or NIfTI-2 image (``.nii`` or gzipped) parsed from bytes already in memory."""
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    try:
        return nib.Nifti1Image.from_bytes(raw)
    except Exception:  # noqa: BLE001 - not NIfTI-1: try NIfTI-2, whose error is the one reported
        return nib.Nifti2Image.from_bytes(raw)


def load_volume(path: str | Path, expected_sha256: str | None = None) -> tuple[sitk.Image, dict]:
    """Read a NIfTI volume as float32 SimpleITK image after every check a batch needs.

    The file is read once; with ``expected_sha256`` (the work list's ``source_sha256``) the bytes
    read are hashed and must match, so an input changed since ingest is refused rather than
    processed under the old file's provenance (the hash is of exactly the bytes used).
    Raises :class:`InputError` with a short reason for: unreadable/corrupt file, a changed source,
    2D or 4D image, broken affine, NaN/Inf voxels, empty (constant) image. Trailing singleton
    dimensions are squeezed (the SRI24 atlas is stored 240x240x155x1: that is not a 4D series).
    Returns the image and a small dict of figures (shape, spacing) for provenance.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(p, "unreadable or corrupt file", f"{type(e).__name__}: {e}") from None
    if expected_sha256 is not None:
        actual = hashlib.sha256(raw).hexdigest()
        if actual != expected_sha256:
            raise InputError(p, SOURCE_CHANGED, f"sha256 {actual}, the work list records {expected_sha256}")
    try:
        img = _nifti_from_bytes(raw)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for corrupt files
        raise InputError(p, "unreadable or corrupt file", f"{type(e).__name__}: {e}") from None
    del raw
    shape = data.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    data = data.reshape(shape)
    if len(shape) < 3 or min(shape) < 2:
        raise InputError(p, "not a 3D volume", f"shape {tuple(img.shape)} is 2D")
    if len(shape) > 3:
        raise InputError(p, "not a 3D volume", f"shape {tuple(img.shape)} is 4D or more")
    direction, spacing, origin = _checked_affine(p, np.asarray(img.affine, dtype=np.float64))
    arr = np.asarray(data, dtype=np.float32)  # int16 arithmetic wraps: convert before anything
    finite = np.isfinite(arr)
    if not finite.all():
        raise InputError(p, "NaN or Inf voxels", f"{int((~finite).sum())} non-finite voxels")
    if float(arr.max()) == float(arr.min()):
        raise InputError(p, "empty image", f"all voxels equal {float(arr.max())}")
    im = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    im.SetSpacing(tuple(float(s) for s in spacing))
    im.SetOrigin(tuple(float(o) for o in origin))
    im.SetDirection(tuple(float(v) for v in direction.ravel()))
    info = {"shape": [int(s) for s in shape], "spacing_mm": [round(float(s), 4) for s in spacing]}
    return im, info


def grid_affine(image: sitk.Image) -> np.ndarray:
    """The RAS (nibabel) 4x4 affine of a SimpleITK image's grid, for arrays in (x, y, z) order."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    s = np.array(image.GetSpacing())
    o = np.array(image.GetOrigin())
    aff = np.eye(4)
    aff[:3, :3] = _LPS @ d @ np.diag(s)
    aff[:3, 3] = _LPS @ o
    return aff


def to_array(image: sitk.Image) -> np.ndarray:
    """SimpleITK image -> float32 array in nibabel (x, y, z) order."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0)).astype(np.float32, copy=False)


def from_array(arr: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """(x, y, z) array on ``reference``'s grid -> SimpleITK image with that grid."""
    im = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr, dtype=np.float32).transpose(2, 1, 0)))
    im.CopyInformation(reference)
    return im


def save_nifti(arr: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    """Write an (x, y, z) array with its RAS affine (qform and sform both set) atomically."""
    img = nib.Nifti1Image(np.asarray(arr, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=2)
    img.set_sform(affine, code=2)
    with atomic_path(path, keep_suffix=True) as tmp:  # nibabel picks gzip by the name
        nib.save(img, str(tmp))


@contextlib.contextmanager
def keep_locale() -> Iterator[None]:
    """Restore the process locale after a library call that changes it.

    GDCM (SimpleITK's DICOM reader and writer) switches the C locale to plain "C" and leaves it
    there, after which Python's open() defaults to ASCII and any non-ASCII text file fails to
    read. Every DICOM call goes through this guard.
    """
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)
