"""Preprocess one subject: its sessions, T1 first, other modalities through T1's transform.

Per session (docs/method.md §1):
  T1:        load -> N4 -> skull strip (native mask) -> affine to the atlas -> resample into the
             output grid (crop/pad and resampling in one interpolation) -> mask -> clip < 0 -> QC
  T2/FLAIR/T1c: load -> N4 -> rigid to the session's T1 -> carried through T1's transform, masked
             with the T1 brain mask, clipped.
Each step follows the config and can be switched off for inputs that arrive later in the chain
(defaced, skull-stripped, already registered). Nothing raises out of :func:`process_subject`:
every input ends as a sample or as a reject record naming the step and the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .atlas import Atlas
from .config import PreprocessConfig
from .images import InputError, load_volume, to_array
from .n4 import n4_correct
from .qc import atlas_correlation, write_montage
from .register import RegistrationError, affine_to_atlas, chain, rigid_to_t1, transform_record
from .skullstrip import SkullStripError, mask_volume_ml, native_mask
from .worklist import WorkItem, reject_line


@dataclass
class SampleOut:
    key: str
    meta: dict[str, Any]
    volume: np.ndarray  # float32 (x, y, z) on the output grid
    figures: dict[str, Any]


@dataclass
class SubjectOut:
    samples: list[SampleOut] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)


class StepError(RuntimeError):
    """A step failed for one volume: ``step`` and ``reason`` go to rejects, with ``figures``."""

    def __init__(self, step: str, reason: str, **figures: Any) -> None:
        super().__init__(f"{step}: {reason}")
        self.step, self.reason, self.figures = step, reason, figures


@dataclass
class _T1State:
    n4: sitk.Image
    transform: sitk.Transform
    mask_native: sitk.Image | None  # UInt8, None for atlas/no mask
    mask_grid: np.ndarray | None  # bool on the output grid, None = no masking


def _interp(cfg: PreprocessConfig) -> int:
    return sitk.sitkBSpline if cfg.interpolation == "bspline" else sitk.sitkLinear


def _load(item: WorkItem, cfg: PreprocessConfig) -> tuple[sitk.Image, dict]:
    try:
        img, info = load_volume(item.path, expected_sha256=item.meta.get("source_sha256"))
    except InputError as e:
        raise StepError("load", e.reason, detail=e.detail) from None
    if cfg.n4.enabled:
        try:
            img = n4_correct(img, cfg.n4)
        except RuntimeError as e:
            raise StepError("n4", f"N4 failed: {str(e).strip().splitlines()[-1][:200]}") from None
    return img, info


def _finish(vol: np.ndarray, mask_grid: np.ndarray | None, cfg: PreprocessConfig) -> np.ndarray:
    if mask_grid is not None:
        vol = vol * mask_grid
    if cfg.clip_negative:
        vol = np.maximum(vol, 0.0)
    if not np.any(vol > 0):
        raise StepError("resample", "empty after registration and masking: the brain left the field of view")
    return vol.astype(np.float32)


def fine_registration_target(atlas: Atlas, cfg: PreprocessConfig) -> sitk.Image | None:
    """The 1 mm brain template as the finest registration level, when it helps.

    Only when the output grid is finer than the coarse registration target (the 1 mm paper grid
    vs the 2 mm template) and the brain template is finer too; the 2 mm demo grid gains nothing
    from it and keeps its cost.
    """
    if not cfg.registration.fine_level:
        return None
    coarse = min(atlas.brain_reg.GetSpacing())
    if min(atlas.brain.GetSpacing()) < coarse - 1e-6 and cfg.geometry.spacing < coarse - 1e-6:
        return atlas.brain
    return None


def _process_t1(item: WorkItem, cfg: PreprocessConfig, atlas: Atlas) -> tuple[np.ndarray, _T1State, dict]:
    img, info = _load(item, cfg)
    figures: dict[str, Any] = {"input": info}
    method = cfg.skullstrip.method
    mask = None
    if method != "atlas":
        try:
            mask = native_mask(img, cfg.skullstrip)
        except SkullStripError as e:
            raise StepError("skullstrip", str(e)) from None
        ml = mask_volume_ml(mask)
        figures["brain_ml"] = round(ml, 1)
        if cfg.qc.check_brain_volume and not (cfg.qc.min_brain_ml <= ml <= cfg.qc.max_brain_ml):
            raise StepError("qc", "implausible brain mask volume", brain_ml=round(ml, 1),
                            range_ml=[cfg.qc.min_brain_ml, cfg.qc.max_brain_ml])
    if cfg.registration.enabled:
        fine = None
        if mask is not None:
            moving, fixed = sitk.Mask(img, mask), atlas.brain_reg
            fine = fine_registration_target(atlas, cfg)
        else:  # with skull: only a 2 mm head template ships (see atlases/sri24/PROVENANCE.md)
            moving, fixed = img, atlas.head
        try:
            res = affine_to_atlas(moving, fixed, cfg.registration, seed=cfg.seed, fine_fixed=fine)
        except RegistrationError as e:
            raise StepError("register", str(e)) from None
        tx = res.transform
        figures["registration"] = {"metric": round(res.metric, 5), "iterations": res.iterations,
                                   "transform": transform_record(tx)}
        if res.coarse is not None:
            figures["registration"]["coarse"] = res.coarse
            figures["registration"]["fine_target_spacing_mm"] = [round(v, 3) for v in fine.GetSpacing()]
    else:
        tx = sitk.Transform(3, sitk.sitkIdentity)
    vol = to_array(sitk.Resample(img, atlas.grid, tx, _interp(cfg), 0.0, sitk.sitkFloat32))
    if mask is not None:
        m = to_array(sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), atlas.grid, tx, sitk.sitkLinear, 0.0)) >= 0.5
    elif method == "atlas":
        m = to_array(sitk.Resample(atlas.mask_image(cfg.skullstrip.atlas_dilate_mm), atlas.grid,
                                   sitk.Transform(), sitk.sitkLinear, 0.0)) >= 0.5
    else:
        m = None
    vol = _finish(vol, m, cfg)
    corr = atlas_correlation(vol, atlas.brain_on_grid, atlas.mask_on_grid)
    figures["atlas_correlation"] = round(corr, 4)
    if corr < cfg.qc.min_atlas_correlation:
        raise StepError("qc", "registration similarity to the atlas under threshold",
                        atlas_correlation=round(corr, 4), threshold=cfg.qc.min_atlas_correlation)
    return vol, _T1State(img, tx, mask, m), figures


def _process_other(item: WorkItem, cfg: PreprocessConfig, atlas: Atlas, t1: _T1State | None) -> tuple[np.ndarray, dict]:
    img, info = _load(item, cfg)
    figures: dict[str, Any] = {"input": info}
    if not cfg.registration.enabled:
        # already in atlas space: identity into the grid; already stripped or masked as configured
        mask = None
        if cfg.skullstrip.method == "none":
            mask = native_mask(img, cfg.skullstrip)
        vol = to_array(sitk.Resample(img, atlas.grid, sitk.Transform(), _interp(cfg), 0.0, sitk.sitkFloat32))
        m = None
        if mask is not None:
            m = to_array(sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), atlas.grid, sitk.Transform(),
                                       sitk.sitkLinear, 0.0)) >= 0.5
        elif t1 is not None:
            m = t1.mask_grid
        return _finish(vol, m, cfg), figures
    assert t1 is not None
    fixed_mask = None
    if t1.mask_native is not None and cfg.registration.intra_fixed_mask:
        fixed_mask = sitk.BinaryDilate(t1.mask_native, [2, 2, 1])
    try:
        res = rigid_to_t1(img, t1.n4, cfg.registration, seed=cfg.seed, fixed_mask=fixed_mask)
    except RegistrationError as e:
        raise StepError("register", str(e)) from None
    figures["registration_to_t1"] = {"metric": round(res.metric, 5), "iterations": res.iterations,
                                     "transform": transform_record(res.transform)}
    if -res.metric < cfg.qc.min_intra_mutual_information:
        raise StepError("qc", "rigid registration to the session T1 under threshold",
                        mutual_information=round(-res.metric, 4), threshold=cfg.qc.min_intra_mutual_information)
    tx = chain(t1.transform, res.transform)  # atlas point -> T1 point -> this modality's point
    vol = to_array(sitk.Resample(img, atlas.grid, tx, _interp(cfg), 0.0, sitk.sitkFloat32))
    return _finish(vol, t1.mask_grid, cfg), figures


def _reject(item: WorkItem, err: StepError) -> dict[str, Any]:
    return reject_line(item.path, item.subject, err.step, err.reason, key=item.key, session=item.session,
                       modality=item.modality, **err.figures)


def _sample(item: WorkItem, vol: np.ndarray, figures: dict, cfg: PreprocessConfig, qc_dir: Path | None,
            atlas: Atlas) -> SampleOut:
    figures["threads"] = cfg.threads
    if qc_dir is not None:
        write_montage(qc_dir / f"{item.key}.png", vol, atlas.mask_on_grid)
    return SampleOut(item.key, dict(item.meta), vol, figures)


def process_subject(items: list[WorkItem], cfg: PreprocessConfig, atlas: Atlas,
                    qc_dir: Path | None = None) -> SubjectOut:
    """All sessions of one subject. Never raises for bad input: failures become reject records."""
    out = SubjectOut()
    sessions: dict[str, list[WorkItem]] = {}
    for it in items:
        sessions.setdefault(it.session or "", []).append(it)
    for ses in sorted(sessions):
        group = sorted(sessions[ses], key=lambda i: i.key)
        t1s = [i for i in group if i.modality == "T1"]
        others = [i for i in group if i.modality != "T1"]
        anchor: _T1State | None = None
        t1_failed: list[str] = []
        for it in t1s:
            t0 = time.perf_counter()
            try:
                vol, state, fig = _process_t1(it, cfg, atlas)
            except StepError as e:
                out.rejects.append(_reject(it, e))
                t1_failed.append(f"{e.step}: {e.reason}")
                continue
            except Exception as e:  # a library failure must not stop the batch
                out.rejects.append(_reject(it, StepError("preprocess", f"{type(e).__name__}: {e}")))
                t1_failed.append("preprocess error")
                continue
            fig["seconds"] = round(time.perf_counter() - t0, 2)
            out.samples.append(_sample(it, vol, fig, cfg, qc_dir, atlas))
            if anchor is None:
                anchor = state
        for it in others:
            if anchor is None and cfg.registration.enabled:
                reason = ("no T1 in its session" if not t1s
                          else "the session's T1 was rejected (" + "; ".join(t1_failed) + ")")
                out.rejects.append(_reject(it, StepError("anchor", reason)))
                continue
            t0 = time.perf_counter()
            try:
                vol, fig = _process_other(it, cfg, atlas, anchor)
            except StepError as e:
                out.rejects.append(_reject(it, e))
                continue
            except Exception as e:
                out.rejects.append(_reject(it, StepError("preprocess", f"{type(e).__name__}: {e}")))
                continue
            fig["seconds"] = round(time.perf_counter() - t0, 2)
            out.samples.append(_sample(it, vol, fig, cfg, qc_dir, atlas))
    return out
