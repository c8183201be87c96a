"""Turn one planned subject into volumes: deform the template, apply ageing/disease/lesion,
paint the modality contrasts, then the site's bias field, intensity scale and Rician noise.

Pure numpy/scipy and no shard I/O, so it can be called and tested alone. The RNG of every
random draw here is derived from (seed, subject index, visit, modality) with SeedSequence,
so output is identical whichever process renders the subject. SYNTH.md documents the model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from g3n_shards import SampleMeta, sample_key

from .config import SiteSpec, SynthConfig, SynthGeometry
from .design import STREAM_RENDER, STREAM_SITE, SubjectPlan, VisitPlan, rng_for
from .fields import draw_coefficients, evaluate
from .interp import Trilinear
from .template import ASSET_SPACING, TISSUE_CHANNELS, Template, load_template

#: lattice spacing (mm) of the lesion-shape noise and its strength (log-radius sd)
LESION_SHAPE_MM = 16.0
LESION_SHAPE_SD = 0.12
#: logistic edge widths (normalised radius) of tumour/necrosis and of the oedema
TUMOUR_EDGE = 0.05
OEDEMA_EDGE = 0.10


@dataclass
class SynthVolume:
    """One rendered volume: its shard key, metadata, voxels (float32, x y z) and ground truth."""

    key: str
    meta: SampleMeta
    volume: np.ndarray
    truth: dict[str, Any]


def _interp(arr: np.ndarray, coords: np.ndarray, cval: float = 0.0) -> np.ndarray:
    return ndi.map_coordinates(arr, coords, order=1, mode="constant", cval=cval, prefilter=False, output=np.float32)


@functools.lru_cache(maxsize=4)
def _base_grid(geometry_json: str) -> np.ndarray:
    """Template voxel coordinates (3, X, Y, Z) of the output voxel centres (no deformation)."""
    geo = SynthGeometry.model_validate_json(geometry_json)
    axes = [(geo.axis_mm(a) / ASSET_SPACING - 0.5).astype(np.float32) for a in range(3)]
    g = np.stack(np.meshgrid(*axes, indexing="ij"))
    g.setflags(write=False)
    return g


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def _lesion_centre(tpl: Template, lat: dict[str, Any]) -> np.ndarray:
    """Lesion centre in template voxels; pulled toward the nominal centre until it is in tissue."""
    c = np.array(lat["lesion_centre_mni"], float)
    nominal = np.array(lat["lesion_nominal_mni"], float)
    tissue = tpl.gm + tpl.wm
    for _ in range(12):
        v = tpl.mni_to_vox(c)
        if float(_interp(tissue, v.reshape(3, 1))[0]) >= 0.5:
            break
        c = c + 0.3 * (nominal - c)
    return tpl.mni_to_vox(c)


def subject_coordinates(plan: SubjectPlan, cfg: SynthConfig, tpl: Template) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Template coordinates of every output voxel for this subject (visit-independent part:
    global scale, random warp, lesion mass effect), and the lesion weights if any."""
    geo = cfg.geometry
    g = _base_grid(geo.model_dump_json())
    lat = plan.latent
    rr = rng_for(cfg.seed, STREAM_RENDER, plan.index, 0)
    warp = evaluate(draw_coefficients(rr, cfg.anatomy.warp_spacing_mm, 3), cfg.anatomy.warp_spacing_mm, geo)
    shape_coef = draw_coefficients(rr, LESION_SHAPE_MM, 1)  # drawn for everyone: same stream for all subjects
    c = tpl.centroid.astype(np.float32).reshape(3, 1, 1, 1)
    q = c + (g - c) / np.float32(lat["scale"]) + warp * np.float32(cfg.anatomy.warp_mm / ASSET_SPACING)
    lesion: dict[str, np.ndarray] = {}
    if plan.tumour_grade is not None:
        lc = _lesion_centre(tpl, lat).astype(np.float32).reshape(3, 1, 1, 1)
        radii = (np.array(lat["lesion_radii_mm"], np.float32) / ASSET_SPACING).reshape(3, 1, 1, 1)
        d = q - lc
        shape_noise = evaluate(shape_coef, LESION_SHAPE_MM, geo)[0]
        r = np.sqrt(((d / radii) ** 2).sum(0)) * np.exp(LESION_SHAPE_SD * shape_noise)
        nec = float(lat["necrosis_fraction"])
        tumour = _sigmoid((1.0 - r) / TUMOUR_EDGE)
        necrosis = _sigmoid((nec - r) / TUMOUR_EDGE) if nec > 0 else np.zeros_like(tumour)
        oedema = np.clip(_sigmoid((1.0 + float(lat["oedema_fraction"]) - r) / OEDEMA_EDGE) - tumour, 0, 1)
        lesion = {"tumour": tumour, "necrosis": np.minimum(necrosis, tumour), "oedema": oedema}
        # mass effect: tissue near the lesion is pushed outward (sampled from closer to the centre)
        rho = np.sqrt((d**2).sum(0)) / np.float32(1.5 * radii.mean())
        q = lc + d * (1.0 - np.float32(lat["mass_effect"]) * np.exp(-0.5 * rho**2))
        lesion["centre_vox"] = lc.ravel()
    return q, lesion


def _channels(visit: VisitPlan, tpl: Template, q: np.ndarray, disp: np.ndarray) -> dict[str, np.ndarray]:
    """Visit-specific deformation (ventricles, hippocampus) and tissue maps sampled at it.

    ``disp`` holds the template's ventricle and hippocampus direction fields already sampled
    at ``q`` (6 channels); interpolation is linear, so combining them after sampling equals
    sampling the combined field."""
    e = visit.effects
    a = np.float32(e["ventricle_mm"] / ASSET_SPACING)
    b = np.float32(e["hippocampal_shrink_mm"] / ASSET_SPACING)
    p = q + a * disp[0:3] - b * disp[3:6]
    sampled = Trilinear(p, tpl.shape)(tpl.tissue_stack)
    out = dict(zip(TISSUE_CHANNELS, sampled))
    out["loss"] = np.minimum(
        e["cortical_loss"] * out["cortex"] + e["hippocampal_loss"] * out["hippocampus"]
        + e["temporal_loss"] * out["temporal_gm"], 0.9,
    ).astype(np.float32)  # fmt: skip
    return out


def _tissue_fractions(ch: dict[str, np.ndarray], lesion: dict[str, np.ndarray], wmh_load: float = 0.0) -> dict[str, np.ndarray]:
    """Per-voxel fractions of CSF, GM, WM, WMH and lesion classes after atrophy and tumour."""
    gm0, wm, csf = ch["gm"], ch["wm"], ch["csf"]
    # soft erosion: partial-volume GM (tissue boundaries) loses most; lost GM becomes CSF
    gm = gm0 * (1.0 - ch["loss"] * (1.0 - 0.5 * gm0))
    csf = csf + (gm0 - gm)
    # periventricular white-matter hyperintensities replace part of the white matter
    wmh = np.minimum(np.float32(wmh_load) * ch["periventricular"], wm)
    f = {"CSF": csf, "GM": gm, "WM": wm - wmh, "WMH": wmh}
    if lesion:
        brain = np.clip(gm0 + wm + ch["csf"], 0, 1)
        tumour = lesion["tumour"] * brain
        necrosis = lesion["necrosis"] * brain
        keep = 1.0 - tumour
        f = {k: v * keep for k, v in f.items()}
        oedema = lesion["oedema"] * f["WM"]  # vasogenic oedema spreads in white matter
        f["WM"] = f["WM"] - oedema
        f.update({"necrosis": necrosis, "tumour": tumour - necrosis, "oedema": oedema})
    return f


def _paint(modality: str, f: dict[str, np.ndarray], ch: dict[str, np.ndarray], plan: SubjectPlan,
           visit: VisitPlan, cfg: SynthConfig, site: SiteSpec) -> np.ndarray:
    """Noise-free intensity of one modality (WM T1 ~ 0.9) from tissue fractions."""
    con = cfg.contrast
    lat = plan.latent
    jit = lat["tissue_jitter"]
    img = np.zeros_like(f["GM"])
    for tissue, frac in f.items():
        mu = con.tissue[tissue][modality] * jit.get(tissue, 1.0)
        if tissue == "GM":
            mu *= site.gm_contrast
        if tissue == "tumour" and modality == "FLAIR" and lat.get("flair_mismatch"):
            mu = con.mismatch_flair
        img += np.float32(mu) * frac
    if modality == "T1c":
        img += np.float32(con.vessel_enhancement) * ch["vessels"]
        if "tumour" in f:
            img += np.float32(lat["enhancement"] * con.tissue["WM"]["T1"]) * f["tumour"]
    if plan.diagnosis == "PD":
        drop = cfg.anatomy.pd_drop.get(modality, 0.0) * visit.effects["pd_severity"]
        img *= 1.0 - np.float32(drop) * ch["pd"]
    return img


@functools.lru_cache(maxsize=32)
def _site_pattern(seed: int, site_index: int, spacing: float, geometry_json: str) -> np.ndarray:
    geo = SynthGeometry.model_validate_json(geometry_json)
    return evaluate(draw_coefficients(rng_for(seed, STREAM_SITE, site_index), spacing, 1), spacing, geo)[0]


def _acquire(img: np.ndarray, mask: np.ndarray, cfg: SynthConfig, site_index: int, site: SiteSpec,
             rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """Site effects: smooth multiplicative bias, intensity scale, Rician noise, skull-strip mask."""
    geo = cfg.geometry
    share = cfg.bias_scan_share
    scan = evaluate(draw_coefficients(rng, cfg.bias_spacing_mm, 1), cfg.bias_spacing_mm, geo)[0]
    site_pat = _site_pattern(cfg.seed, site_index, cfg.bias_spacing_mm, geo.model_dump_json())
    log_bias = np.float32(site.bias) * (np.float32(np.sqrt(1 - share**2)) * site_pat + np.float32(share) * scan)
    scale = float(site.intensity_scale * np.exp(rng.normal(0, cfg.contrast.scan_scale_sd)))
    sigma = np.float32(site.noise * site.intensity_scale)
    clean = img * np.exp(log_bias) * np.float32(scale)
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n2 = rng.standard_normal(img.shape, dtype=np.float32)
    out = np.sqrt((clean + sigma * n1) ** 2 + (sigma * n2) ** 2) * mask
    return out.astype(np.float32), {"scan_scale": scale, "noise_sigma": float(sigma)}


def _measure(f: dict[str, np.ndarray], ch: dict[str, np.ndarray], lesion: dict[str, np.ndarray],
             geo: SynthGeometry) -> dict[str, float]:
    """Ground-truth volumes (ml) of the rendered anatomy, before any acquisition effect."""
    ml = geo.spacing**3 / 1000.0
    out = {
        "brain_ml": float(np.clip(ch["gm"] + ch["wm"] + ch["csf"], 0, 1).sum() * ml),
        "gm_ml": float(f["GM"].sum() * ml),
        "wm_ml": float(f["WM"].sum() * ml),
        "csf_ml": float(f["CSF"].sum() * ml),
        "ventricle_ml": float(ch["ventricles"].sum() * ml),
        "hippocampus_gm_ml": float((f["GM"] * ch["hippocampus"]).sum() * ml),
        "wmh_ml": float(f["WMH"].sum() * ml),
    }
    if lesion:
        t = f["tumour"] + f["necrosis"]
        out.update({
            "tumour_ml": float(t.sum() * ml), "necrosis_ml": float(f["necrosis"].sum() * ml),
            "enhancing_ml": float(f["tumour"].sum() * ml), "oedema_ml": float(f["oedema"].sum() * ml),
        })  # fmt: skip
        if t.sum() > 0:
            idx = np.indices(t.shape, dtype=np.float32)
            for a, name in enumerate("xyz"):
                out[f"lesion_centroid_{name}"] = float((idx[a] * t).sum() / t.sum())
    return out


def _scalar_truth(plan: SubjectPlan, visit: VisitPlan, measured: dict[str, float], acq: dict[str, float]) -> dict[str, Any]:
    """Flat ground-truth scalars for ``meta.extra`` (prefixed ``gt_``)."""
    lat = plan.latent
    gt: dict[str, Any] = {
        "subject_index": plan.index, "visit": visit.index, "years_from_baseline": visit.years_from_baseline,
        "scale": lat["scale"], **{k: v for k, v in visit.effects.items()},
        **measured, **acq,
    }  # fmt: skip
    if plan.tumour_grade is not None:
        for k in ("lesion_region", "lesion_hemisphere", "necrosis_fraction", "enhancement", "oedema_fraction",
                  "mass_effect", "flair_mismatch"):  # fmt: skip
            gt[k] = lat[k]
    return {f"gt_{k}": (round(v, 6) if isinstance(v, float) else v) for k, v in gt.items()}


def tissue_maps(plan: SubjectPlan, cfg: SynthConfig, visit_index: int = 0,
                template: Template | None = None) -> dict[str, np.ndarray]:
    """Ground-truth maps of one visit on the output grid, before any acquisition effect.

    Keys: tissue fractions ``CSF``, ``GM``, ``WM``, ``WMH`` (+ ``necrosis``, ``tumour`` = non-necrotic,
    possibly enhancing tumour, ``oedema`` for gliomas), ``mask`` (the skull-strip mask), and the
    deformed template regions ``ventricles``, ``hippocampus``, ``temporal_gm``, ``pd`` (SN + putamen),
    ``vessels``. An evaluation can use them as exact segmentations."""
    tpl = template or load_template(cfg.anatomy.vent_sigma_mm, cfg.anatomy.wmh_decay_mm)
    q, lesion = subject_coordinates(plan, cfg, tpl)
    disp = Trilinear(q, tpl.shape)(tpl.disp_stack)
    ch = _channels(plan.visits[visit_index], tpl, q, disp)
    f = _tissue_fractions(ch, lesion, plan.visits[visit_index].effects["wmh_load"])
    mask = (np.clip(ch["gm"] + ch["wm"] + ch["csf"], 0, 1) >= 0.5).astype(np.float32)
    keep = ("ventricles", "hippocampus", "temporal_gm", "pd", "vessels", "periventricular")
    return {**f, "mask": mask, **{k: ch[k] for k in keep}}


def render_subject(plan: SubjectPlan, cfg: SynthConfig, template: Template | None = None) -> list[SynthVolume]:
    """Every volume of one subject (all visits, all modalities), in (visit, modality) order."""
    tpl = template or load_template(cfg.anatomy.vent_sigma_mm, cfg.anatomy.wmh_decay_mm)
    site_index = next(i for i, s in enumerate(cfg.sites) if s.name == plan.site)
    site = cfg.sites[site_index]
    q, lesion = subject_coordinates(plan, cfg, tpl)
    disp = Trilinear(q, tpl.shape)(tpl.disp_stack)
    out: list[SynthVolume] = []
    for visit in plan.visits:
        ch = _channels(visit, tpl, q, disp)
        f = _tissue_fractions(ch, lesion, visit.effects["wmh_load"])
        mask = (np.clip(ch["gm"] + ch["wm"] + ch["csf"], 0, 1) >= 0.5).astype(np.float32)
        measured = _measure(f, ch, lesion, cfg.geometry)
        for mi, modality in enumerate(visit.modalities):
            clean = _paint(modality, f, ch, plan, visit, cfg, site)
            rng = rng_for(cfg.seed, STREAM_RENDER, plan.index, 1 + visit.index, 1 + mi)
            vol, acq = _acquire(clean, mask, cfg, site_index, site, rng)
            meta = SampleMeta(
                subject=plan.subject, session=visit.session, cohort=plan.cohort, site=plan.site,
                modality=modality, age=visit.age, sex=plan.sex, diagnosis=plan.diagnosis,
                field_strength=site.field_strength, vendor=site.vendor, handedness=plan.handedness,
                apoe_genotype=plan.apoe_genotype, idh1=plan.idh1, mgmt=plan.mgmt, tumour_grade=plan.tumour_grade,
                education=plan.education, **visit.clinical,
                extra=_scalar_truth(plan, visit, measured, acq), synthetic=True,
            )  # fmt: skip
            truth = {"key": sample_key(meta), "subject": plan.to_dict(), "visit_index": visit.index,
                     "modality": modality, "measured": measured, "acquisition": acq,
                     "site": site.model_dump()}  # fmt: skip
            out.append(SynthVolume(key=truth["key"], meta=meta, volume=vol, truth=truth))
    return out
