"""The cohort design: who the synthetic subjects are, when they are scanned, what they have.

``plan_cohort(cfg)`` is cheap and pure: from (config, seed) it draws every subject's labels and
latent factors (the ground truth) before any voxel is made. Counts per cohort, diagnosis, sex,
site and IDH1 status are allotted by quota (largest remainder) and shuffled, so even a handful
of subjects covers every class; continuous factors are drawn from each subject's own RNG,
``SeedSequence([seed, 1, index])``, so a subject does not change when the worker count does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .config import AgeDist, CohortSpec, SynthConfig

STREAM_DESIGN, STREAM_SUBJECT, STREAM_RENDER, STREAM_SITE = 0, 1, 2, 3


@dataclass
class VisitPlan:
    """One session: age, the effects in force at that age, and the clinical scores."""

    index: int
    session: str
    age: float
    years_from_baseline: float
    modalities: list[str]
    effects: dict[str, float]
    clinical: dict[str, float | None]


@dataclass
class SubjectPlan:
    """One subject: identity, labels and subject-level latent factors (same at every visit)."""

    index: int
    subject: str
    cohort: str
    site: str
    diagnosis: str
    sex: str
    handedness: str | None
    education: float | None
    apoe_genotype: str | None
    idh1: str | None
    mgmt: str | None
    tumour_grade: int | None
    latent: dict[str, Any]
    visits: list[VisitPlan] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rng_for(seed: int, stream: int, *ids: int) -> np.random.Generator:
    """Independent generator per (seed, stream, ids): order of generation never matters."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), *[int(i) for i in ids]]))


def quota(rng: np.random.Generator, n: int, shares: dict[Any, float]) -> list[Any]:
    """``n`` labels with counts proportional to ``shares`` (largest remainder), shuffled."""
    keys = list(shares)
    w = np.array([max(0.0, float(shares[k])) for k in keys])
    if n <= 0 or w.sum() <= 0:
        return []
    exact = w / w.sum() * n
    counts = np.floor(exact).astype(int)
    rem = n - counts.sum()
    order = sorted(range(len(keys)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:rem]:
        counts[i] += 1
    labels = [k for k, c in zip(keys, counts) for _ in range(c)]
    perm = rng.permutation(len(labels))
    return [labels[i] for i in perm]


def _age(rng: np.random.Generator, d: AgeDist) -> float:
    if d.sd <= 0:
        return float(rng.uniform(d.lo, d.hi))
    return float(np.clip(rng.normal(d.mean, d.sd), d.lo, d.hi))


def _pick(table: dict[str, Any], key: str) -> Any:
    if key in table:
        return table[key]
    if "*" in table:
        return table["*"]
    raise KeyError(f"no entry for {key!r} (and no '*' default) in {sorted(table)}")


def _choice(rng: np.random.Generator, probs: dict[Any, float]) -> Any:
    keys = list(probs)
    p = np.array([probs[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _visit_effects(cfg: SynthConfig, diagnosis: str, age: float, lat: dict[str, Any], dt: float) -> dict[str, float]:
    """Anatomical effects at one visit (SYNTH.md §3): all the image-borne ground truth of ageing/disease."""
    a = cfg.anatomy
    t = max(age - 20.0, 0.0) / 70.0
    sev = 0.0
    if diagnosis in ("MCI", "AD"):
        rate = a.progression_mci if diagnosis == "MCI" else a.progression_ad
        sev = float(min(1.0, lat["severity0"] + rate * dt))
    pd = float(min(1.0, lat["pd_severity0"] + a.progression_pd * dt)) if diagnosis == "PD" else 0.0
    vent_dx = a.vent_mci_mm if diagnosis == "MCI" else a.vent_ad_mm if diagnosis == "AD" else 0.0
    hip_dx = a.hippo_mci if diagnosis == "MCI" else a.hippo_ad if diagnosis == "AD" else 0.0
    tmp_dx = a.temporal_mci if diagnosis == "MCI" else a.temporal_ad if diagnosis == "AD" else 0.0
    wmh_dx = a.wmh_mci if diagnosis == "MCI" else a.wmh_ad if diagnosis == "AD" else 0.0
    return {
        "severity": sev,
        "pd_severity": pd,
        "ventricle_mm": float(np.clip(lat["vent_base_mm"] + a.vent_age_mm * t**a.vent_age_power + vent_dx * sev, *a.vent_clip_mm)),
        "cortical_loss": float(np.clip(a.cortex_base + a.cortex_age * t + lat["cortex_offset"], *a.cortex_clip)),
        "hippocampal_loss": float(np.clip(a.hippo_age * t + hip_dx * sev, 0.0, a.loss_clip)),
        "hippocampal_shrink_mm": float(a.hippo_shrink_mm * sev),
        "temporal_loss": float(np.clip(tmp_dx * sev, 0.0, a.loss_clip)),
        "wmh_load": float(np.clip(a.wmh_age * t**2 * lat["wmh_factor"] + wmh_dx * sev, 0.0, a.wmh_clip)),
    }


def _clinical(kind: str, rng: np.random.Generator, diagnosis: str, age: float, eff: dict[str, float],
              lat: dict[str, Any]) -> dict[str, float | None]:
    """Clinical scores consistent with diagnosis and severity (SYNTH.md §5). Not in the image
    except through severity (MMSE/CDR via hippocampal atrophy, UPDRS/MoCA via the PD signature)."""
    out: dict[str, float | None] = {"cdr": None, "mmse": None, "moca": None, "gds": None, "updrs3": None,
                                    "scopa_aut": None}  # fmt: skip
    if kind == "adni":
        sev = eff["severity"]
        if diagnosis == "HC":
            out["cdr"] = 0.5 if lat["hc_questionable"] else 0.0
            out["mmse"] = float(np.clip(round(29.3 - 0.03 * (age - 70) + rng.normal(0, 0.8)), 24, 30))
        else:
            if diagnosis == "MCI":
                out["cdr"] = 0.5
            else:
                out["cdr"] = 1.0 if sev < 0.8 else 2.0 if sev < 0.95 else 3.0
            out["mmse"] = float(np.clip(round(29.5 - 11.0 * sev + rng.normal(0, 1.2)), 0, 30))
        out["gds"] = float(np.clip(round(lat["gds_base"] + (1.0 if diagnosis == "AD" else 0.0) + rng.normal(0, 0.5)), 0, 15))
    elif kind == "ppmi":
        pd = eff["pd_severity"]
        if diagnosis == "PD":
            out["moca"] = float(np.clip(round(27.5 - 5.0 * pd + rng.normal(0, 1.5)), 0, 30))
            out["updrs3"] = float(np.clip(round(6 + 40.0 * pd + rng.normal(0, 3)), 0, 132))
            out["scopa_aut"] = float(np.clip(round(5 + 15.0 * pd + rng.normal(0, 3)), 0, 69))
        else:
            out["moca"] = float(np.clip(round(rng.normal(27.5, 1.3)), 0, 30))
            out["updrs3"] = float(np.clip(round(abs(rng.normal(1, 1.5))), 0, 132))
            out["scopa_aut"] = float(np.clip(round(abs(rng.normal(5, 3))), 0, 69))
    return out


def _glioma(cfg: SynthConfig, rng: np.random.Generator, idh: str) -> tuple[int, str, dict[str, Any]]:
    g = cfg.glioma
    grades = g.grade_given_mutant if idh == "mutant" else g.grade_given_wildtype
    grade = int(_choice(rng, grades))
    mgmt_p = g.mgmt_methylated_mutant if idh == "mutant" else g.mgmt_methylated_wildtype
    mgmt = "methylated" if rng.random() < mgmt_p else "unmethylated"
    centres = g.centre_mutant if idh == "mutant" else g.centre_wildtype
    site_i = int(rng.integers(len(centres)))
    side = 1.0 if rng.random() < 0.5 else -1.0
    nominal = np.array(centres[site_i], float) * np.array([side, 1.0, 1.0])
    c = nominal + rng.normal(0, g.centre_jitter_mm, 3)
    r0 = rng.uniform(*(g.radius_mutant_mm if idh == "mutant" else g.radius_wildtype_mm))
    radii = r0 * rng.uniform(0.8, 1.2, 3)
    lo, hi = g.necrosis[grade]
    if grade == 4:
        enh = g.enhancement_wt4 if idh == "wildtype" else g.enhancement_mut4
    else:
        enh = g.enhancement_g3 if grade == 3 else g.enhancement_g2
    lesion = {
        "lesion_region": ("frontal" if idh == "mutant" else ("temporal", "deep")[site_i % 2]),
        "lesion_hemisphere": "right" if side > 0 else "left",  # MNI x > 0 is right
        "lesion_centre_mni": [float(v) for v in c],
        "lesion_nominal_mni": [float(v) for v in nominal],
        "lesion_radii_mm": [float(v) for v in radii],
        "necrosis_fraction": float(rng.uniform(lo, hi)),
        "enhancement": float(rng.uniform(*enh)),
        "oedema_fraction": float(rng.uniform(*(g.oedema_mutant if idh == "mutant" else g.oedema_wildtype))),
        "mass_effect": float(rng.uniform(*g.mass_effect) * (1.0 if grade == 4 else 0.6)),
        "flair_mismatch": bool(idh == "mutant" and rng.random() < g.flair_mismatch_mutant),
    }
    return grade, mgmt, lesion


def plan_subject(cfg: SynthConfig, index: int, cohort: CohortSpec, diagnosis: str, sex: str, site: str,
                 idh: str | None, *, age0: float | None = None, visit_years: list[float] | None = None,
                 modalities: list[str] | None = None) -> SubjectPlan:
    """Draw one subject's factors from its own RNG (deterministic in (seed, index)).

    ``age0``, ``visit_years`` (offsets from the first visit) and ``modalities`` override the
    drawn values; they exist for controlled experiments (e.g. the same subject as HC and AD at
    the same age) and leave every other draw unchanged."""
    rng = rng_for(cfg.seed, STREAM_SUBJECT, index)
    a = cfg.anatomy
    grade = mgmt = None
    lesion: dict[str, Any] = {}
    if diagnosis == "glioma":
        grade, mgmt, lesion = _glioma(cfg, rng, idh or "wildtype")
        diagnosis = "GBM" if grade == 4 else "glioma"
        age0_drawn = _age(rng, _pick(cohort.age, idh or "wildtype"))
    else:
        age0_drawn = _age(rng, _pick(cohort.age, diagnosis))
    # unconditional draws, so that one index differs only by its labels across diagnoses
    sev_u, pd_u = float(rng.random()), float(rng.random())
    sev_lo, sev_hi = a.severity_mci if diagnosis == "MCI" else a.severity_ad
    scale = 1.0 + a.sex_scale * (1.0 if sex == "M" else -1.0) + rng.normal(0, a.scale_sd)
    lat: dict[str, Any] = {
        "scale": float(np.clip(scale, *a.scale_clip)),
        "vent_base_mm": float(rng.normal(0, a.vent_sd_mm)),
        "cortex_offset": float(rng.normal(0, a.cortex_sd)),
        "severity0": float(sev_lo + (sev_hi - sev_lo) * sev_u) if diagnosis in ("MCI", "AD") else 0.0,
        "pd_severity0": float(a.severity_pd[0] + (a.severity_pd[1] - a.severity_pd[0]) * pd_u)
        if diagnosis == "PD" else 0.0,
        "tissue_jitter": {t: float(np.exp(rng.normal(0, cfg.contrast.subject_jitter))) for t in ("CSF", "GM", "WM")},
        "hc_questionable": bool(rng.random() < 0.05),
        "gds_base": float(abs(rng.normal(1.2, 1.2))),
        "wmh_factor": float(np.exp(rng.normal(0, a.wmh_sd))),
        **lesion,
    }
    handed = str(_choice(rng, {"R": 0.89, "L": 0.09, "A": 0.02})) if cohort.handedness else None
    education = float(np.clip(round(rng.normal(15.5, 2.8)), 6, 22)) if cohort.clinical in ("adni", "ppmi") else None
    apoe = None
    if cohort.clinical == "adni":
        carrier = rng.random() < {"HC": 0.27, "MCI": 0.5, "AD": 0.65}.get(diagnosis, 0.27)
        apoe = (("e3/e4" if rng.random() < 0.85 else "e4/e4") if carrier
                else ("e3/e3" if rng.random() < 0.85 else "e2/e3"))  # fmt: skip
    n_visits = 1
    if cohort.longitudinal > 0 and rng.random() < cohort.longitudinal:
        n_visits = int(rng.integers(cohort.visits[0], cohort.visits[1] + 1))
    drawn_modalities = ["T1", "T1c", "T2", "FLAIR"] if grade is not None else ["T1"] + [
        m for m, p in sorted(cohort.extra_modalities.items()) if rng.random() < p
    ]
    modalities = list(modalities) if modalities is not None else drawn_modalities
    if age0 is not None:
        age_first = float(age0)
    else:
        age_first = age0_drawn
    offsets: list[float] = []
    plan = SubjectPlan(
        index=index, subject=f"{cfg.subject_prefix}{index:05d}", cohort=cohort.name, site=site, diagnosis=diagnosis,
        sex=sex, handedness=handed, education=education, apoe_genotype=apoe, idh1=idh if grade is not None else None,
        mgmt=mgmt, tumour_grade=grade, latent=lat,
    )
    dt = 0.0
    for v in range(n_visits):
        if v:
            dt += float(rng.uniform(*cohort.interval_years))
        offsets.append(dt)
    if visit_years is not None:
        offsets = [float(y) for y in visit_years]
        if not offsets or offsets[0] != 0.0 or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"visit_years must start at 0 and not decrease, got {visit_years}")
    for v, dt in enumerate(offsets):
        age = round(age_first + dt, 2)
        eff = _visit_effects(cfg, diagnosis, age, lat, dt)
        plan.visits.append(VisitPlan(
            index=v, session=f"ses-{v + 1}", age=age, years_from_baseline=round(dt, 3), modalities=list(modalities),
            effects=eff, clinical=_clinical(cohort.clinical, rng, diagnosis, age, eff, lat),
        ))  # fmt: skip
    return plan


def plan_cohort(cfg: SynthConfig) -> list[SubjectPlan]:
    """All subjects of the cohort, in index order. Labels by quota, factors per subject."""
    drng = rng_for(cfg.seed, STREAM_DESIGN)
    n = cfg.subjects
    cohort_of = quota(drng, n, {i: c.weight for i, c in enumerate(cfg.cohorts)})
    assign: list[tuple[int, str, str, str, str | None]] = [None] * n  # type: ignore[list-item]
    for ci, cohort in enumerate(cfg.cohorts):
        members = [i for i in range(n) if cohort_of[i] == ci]
        diags = quota(drng, len(members), cohort.diagnoses)
        sites = dict(zip(members, quota(drng, len(members), {s: 1.0 for s in cohort.sites})))
        for dx in sorted(set(diags)):
            group = [m for m, d in zip(members, diags) if d == dx]
            idhs: list[str | None] = [None] * len(group)
            if dx == "glioma":
                idhs = quota(drng, len(group), {"mutant": cfg.glioma.idh_mutant, "wildtype": 1 - cfg.glioma.idh_mutant})
            # sex quota within (cohort, diagnosis); glioma: by IDH1 class for the age table
            p_m = float(_pick(cohort.male, dx))
            sexes = quota(drng, len(group), {"M": p_m, "F": 1.0 - p_m})
            for m, s, idh in zip(group, sexes, idhs):
                assign[m] = (ci, dx, s, sites[m], idh)
    return [plan_subject(cfg, i, cfg.cohorts[a[0]], a[1], a[2], a[3], a[4]) for i, a in enumerate(assign)]
