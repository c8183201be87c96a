"""The synthetic cohort's known anatomy, as a spec that ``g3n-eval anatomy`` measures.

The generative model (SYNTH.md) says what each label does to the image; this module turns the
effects a generator is asked for into regions on the output grid and signatures with an expected
direction, so generated volumes can be checked against the truth without a probe:

* HC -> AD and HC -> MCI: the ventricles widen (``vent_ad_mm``/``vent_mci_mm`` x severity), so the
  band just outside the template's ventricle walls (``VENTRICLE_RIM_MM``) turns from white matter
  into CSF and is darker on T1. The band, not the ventricles themselves: those are CSF already,
  so widening changes them only at the wall (on the demo cohort's T1 follow-up pairs the band
  darkens in 49 of 56, the inside of the ventricles in 23 of 56: tools/followup_signatures.py);
* age 30 -> 70: the same, through ``vent_age_mm``;
* HC -> PD: T1 signal drops by ``pd_drop['T1']`` x severity in putamen and substantia nigra,
  measured as the putamen minus deep white matter (the nigra's 138 voxels on the demo grid are too
  few to measure reliably);
* IDH1 wildtype -> mutant: the lesion sits frontally (``centre_mutant``) instead of temporally or
  deep (``centre_wildtype``), on a random side: the left-right asymmetry around the mutant sites
  minus around the wildtype sites.

The spec is plain YAML (``anatomy.yaml``) with a regions ``.npz`` beside it (float weights in
[0, 1]); g3n-eval validates it. Regions come from the packaged template's grid (demo, 2 mm) and
are resampled to other geometries of the same SRI24 box.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .config import SynthConfig
from .template import ASSET_SPACING, load_template, soft_ellipsoid

SPEC_NAME = "anatomy.yaml"
REGIONS_NAME = "anatomy-regions.npz"
#: radius of the spheres around the nominal lesion centres (mm): the centres' jitter (6 mm sd) plus
#: about the smallest lesion radius
TUMOUR_SITE_MM = 16.0
#: width of the band outside the template's ventricle walls where widening ventricles show (mm)
VENTRICLE_RIM_MM = 4.0


def _regions_on_asset(cfg: SynthConfig) -> tuple[dict[str, np.ndarray], float]:
    """Region weights on the template's grid, and the mid-sagittal plane's voxel index (axis 0)."""
    t = load_template(cfg.anatomy.vent_sigma_mm, cfg.anatomy.wmh_decay_mm)
    brain = t.brain
    putamen = t.regions["putamen"]
    nx, ny, nz = t.shape
    vox = np.stack(np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij"), -1).reshape(-1, 3)
    mni = t.vox_to_mni(vox).reshape(nx, ny, nz, 3)

    def sites(centres: list[tuple[float, float, float]]) -> np.ndarray:
        r = np.full(3, TUMOUR_SITE_MM)
        w = [soft_ellipsoid(mni, np.asarray(c) * side, r) for c in centres for side in ((1, 1, 1), (-1, 1, 1))]
        return np.clip(np.maximum.reduce(w), 0, 1) * (brain > 0.5)

    vent = t.ventricles > 0.5
    grown = ndi.binary_dilation(vent, iterations=max(1, round(VENTRICLE_RIM_MM / ASSET_SPACING)))
    regions = {
        "brain": brain,
        "ventricle_rim": (grown & ~vent & (brain > 0.5)).astype(np.float32),
        "putamen": putamen,
        "deep_white_matter": ((t.wm > 0.8) & (putamen < 0.5)).astype(np.float32),
        "tumour_sites_mutant": sites(cfg.glioma.centre_mutant),
        "tumour_sites_wildtype": sites(cfg.glioma.centre_wildtype),
    }
    midline = float(t.mni_to_vox(np.zeros((1, 3)))[0, 0])
    return {k: v.astype(np.float32) for k, v in regions.items()}, midline


def _centres(centres: list[tuple[float, float, float]]) -> str:
    return " or ".join(f"(±{x:g}, {y:g}, {z:g})" for x, y, z in centres)


def anatomy_spec(cfg: SynthConfig) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(spec as a dict, region weights on ``cfg.geometry``'s grid)."""
    regions, midline = _regions_on_asset(cfg)
    f = ASSET_SPACING / cfg.geometry.spacing
    if f != 1.0:  # same box, other spacing: resample with voxel centres aligned
        regions = {k: np.clip(ndi.zoom(v, f, order=1, grid_mode=True, mode="grid-constant"), 0, 1).astype(np.float32)
                   for k, v in regions.items()}
        midline = (midline + 0.5) * f - 0.5
    shape = tuple(cfg.geometry.shape)
    for k, v in regions.items():
        if v.shape != shape:
            raise ValueError(f"region {k}: resampled to {v.shape}, the geometry is {shape}")
    a, g = cfg.anatomy, cfg.glioma
    spec = {
        "source": "the g3n-data synthetic cohort's generative model (SYNTH.md)",
        "regions": REGIONS_NAME,
        "brain": "brain",
        "midline": round(midline, 4),
        # every cohort has its own scanners and contrast, and PD or glioma come from one cohort each
        "within": "cohort",
        "signatures": [
            {"name": "ventricle_signal", "kind": "mean", "region": "ventricle_rim",
             "why": f"mean z in the {VENTRICLE_RIM_MM:g} mm band outside the template's ventricle walls: lower when "
                    "the ventricles widen into it (CSF, dark on T1, replaces white matter)"},
            {"name": "putamen_vs_white_matter", "kind": "contrast", "region": "putamen",
             "reference": "deep_white_matter",
             "why": "putamen minus deep white matter: lower when the putamen darkens"},
            {"name": "tumour_frontality", "kind": "asymmetry", "region": "tumour_sites_mutant",
             "reference": "tumour_sites_wildtype",
             "why": f"left-right asymmetry within {TUMOUR_SITE_MM:g} mm of the IDH1-mutant lesion sites minus the "
                    "wildtype ones: higher when a one-sided lesion sits frontally"},
        ],
        "effects": [
            {"field": "diagnosis", "from": "HC", "to": "AD", "modality": "T1", "signature": "ventricle_signal",
             "expect": "decrease", "why": f"AD widens the ventricles by {a.vent_ad_mm:g} mm x severity"},
            {"field": "diagnosis", "from": "HC", "to": "MCI", "modality": "T1", "signature": "ventricle_signal",
             "expect": "decrease", "why": f"MCI widens the ventricles by {a.vent_mci_mm:g} mm x severity"},
            {"field": "diagnosis", "from": "HC", "to": "PD", "modality": "T1", "signature": "putamen_vs_white_matter",
             "expect": "decrease", "why": f"PD lowers T1 signal in putamen and substantia nigra by {a.pd_drop['T1']:.0%} x severity"},
            {"field": "idh1", "from": "wildtype", "to": "mutant", "modality": "T1c", "signature": "tumour_frontality",
             "expect": "increase", "why": f"IDH1-mutant lesions are centred at MNI {_centres(g.centre_mutant)} mm, "
                                          f"wildtype ones at {_centres(g.centre_wildtype)} mm"},
            {"field": "age", "from": 30, "to": 70, "modality": "T1", "signature": "ventricle_signal",
             "expect": "decrease", "why": f"the ventricles widen with age ({a.vent_age_mm:g} mm at 90, "
                                                  f"as ((age - 20) / 70)^{a.vent_age_power:g})"},
        ],
    }
    return spec, regions


def write_anatomy_spec(out: str | Path, cfg: SynthConfig) -> Path:
    """Write ``anatomy.yaml`` and its regions npz into ``out`` (atomically); returns the spec's path."""
    import io

    import yaml
    from g3n_shards import atomic_write_bytes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec, regions = anatomy_spec(cfg)
    buf = io.BytesIO()
    np.savez_compressed(buf, **regions)
    atomic_write_bytes(out / REGIONS_NAME, buf.getvalue())
    text = yaml.safe_dump(spec, sort_keys=False, width=110, allow_unicode=True)
    atomic_write_bytes(out / SPEC_NAME, text.encode("utf-8"))
    return out / SPEC_NAME


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``g3n-data synth-anatomy``."""
    from .config import PRESETS

    p = subparsers.add_parser(
        "synth-anatomy",
        help="write the synthetic cohort's known anatomical effects as a g3n-eval anatomy spec",
        description="Write anatomy.yaml and anatomy-regions.npz: the regions, signatures and expected effects "
        "of the synthetic cohort's generative model (AD/MCI/age: ventricles; PD: putamen; IDH1: lesion site), "
        "on the grid of a geometry. Measure them with g3n-eval anatomy.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--geometry", choices=sorted(PRESETS), default=None, help="grid of the volumes (default demo)")
    p.add_argument("--config", type=Path, default=None, help="the YAML/JSON SynthConfig the cohort was made with")
    p.set_defaults(func=_handler)


def _handler(args: argparse.Namespace) -> int:
    from . import load_config

    cfg = load_config(args.config, args.geometry)
    path = write_anatomy_spec(args.out, cfg)
    print(f"wrote {path} and {path.parent / REGIONS_NAME} ({'x'.join(map(str, cfg.geometry.shape))} grid)")
    return 0
