"""The target space: atlas templates, the brain mask and the output grid.

The output grid is a box on the 1 mm atlas grid (``GeometryConfig.box_start``) sampled at the
configured spacing, so the paper (1 mm, 160x192x160) and demo (2 mm, 80x96x80) grids cover the
same millimetres and share the atlas orientation. Every processed volume is resampled straight
into this grid (one interpolation: crop/pad and resampling are the same operation).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .config import AtlasConfig, GeometryConfig
from .images import grid_affine, load_volume, to_array


def resolve_atlas_path(spec: str) -> Path:
    """``builtin:sri24/x.nii.gz`` -> the file shipped in the package; anything else is a path."""
    if spec.startswith("builtin:"):
        p = Path(str(resources.files("g3n_data") / "atlases" / spec[len("builtin:"):]))
    else:
        p = Path(spec).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"atlas file not found: {spec} -> {p}")
    return p


def output_grid(brain: sitk.Image, geometry: GeometryConfig) -> sitk.Image:
    """An empty float32 image on the output grid defined by ``geometry`` over ``brain``'s grid."""
    d = np.array(brain.GetDirection()).reshape(3, 3)
    a = np.array(brain.GetSpacing())
    o = np.array(brain.GetOrigin())
    s = float(geometry.spacing)
    start = np.array(geometry.box_start, dtype=float)
    # corner of the box = edge of atlas voxel `start`; first output voxel centre half a voxel in
    offset_mm = a * (start - 0.5) + s * 0.5
    origin = o + d @ offset_mm
    ref = sitk.Image([int(v) for v in geometry.shape], sitk.sitkFloat32)
    ref.SetSpacing((s, s, s))
    ref.SetOrigin(tuple(float(v) for v in origin))
    ref.SetDirection(tuple(float(v) for v in d.ravel()))
    return ref


@dataclass
class Atlas:
    """Loaded atlas: templates, the output grid, and the brain on that grid."""

    name: str
    brain: sitk.Image  # 1 mm (or as configured) skull-stripped template: defines the grid and the mask
    brain_reg: sitk.Image  # registration target for skull-stripped inputs
    head: sitk.Image  # registration target for inputs with skull
    grid: sitk.Image  # output grid
    brain_on_grid: np.ndarray  # (x, y, z) template resampled on the output grid
    mask_on_grid: np.ndarray  # bool, brain mask (template != 0) on the output grid

    @property
    def affine(self) -> np.ndarray:
        """RAS affine of the output grid (nibabel convention, arrays in x, y, z order)."""
        return grid_affine(self.grid)

    def mask_image(self, dilate_mm: float = 0.0) -> sitk.Image:
        """The brain mask as a float image on the brain template's grid, optionally dilated."""
        m = sitk.Cast(sitk.NotEqual(self.brain, 0.0), sitk.sitkUInt8)
        if dilate_mm > 0:
            r = [max(1, int(round(dilate_mm / sp))) for sp in self.brain.GetSpacing()]
            m = sitk.BinaryDilate(m, r)
        return sitk.Cast(m, sitk.sitkFloat32)


def load_atlas(cfg: AtlasConfig, geometry: GeometryConfig) -> Atlas:
    """Read the atlas files named in config and build the output grid."""
    brain, _ = load_volume(resolve_atlas_path(cfg.brain))
    brain_reg, _ = load_volume(resolve_atlas_path(cfg.brain_registration))
    head, _ = load_volume(resolve_atlas_path(cfg.head))
    grid = output_grid(brain, geometry)
    brain_on_grid = to_array(sitk.Resample(brain, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    # the skull-stripped atlas has small negative values at the edge: `!= 0` is the brain, `> 0` is 4 % smaller
    mask_src = sitk.Cast(sitk.NotEqual(brain, 0.0), sitk.sitkFloat32)
    mask_on_grid = to_array(sitk.Resample(mask_src, grid, sitk.Transform(), sitk.sitkLinear, 0.0)) >= 0.5
    return Atlas(cfg.name, brain, brain_reg, head, grid, brain_on_grid, mask_on_grid)
