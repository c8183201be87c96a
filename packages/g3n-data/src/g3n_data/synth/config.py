"""Configuration of the synthetic cohort: geometry, cohorts, sites and effect sizes.

Every number of the generative model lives here (SYNTH.md describes what each one does), so an
evaluation can read the ground truth from the config that made a set (it is recorded in the
shard manifest's producer config). Presets: ``demo`` (80x96x80 at 2 mm), ``paper`` (160x192x160
at 1 mm) and ``tiny`` (40x48x40 at 4 mm, for fast tests); all three cover the same 160x192x160
mm box of SRI24 space (BraTS-space voxel x 40-199, y 30-221, z -3..156), the box the real
preprocessing (``g3n_data.config`` demo/paper presets) resamples into.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

#: SRI24 BraTS-space voxel -> world (nibabel RAS convention): x = -i, y = 239 - j, z = k.
SRI24_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
#: the box of SRI24 1 mm voxels every geometry covers (same as g3n_data.config's presets)
BOX_START = (40, 30, -3)
BOX_MM = (160, 192, 160)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SynthGeometry(_Strict):
    """Output grid: ``shape`` voxels of ``spacing`` mm over the 160x192x160 mm SRI24 box."""

    name: str = "demo"
    shape: tuple[int, int, int] = (80, 96, 80)
    spacing: float = Field(default=2.0, gt=0)
    patch_size: tuple[int, int, int] = (8, 8, 8)

    @model_validator(mode="after")
    def _covers_box(self) -> "SynthGeometry":
        for s, mm in zip(self.shape, BOX_MM):
            if abs(s * self.spacing - mm) > 1e-6:
                raise ValueError(f"shape {self.shape} x spacing {self.spacing} mm must cover the {BOX_MM} mm box")
        for s, p in zip(self.shape, self.patch_size):
            if s % p:
                raise ValueError(f"shape {self.shape} is not a multiple of patch_size {self.patch_size}")
        return self

    @property
    def affine(self) -> np.ndarray:
        """Voxel -> SRI24 world (RAS, nibabel). The box edge is the edge of SRI24 voxel BOX_START;
        the first voxel centre is half an output voxel inside it (as g3n_data.atlas.output_grid)."""
        s = self.spacing
        a = SRI24_AFFINE.copy()
        start = np.array(BOX_START, float) - 0.5 + s / 2.0
        a[:3, 3] = SRI24_AFFINE[:3, :3] @ start + SRI24_AFFINE[:3, 3]
        a[:3, :3] = SRI24_AFFINE[:3, :3] * s
        return a

    def axis_mm(self, axis: int) -> np.ndarray:
        """Voxel centres along one axis in box millimetres (0 = box edge)."""
        return (np.arange(self.shape[axis], dtype=np.float64) + 0.5) * self.spacing


GEOMETRIES: dict[str, SynthGeometry] = {
    "demo": SynthGeometry(name="demo", shape=(80, 96, 80), spacing=2.0, patch_size=(8, 8, 8)),
    "paper": SynthGeometry(name="paper", shape=(160, 192, 160), spacing=1.0, patch_size=(16, 16, 16)),
    "tiny": SynthGeometry(name="tiny", shape=(40, 48, 40), spacing=4.0, patch_size=(8, 8, 8)),
}


class SiteSpec(_Strict):
    """A scanner site: the acquisition effects it puts into every scan it makes."""

    name: str
    field_strength: float
    vendor: str
    #: multiplies every intensity (arbitrary scanner units); real preprocessed data has no fixed scale
    intensity_scale: float = Field(gt=0)
    #: Rician noise sigma as a fraction of the white-matter T1 intensity before scaling
    noise: float = Field(ge=0)
    #: peak-to-peak-ish amplitude of the smooth multiplicative bias field (log scale, std of log-bias)
    bias: float = Field(ge=0)
    #: multiplies the grey-matter intensity of every modality (a site's GM/WM contrast)
    gm_contrast: float = Field(default=1.0, gt=0)


class AgeDist(_Strict):
    """Age at the first visit: normal(mean, sd) clipped to [lo, hi]; sd = 0 with lo < hi = uniform."""

    mean: float = 50.0
    sd: float = 0.0
    lo: float = 20.0
    hi: float = 90.0


class CohortSpec(_Strict):
    """A cohort: who is in it, how often they are scanned and with which modalities."""

    name: str
    weight: float = Field(gt=0, description="share of subjects (normalised over cohorts)")
    #: diagnosis -> share of this cohort's subjects; 'glioma' means GBM/glioma by grade (see GliomaEffects)
    diagnoses: dict[str, float]
    age: dict[str, AgeDist] = Field(description="diagnosis -> age at first visit ('*' = default)")
    male: dict[str, float] = Field(description="diagnosis -> probability of sex M ('*' = default)")
    sites: list[str]
    longitudinal: float = Field(default=0.0, ge=0, le=1, description="share of subjects with several visits")
    visits: tuple[int, int] = (2, 3)
    interval_years: tuple[float, float] = (1.0, 3.0)
    #: extra modality -> probability a (non-glioma) subject has it at every visit; glioma subjects get all four
    extra_modalities: dict[str, float] = Field(default_factory=dict)
    clinical: Literal["none", "adni", "ppmi", "glioma"] = "none"
    handedness: bool = True


class AnatomyEffects(_Strict):
    """Effect sizes of age, sex and neurodegeneration on the anatomy (see SYNTH.md §3)."""

    #: global scale of the head/brain about its centroid: 1 + sex_scale*(+1 M / -1 F) + N(0, scale_sd)
    sex_scale: float = 0.02
    scale_sd: float = 0.015
    scale_clip: tuple[float, float] = (0.94, 1.06)
    #: random smooth subject warp: control points every warp_spacing_mm, amplitude (mm, per component sd)
    warp_mm: float = 1.5
    warp_spacing_mm: float = 32.0
    #: ventricle enlargement (mm of outward wall displacement): base N(0, vent_sd) + age term + disease term
    vent_sd_mm: float = 0.4
    #: the age term: vent_age_mm * ((age-20)/70)**vent_age_power, so 9 mm at 90; cubic, so that a subject
    #: of 70-80 widens 0.2-0.3 mm a year, enough to see between visits a few years apart on the 2 mm grid
    vent_age_mm: float = 9.0
    vent_age_power: float = Field(3.0, gt=0)
    vent_mci_mm: float = 1.0  # times severity
    vent_ad_mm: float = 1.8  # times severity
    vent_clip_mm: tuple[float, float] = (-0.8, 12.0)
    vent_sigma_mm: float = 6.0  # smoothness of the radial field around the ventricles
    #: cortical thinning: GM loss fraction L = cortex_base + cortex_age*(age-20)/70 + N(0, cortex_sd)
    cortex_base: float = 0.02
    cortex_age: float = 0.35
    cortex_sd: float = 0.02
    cortex_clip: tuple[float, float] = (0.0, 0.5)
    #: hippocampal GM loss fraction: ageing + disease*severity; shrink displacement (mm) for MCI/AD
    hippo_age: float = 0.10
    hippo_mci: float = 0.35
    hippo_ad: float = 0.60
    hippo_shrink_mm: float = 2.0
    #: temporal-lobe GM loss fraction, disease*severity
    temporal_mci: float = 0.10
    temporal_ad: float = 0.25
    loss_clip: float = 0.8
    #: periventricular white-matter hyperintensities: load = wmh_age*t^2*exp(N(0, wmh_sd)) + disease*severity
    wmh_age: float = 0.5
    wmh_sd: float = 0.5
    wmh_mci: float = 0.1
    wmh_ad: float = 0.2
    wmh_clip: float = 0.9
    wmh_decay_mm: float = 6.0  # periventricular weight exp(-distance/decay) within 15 mm of the ventricles
    #: disease severity at first visit (uniform ranges) and progression per year
    severity_mci: tuple[float, float] = (0.15, 0.45)
    severity_ad: tuple[float, float] = (0.5, 0.9)
    progression_mci: float = 0.04
    progression_ad: float = 0.07
    severity_pd: tuple[float, float] = (0.3, 0.9)
    progression_pd: float = 0.05
    #: PD: intensity multiplier 1 - pd_*[modality] * severity in substantia nigra + putamen
    pd_drop: dict[str, float] = Field(default_factory=lambda: {"T1": 0.10, "T1c": 0.10, "T2": 0.25, "FLAIR": 0.15})


class GliomaEffects(_Strict):
    """Glioma: IDH1, grade and MGMT, and what each does to the lesion (see SYNTH.md §4)."""

    idh_mutant: float = 0.35
    grade_given_mutant: dict[int, float] = Field(default_factory=lambda: {2: 0.45, 3: 0.40, 4: 0.15})
    grade_given_wildtype: dict[int, float] = Field(default_factory=lambda: {2: 0.03, 3: 0.12, 4: 0.85})
    mgmt_methylated_mutant: float = 0.85
    mgmt_methylated_wildtype: float = 0.45
    #: lesion centre (MNI mm, x is mirrored to a random hemisphere) and its jitter sd (mm)
    centre_mutant: list[tuple[float, float, float]] = Field(default_factory=lambda: [(28.0, 30.0, 22.0)])
    centre_wildtype: list[tuple[float, float, float]] = Field(
        default_factory=lambda: [(42.0, -16.0, -10.0), (24.0, -10.0, 16.0)]
    )
    centre_jitter_mm: float = 6.0
    radius_mutant_mm: tuple[float, float] = (12.0, 20.0)
    radius_wildtype_mm: tuple[float, float] = (13.0, 22.0)
    #: necrotic core as a fraction of the tumour radius, by grade
    necrosis: dict[int, tuple[float, float]] = Field(
        default_factory=lambda: {2: (0.0, 0.0), 3: (0.0, 0.3), 4: (0.45, 0.65)}
    )
    #: enhancement of non-necrotic tumour in T1c (x WM T1 intensity): (grade, idh) -> range
    enhancement_wt4: tuple[float, float] = (0.8, 1.1)
    enhancement_mut4: tuple[float, float] = (0.4, 0.65)
    enhancement_g3: tuple[float, float] = (0.12, 0.3)
    enhancement_g2: tuple[float, float] = (0.0, 0.06)
    #: oedema shell thickness as a fraction of the tumour radius
    oedema_wildtype: tuple[float, float] = (0.5, 1.0)
    oedema_mutant: tuple[float, float] = (0.1, 0.3)
    #: mass effect: radial push, fraction (0 = none, must stay < 0.5)
    mass_effect: tuple[float, float] = (0.1, 0.3)
    #: probability of the T2-FLAIR mismatch sign (tumour FLAIR-suppressed) for IDH1-mutant
    flair_mismatch_mutant: float = 0.5


#: tissue -> modality -> intensity (relative to WM T1 = 1 before site scaling)
DEFAULT_CONTRAST: dict[str, dict[str, float]] = {
    "CSF": {"T1": 0.25, "T1c": 0.25, "T2": 1.00, "FLAIR": 0.08},
    "GM": {"T1": 0.62, "T1c": 0.62, "T2": 0.58, "FLAIR": 0.62},
    "WM": {"T1": 0.90, "T1c": 0.90, "T2": 0.40, "FLAIR": 0.48},
    "necrosis": {"T1": 0.22, "T1c": 0.22, "T2": 0.95, "FLAIR": 0.35},
    "tumour": {"T1": 0.50, "T1c": 0.50, "T2": 0.78, "FLAIR": 0.88},
    "oedema": {"T1": 0.58, "T1c": 0.58, "T2": 0.82, "FLAIR": 0.92},
    "WMH": {"T1": 0.72, "T1c": 0.72, "T2": 0.72, "FLAIR": 0.90},
}


class ContrastSpec(_Strict):
    """Modality contrasts: tissue intensities, T1c vessels, the mismatch tumour FLAIR value."""

    tissue: dict[str, dict[str, float]] = Field(default_factory=lambda: json.loads(json.dumps(DEFAULT_CONTRAST)))
    #: T1c: surface vessels (outer 2-4 mm of the brain) and choroid plexus enhance by this much
    vessel_enhancement: float = 0.35
    #: tumour FLAIR intensity when the T2-FLAIR mismatch sign is present
    mismatch_flair: float = 0.40
    #: per-subject jitter (sd, relative) of every tissue intensity
    subject_jitter: float = 0.02
    #: per-scan intensity scale jitter (sd of log scale)
    scan_scale_sd: float = 0.05


def _default_sites() -> list[SiteSpec]:
    return [
        SiteSpec(name="SYN-S1", field_strength=1.5, vendor="Philips", intensity_scale=600, noise=0.045, bias=0.20, gm_contrast=1.00),
        SiteSpec(name="SYN-S2", field_strength=3.0, vendor="Siemens", intensity_scale=1000, noise=0.025, bias=0.12, gm_contrast=0.96),
        SiteSpec(name="SYN-S3", field_strength=3.0, vendor="GE", intensity_scale=1400, noise=0.030, bias=0.18, gm_contrast=1.04),
        SiteSpec(name="SYN-S4", field_strength=1.5, vendor="Siemens", intensity_scale=800, noise=0.050, bias=0.10, gm_contrast=0.98),
        SiteSpec(name="SYN-S5", field_strength=3.0, vendor="Siemens", intensity_scale=1100, noise=0.030, bias=0.15, gm_contrast=1.02),
        SiteSpec(name="SYN-S6", field_strength=3.0, vendor="GE", intensity_scale=1800, noise=0.035, bias=0.22, gm_contrast=1.01),
    ]  # fmt: skip


def _default_cohorts() -> list[CohortSpec]:
    return [
        CohortSpec(
            name="SYN-LIFESPAN", weight=0.30, diagnoses={"HC": 1.0},
            age={"*": AgeDist(lo=20, hi=90)}, male={"*": 0.5}, sites=["SYN-S1", "SYN-S2"],
            longitudinal=0.15, visits=(2, 3), interval_years=(2.0, 5.0), extra_modalities={"T2": 0.5},
        ),
        CohortSpec(
            name="SYN-ADNI", weight=0.35, diagnoses={"HC": 0.40, "MCI": 0.35, "AD": 0.25},
            age={"HC": AgeDist(mean=73, sd=6, lo=55, hi=90), "MCI": AgeDist(mean=73, sd=7, lo=55, hi=90),
                 "AD": AgeDist(mean=75, sd=7, lo=55, hi=90)},
            male={"HC": 0.45, "MCI": 0.60, "AD": 0.52}, sites=["SYN-S3", "SYN-S4"],
            longitudinal=0.6, visits=(2, 4), interval_years=(1.5, 3.0), extra_modalities={"FLAIR": 0.5},
            clinical="adni",
        ),
        CohortSpec(
            name="SYN-PPMI", weight=0.15, diagnoses={"HC": 0.30, "PD": 0.70},
            age={"*": AgeDist(mean=62, sd=9, lo=40, hi=85)}, male={"HC": 0.60, "PD": 0.65},
            sites=["SYN-S5", "SYN-S2"], longitudinal=0.4, visits=(2, 3), interval_years=(1.0, 3.0),
            extra_modalities={"T2": 0.3}, clinical="ppmi",
        ),
        CohortSpec(
            name="SYN-GLIOMA", weight=0.20, diagnoses={"glioma": 1.0},
            age={"mutant": AgeDist(mean=40, sd=11, lo=20, hi=85), "wildtype": AgeDist(mean=60, sd=11, lo=20, hi=85)},
            male={"*": 0.58}, sites=["SYN-S6", "SYN-S4"], longitudinal=0.0, clinical="glioma", handedness=False,
        ),
    ]  # fmt: skip


#: the synthetic subjects' ID prefix unless a config names another (``syn00000``, ...)
DEFAULT_SUBJECT_PREFIX = "syn"


class SynthConfig(_Strict):
    """Everything that defines a synthetic cohort; (config, seed) -> identical volumes on one machine
    (on another CPU, identical up to rounding: SYNTH.md §2)."""

    preset: str = "demo"
    subjects: int = Field(default=100, ge=1)
    seed: int = 2025
    #: subject IDs are ``{prefix}{index:05d}``: a second cohort of another seed (e.g. extra pretraining
    #: subjects) gets its own prefix, so its keys do not collide with the first one's when merged
    subject_prefix: str = Field(default=DEFAULT_SUBJECT_PREFIX, pattern=r"^[a-z][a-z0-9]{0,15}$")
    geometry: SynthGeometry = GEOMETRIES["demo"]
    cohorts: list[CohortSpec] = Field(default_factory=_default_cohorts)
    sites: list[SiteSpec] = Field(default_factory=_default_sites)
    anatomy: AnatomyEffects = AnatomyEffects()
    glioma: GliomaEffects = GliomaEffects()
    contrast: ContrastSpec = ContrastSpec()
    #: bias field: control-point spacing (mm) and the share of a site's bias that is scan-specific
    bias_spacing_mm: float = 48.0
    bias_scan_share: float = 0.35

    @model_serializer(mode="wrap")
    def _without_default_prefix(self, handler: Any) -> dict[str, Any]:
        """The default prefix is left out of a dump, so every set rendered before the field existed
        keeps its manifest and digest (the shipped models' train split among them)."""
        data = handler(self)
        if data.get("subject_prefix") == DEFAULT_SUBJECT_PREFIX:
            del data["subject_prefix"]
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "SynthConfig":
        site_names = {s.name for s in self.sites}
        if len(site_names) != len(self.sites):
            raise ValueError("site names must be unique")
        for c in self.cohorts:
            missing = [s for s in c.sites if s not in site_names]
            if missing:
                raise ValueError(f"cohort {c.name}: unknown sites {missing}")
            if not c.diagnoses or any(v < 0 for v in c.diagnoses.values()) or sum(c.diagnoses.values()) <= 0:
                raise ValueError(f"cohort {c.name}: diagnoses need non-negative shares summing to > 0")
            for m in c.extra_modalities:
                if m not in ("T2", "FLAIR", "T1c"):
                    raise ValueError(f"cohort {c.name}: extra modality {m!r} not one of T2, FLAIR, T1c")
            if c.visits[0] < 1 or c.visits[1] < c.visits[0]:
                raise ValueError(f"cohort {c.name}: visits {c.visits} must be 1 <= min <= max")
        return self

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the config."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


PRESETS: dict[str, dict[str, Any]] = {name: {"preset": name, "geometry": g.model_dump()} for name, g in GEOMETRIES.items()}


def make_config(preset: str = "demo", **overrides: Any) -> SynthConfig:
    """A preset (``demo``, ``paper``, ``tiny``) with top-level fields overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown synth preset {preset!r}; choose one of {sorted(PRESETS)}")
    data = dict(PRESETS[preset])
    data.update(overrides)
    return SynthConfig.model_validate(data)
