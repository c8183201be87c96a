"""Preprocessing configuration: every size, threshold and setting is here, never in code.

Two presets exist: ``paper`` (1 mm, 160x192x160, docs/method.md §1) and ``demo`` (2 mm, 80x96x80,
the same 160x192x160 mm field of view). A config file (YAML or JSON) may name a preset and
override any field; unknown keys are refused so that a typo does not silently fall back to a
default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AtlasConfig(_Strict):
    """Which atlas files define the target space.

    ``brain`` (skull-stripped) defines the output grid and the brain mask; ``head`` (with skull)
    is the registration target for inputs that still have a skull. ``builtin:`` names a file
    shipped in ``g3n_data/atlases/``; anything else is a path.
    """

    name: str = "SRI24"
    brain: str = "builtin:sri24/t1_brain_1mm.nii.gz"
    head: str = "builtin:sri24/t1_2mm.nii.gz"
    #: registration target resolution for skull-stripped inputs (the 2 mm brain is 4x cheaper)
    brain_registration: str = "builtin:sri24/t1_brain_2mm.nii.gz"


class GeometryConfig(_Strict):
    """Output grid: a box on the atlas grid, sampled at ``spacing`` mm.

    ``box_start`` is the atlas voxel index (nibabel order x, y, z) of the box's first corner at
    the atlas resolution; negative values pad. The box covers ``shape * spacing`` millimetres.
    The paper box (x 40-199, y 30-221, z padded 3 below and 2 above) kept the atlas brain and all
    10 registered IXI brains (notes.md); a centred box cuts the back of some brains.
    """

    shape: tuple[int, int, int] = (160, 192, 160)
    spacing: float = Field(default=1.0, gt=0)
    box_start: tuple[int, int, int] = (40, 30, -3)
    patch_size: tuple[int, int, int] = (16, 16, 16)

    @model_validator(mode="after")
    def _patches_tile(self) -> "GeometryConfig":
        for s, p in zip(self.shape, self.patch_size):
            if s % p:
                raise ValueError(f"shape {self.shape} is not a multiple of patch_size {self.patch_size}")
        return self


class N4Config(_Strict):
    """N4 bias-field correction (SimpleITK). Shrink 4 agrees with full resolution (r ~ 0.99) at 1/50 the cost."""

    enabled: bool = True
    shrink: int = Field(default=4, ge=1)
    #: shrink along the slice axis is capped for thick-slice scans (slice thickness > this many mm)
    thick_slice_mm: float = 3.0
    iterations: tuple[int, ...] = (50, 50, 50, 50)
    convergence: float = 1e-3
    fitting_levels: int = Field(default=4, ge=1)


class SkullStripConfig(_Strict):
    """Skull stripping. ``robex`` (default, offline, no torch), ``hdbet`` (optional extra, needs
    torch), ``atlas`` (the registered atlas brain mask: coarse, misses ~10 % of the brain; for
    tests and quick looks), ``none`` (inputs already skull-stripped: mask = voxels > threshold)."""

    method: Literal["robex", "hdbet", "atlas", "none"] = "robex"
    seed: int = 0
    #: ``none``: voxels above this fraction of the 99th percentile are brain
    none_threshold: float = 0.0
    #: ``atlas``: dilate the atlas mask by this many mm before applying it
    atlas_dilate_mm: float = 2.0
    #: ``hdbet``: "cpu", "cuda" or "cuda:N"
    hdbet_device: str = "cpu"
    #: ``hdbet``: "fast" (one network) or "accurate" (five, 5x the time)
    hdbet_mode: Literal["fast", "accurate"] = "fast"
    #: ``hdbet``: test-time mirroring along each axis (8x the time; meant for a GPU)
    hdbet_tta: bool = False


class RegistrationConfig(_Strict):
    """Affine registration to the atlas (SimpleITK). Defaults are the settings notes.md found
    robust on real scans: moments-centred init, shrink 6/4/2/1, Mattes MI 32 bins, REGULAR
    20 % sampling, learning rate re-estimated every iteration, 0.25 mm maximum step."""

    enabled: bool = True
    shrink_factors: tuple[int, ...] = (6, 4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (3.0, 2.0, 1.0, 0.0)
    histogram_bins: int = 32
    sampling_percentage: float = Field(default=0.2, gt=0, le=1)
    iterations: int = 200
    max_step_mm: float = 0.25
    convergence_minimum: float = 1e-6
    convergence_window: int = 10
    #: skull-stripped inputs on an output grid finer than ``atlas.brain_registration`` (the 1 mm
    #: paper grid vs the 2 mm target): one more level against ``atlas.brain`` at its full resolution.
    #: Off by default: the transform is physical, so the 2 mm fit already places the 1 mm output;
    #: on 3 IXI T1 the extra level doubled registration time (~7 -> ~15 s) for +0.008 atlas
    #: correlation (measured against that same template) and no gain in brain-mask overlap
    #: (Dice 0.966 -> 0.965); see atlases/sri24/PROVENANCE.md
    fine_level: bool = False
    fine_iterations: int = 100
    fine_sampling_percentage: float = Field(default=0.05, gt=0, le=1)
    fine_max_step_mm: float = 0.25
    #: T2/FLAIR/T1c -> same-session T1: rigid (6 parameters)
    intra_iterations: int = 200
    intra_max_step_mm: float = 0.25
    #: restrict the rigid metric to the (dilated) T1 brain mask. Off: on the thick-slice TCGA case
    #: the masked metric found almost no mutual information (MI -0.02, T2 misplaced, correlation with
    #: the reference 0.03) while the unmasked one converged (MI -0.65, correlation 0.44)
    intra_fixed_mask: bool = False
    intra_shrink_factors: tuple[int, ...] = (4, 2, 1)
    intra_smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)

    @model_validator(mode="after")
    def _levels(self) -> "RegistrationConfig":
        if len(self.shrink_factors) != len(self.smoothing_sigmas):
            raise ValueError("shrink_factors and smoothing_sigmas need the same length")
        if len(self.intra_shrink_factors) != len(self.intra_smoothing_sigmas):
            raise ValueError("intra_shrink_factors and intra_smoothing_sigmas need the same length")
        return self


class QCConfig(_Strict):
    """Quality control: failing either test puts the subject's volume in rejects with its figures."""

    #: Pearson correlation with the atlas brain, inside the atlas brain mask, after registration
    #: measured: good IXI T1 0.58-0.70, TCGA spin-echo T1 (thick slices, tumour) 0.40, no registration ~0
    min_atlas_correlation: float = 0.25
    #: brain mask volume, millilitres (child to large adult, tumour brains included)
    min_brain_ml: float = 500.0
    max_brain_ml: float = 2500.0
    #: skip the mask-volume test for scans that do not cover the head (thick slices, partial FOV)
    check_brain_volume: bool = True
    #: T2/FLAIR/T1c: final Mattes mutual information of the rigid step to the session T1 (nats, as a
    #: positive number). Measured: converged 0.65-0.92 (TCGA T2/FLAIR/T1c), misplaced T2 0.02-0.03
    min_intra_mutual_information: float = 0.1
    montage: bool = False


class PreprocessConfig(_Strict):
    """One pipeline for every cohort (docs/method.md §1); every step can be switched off."""

    preset: str = "paper"
    geometry: GeometryConfig = GeometryConfig()
    atlas: AtlasConfig = AtlasConfig()
    n4: N4Config = N4Config()
    skullstrip: SkullStripConfig = SkullStripConfig()
    registration: RegistrationConfig = RegistrationConfig()
    qc: QCConfig = QCConfig()
    clip_negative: bool = True
    #: interpolation for the final resampling into the output grid
    interpolation: Literal["linear", "bspline"] = "linear"
    seed: int = 0
    #: SimpleITK threads per worker process; 1 keeps results identical between runs
    threads: int = Field(default=1, ge=1)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON: a cache made under another config is not reused."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"preset": "paper"},
    "demo": {
        "preset": "demo",
        "geometry": {"shape": (80, 96, 80), "spacing": 2.0, "box_start": (40, 30, -3), "patch_size": (8, 8, 8)},
    },
}


def _deep_update(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


def make_config(preset: str = "paper", overrides: dict[str, Any] | None = None) -> PreprocessConfig:
    """A preset with nested overrides applied (e.g. ``{"skullstrip": {"method": "none"}}``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    data = _deep_update(PRESETS[preset], overrides or {})
    data["preset"] = preset
    return PreprocessConfig.model_validate(data)


def load_config(path: str | Path | None = None, preset: str | None = None) -> PreprocessConfig:
    """Read a YAML/JSON config; its ``preset`` key (or ``preset``) picks the base values."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{p}: cannot read config: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p}: config must be a mapping, got {type(data).__name__}")
    name = preset or data.pop("preset", None) or "paper"
    data.pop("preset", None)
    try:
        return make_config(name, data)
    except Exception as e:  # pydantic ValidationError -> name the file
        raise ValueError(f"{path or '<preset>'}: invalid preprocessing config: {e}") from None
