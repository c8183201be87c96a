"""The brain template every synthetic volume is deformed from, and the regions defined on it.

The asset ``g3n_data/synth_assets/mni152_sri24_2mm.npz`` (made by ``tools/make_synth_assets.py``,
provenance in ``synth_assets/PROVENANCE.md``) holds the MNI152 2009a T1 brain and its grey- and
white-matter probability maps, affinely registered to SRI24 and resampled onto the demo grid
(80x96x80, 2 mm) of the SRI24 box. Everything else is derived here, once per process:

* CSF probability = brain mask - GM - WM (clipped), the brain mask being the template's non-zero T1;
* ventricles = CSF > 0.5 inside a box-like ellipsoid around the midline (MNI centre (0, -8, 12) mm,
  semi-axes (30, 44, 26) mm) and deeper than 8 mm from the brain surface; connected pieces of
  fewer than 20 voxels dropped;
* soft regions (smooth-edged ellipsoids in MNI millimetres, listed in ``REGIONS``): hippocampus,
  temporal lobe, substantia nigra, putamen, choroid plexus;
* cortex weight = GM outside the deep-GM regions, within 12 mm of the brain surface;
* periventricular weight = WM x exp(-d / 6 mm) for voxels within 15 mm of the ventricles (d =
  distance to them): where white-matter hyperintensities grow;
* T1c vessel weight = 0.6 in the outer 4 mm of the brain (surface vessels), 1 x CSF in the
  choroid-plexus ellipsoids;
* the ventricle and hippocampus displacement directions: the gradient of the Gaussian-smoothed
  mask, scaled to a maximum length of 1 (pointing into the structure).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from .interp import pad_stack

import numpy as np
from scipy import ndimage as ndi

ASSET = "mni152_sri24_2mm.npz"
ASSET_SPACING = 2.0  # mm

#: region name -> list of (centre MNI mm, semi-axes mm); smooth-edged ellipsoids (both hemispheres listed)
REGIONS: dict[str, list[tuple[tuple[float, float, float], tuple[float, float, float]]]] = {
    "hippocampus": [((27.0, -22.0, -14.0), (8.0, 18.0, 9.0)), ((-27.0, -22.0, -14.0), (8.0, 18.0, 9.0))],
    "temporal": [((46.0, -14.0, -20.0), (16.0, 36.0, 16.0)), ((-46.0, -14.0, -20.0), (16.0, 36.0, 16.0))],
    "substantia_nigra": [((10.0, -16.0, -10.0), (5.0, 7.0, 5.0)), ((-10.0, -16.0, -10.0), (5.0, 7.0, 5.0))],
    "putamen": [((25.0, 2.0, 1.0), (6.0, 14.0, 9.0)), ((-25.0, 2.0, 1.0), (6.0, 14.0, 9.0))],
    "choroid_plexus": [((24.0, -36.0, 14.0), (5.0, 8.0, 5.0)), ((-24.0, -36.0, 14.0), (5.0, 8.0, 5.0))],
}
VENTRICLE_BOX = ((0.0, -8.0, 12.0), (30.0, 44.0, 26.0))
#: channels of the padded stacks sampled per subject (displacement) and per visit (tissue)
DISP_CHANNELS = ("vent_x", "vent_y", "vent_z", "hippo_x", "hippo_y", "hippo_z")
TISSUE_CHANNELS = ("gm", "wm", "csf", "ventricles", "cortex", "hippocampus", "temporal_gm", "pd", "vessels",
                   "periventricular")
#: edge softness of region ellipsoids, in units of the normalised radius
EDGE = 0.12


def soft_ellipsoid(coords: np.ndarray, centre: np.ndarray, radii: np.ndarray, edge: float = EDGE) -> np.ndarray:
    """1 inside, 0 outside, a logistic ramp of width ``edge`` (normalised radius) at the surface."""
    d = np.sqrt((((coords - centre) / radii) ** 2).sum(-1))
    return (1.0 / (1.0 + np.exp(np.clip((d - 1.0) / edge, -50, 50)))).astype(np.float32)


@dataclass(frozen=True)
class Template:
    """Template maps on the asset grid (x, y, z), float32 in [0, 1], plus grid transforms."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    t1: np.ndarray
    ventricles: np.ndarray  # float32 0/1
    regions: dict[str, np.ndarray]  # soft weights
    cortex: np.ndarray  # cortical GM weight
    vessels: np.ndarray  # T1c-enhancing weight: surface vessels and choroid plexus
    vent_dir: np.ndarray  # (3, x, y, z), voxel units, max length 1
    hippo_dir: np.ndarray  # (3, x, y, z)
    affine: np.ndarray  # asset voxel -> SRI24 world (RAS)
    vox2mni: np.ndarray  # asset voxel -> MNI mm
    centroid: np.ndarray  # brain centroid, asset voxel coordinates
    #: padded stacks for one-pass trilinear sampling (see interp.py); channel order in *_CHANNELS
    disp_stack: np.ndarray
    tissue_stack: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.gm.shape)  # type: ignore[return-value]

    @property
    def brain(self) -> np.ndarray:
        return np.clip(self.gm + self.wm + self.csf, 0.0, 1.0)

    def mni_to_vox(self, mni: np.ndarray) -> np.ndarray:
        """MNI mm (..., 3) -> asset voxel coordinates (..., 3)."""
        inv = np.linalg.inv(self.vox2mni)
        return np.asarray(mni, float) @ inv[:3, :3].T + inv[:3, 3]

    def vox_to_mni(self, vox: np.ndarray) -> np.ndarray:
        return np.asarray(vox, float) @ self.vox2mni[:3, :3].T + self.vox2mni[:3, 3]


def _direction(mask: np.ndarray, sigma_vox: float) -> np.ndarray:
    g = np.stack(np.gradient(ndi.gaussian_filter(mask.astype(np.float32), sigma_vox)))
    n = np.sqrt((g**2).sum(0)).max()
    return (g / max(float(n), 1e-12)).astype(np.float32)


@functools.lru_cache(maxsize=4)
def load_template(vent_sigma_mm: float = 6.0, wmh_decay_mm: float = 6.0) -> Template:
    """Load the packaged asset and derive the maps (cached per process: ~0.3 s)."""
    ref = resources.files("g3n_data") / "synth_assets" / ASSET
    with resources.as_file(ref) as path:
        if not path.is_file():
            raise FileNotFoundError(f"synthetic template asset missing: {path} (run tools/make_synth_assets.py)")
        with np.load(path) as d:
            t1 = d["t1"].astype(np.float32) / 255.0
            gm = d["gm"].astype(np.float32) / 255.0
            wm = d["wm"].astype(np.float32) / 255.0
            affine = d["affine"].astype(np.float64)
            vox2mni = d["vox2mni"].astype(np.float64)
    mask = (t1 > 8.0 / 255.0).astype(np.float32)
    gm, wm = gm * mask, wm * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)

    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in t1.shape], indexing="ij"), -1)
    mni = idx @ vox2mni[:3, :3].T + vox2mni[:3, 3]
    depth_mm = ndi.distance_transform_edt(mask > 0) * ASSET_SPACING

    box = soft_ellipsoid(mni, np.array(VENTRICLE_BOX[0]), np.array(VENTRICLE_BOX[1]), edge=1e-3) > 0.5
    vent = (csf > 0.5) & box & (depth_mm > 8.0)
    lab, n = ndi.label(vent)
    if n:
        sizes = ndi.sum(vent, lab, range(1, n + 1))
        vent = np.isin(lab, 1 + np.flatnonzero(sizes >= 20))

    regions: dict[str, np.ndarray] = {}
    for name, parts in REGIONS.items():
        w = np.zeros(t1.shape, np.float32)
        for c, r in parts:
            w = np.maximum(w, soft_ellipsoid(mni, np.array(c), np.array(r)))
        regions[name] = w * mask
    deep = np.maximum.reduce([regions["hippocampus"], regions["substantia_nigra"], regions["putamen"]])
    cortex = (gm * (1.0 - deep) * (depth_mm <= 12.0)).astype(np.float32)
    vessels = np.maximum(0.6 * ((depth_mm > 0) & (depth_mm <= 4.0)), regions["choroid_plexus"] * csf).astype(np.float32)
    sigma_vox = vent_sigma_mm / ASSET_SPACING
    centroid = np.array(ndi.center_of_mass(mask))
    vent_dir = _direction(vent, sigma_vox)
    hippo_dir = _direction(regions["hippocampus"] > 0.5, sigma_vox)
    pd_w = np.maximum(regions["substantia_nigra"], regions["putamen"])
    vent_dist_mm = ndi.distance_transform_edt(~vent) * ASSET_SPACING
    periventricular = (wm * np.exp(-vent_dist_mm / wmh_decay_mm) * (vent_dist_mm <= 15.0) * (~vent)).astype(np.float32)
    tissue = {"periventricular": periventricular, "gm": gm, "wm": wm, "csf": csf, "ventricles": vent, "cortex": cortex,
              "hippocampus": regions["hippocampus"], "temporal_gm": regions["temporal"] * gm, "pd": pd_w,
              "vessels": vessels}  # fmt: skip
    return Template(
        gm=gm, wm=wm, csf=csf, t1=t1, ventricles=vent.astype(np.float32), regions=regions, cortex=cortex,
        vessels=vessels, vent_dir=vent_dir, hippo_dir=hippo_dir, affine=affine, vox2mni=vox2mni, centroid=centroid,
        disp_stack=pad_stack([*vent_dir, *hippo_dir]), tissue_stack=pad_stack([tissue[k] for k in TISSUE_CHANNELS]),
    )
