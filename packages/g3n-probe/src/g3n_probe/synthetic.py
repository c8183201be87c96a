"""A synthetic cohort of per-volume features with realistic label coverage.

Used by the benchmark (35,000 x 1152, docs/method.md scale), the tests (small) and ``g3n-probe
synth`` (a demo feature table). Cohorts mirror the paper's mix: which labels each cohort
records follows the public datasets (ADNI has APOE and CDR, PPMI has UPDRS-III, the glioma
cohorts have IDH1/MGMT/grade, ...), so most tasks see a small labelled fraction, as in reality.
Each label adds a fixed random direction to the features with a configurable strength, plus a
per-subject random effect shared by all of that subject's volumes (why CV must group subjects).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class SynthConfig(BaseModel):
    """Sizes and signal strengths of the synthetic cohort (presets: ``paper``, ``small``)."""

    model_config = ConfigDict(extra="forbid")
    volumes: int = Field(default=35_000, ge=10)
    dim: int = Field(default=1152, ge=2)
    seed: int = 0
    signal: float = Field(default=1.5, ge=0, description="length of a label's feature shift, in noise SDs")
    subject_effect: float = Field(default=0.5, ge=0, description="SD of the per-subject random offset")
    modality_signal: float = Field(default=4.0, ge=0)
    site_signal: float = Field(default=1.0, ge=0)


SYNTH_PRESETS = {"paper": {}, "small": {"volumes": 1200, "dim": 32}}


@dataclass(frozen=True)
class _Cohort:
    name: str
    share: float
    sites: int
    diagnoses: dict[str, float]
    modalities: tuple[tuple[str, ...], ...]  # possible modality sets per session, drawn uniformly
    age: tuple[float, float]
    visits: int  # max sessions per subject
    cover: dict[str, float]  # fraction of subjects with each optional label


_DEMO = {"handedness": 0.6, "ethnicity": 0.5, "race": 0.5, "education": 0.3, "field_strength": 0.9, "vendor": 0.9}
_COHORTS: tuple[_Cohort, ...] = (
    _Cohort("ADNI", 0.24, 40, {"HC": 0.35, "MCI": 0.4, "AD": 0.25}, (("T1",), ("T1", "FLAIR")), (55, 95), 4,
            {**_DEMO, "handedness": 0.95, "ethnicity": 0.95, "race": 0.95, "education": 0.95, "apoe": 0.9,
             "cdr": 0.9, "mmse": 0.9, "moca": 0.5, "gds": 0.8}),
    _Cohort("PPMI", 0.08, 25, {"HC": 0.3, "PD": 0.7}, (("T1",), ("T1", "T2", "FLAIR")), (40, 85), 3,
            {**_DEMO, "handedness": 0.9, "ethnicity": 0.9, "race": 0.9, "education": 0.9, "moca": 0.85,
             "updrs3": 0.8, "scopa_aut": 0.7, "gds": 0.7, "apoe": 0.3}),
    _Cohort("UPENN-GBM", 0.025, 1, {"GBM": 1.0}, (("T1", "T1c", "T2", "FLAIR"),), (30, 85), 1,
            {"idh1": 0.8, "mgmt": 0.5, "grade": 1.0, "field_strength": 0.9, "vendor": 0.9}),
    _Cohort("UCSF-PDGM", 0.02, 1, {"GBM": 0.7, "glioma": 0.3}, (("T1", "T1c", "T2", "FLAIR"),), (20, 85), 1,
            {"idh1": 1.0, "mgmt": 0.8, "grade": 1.0, "field_strength": 1.0, "vendor": 1.0}),
    _Cohort("HCP-YA", 0.05, 1, {"HC": 1.0}, (("T1", "T2"),), (22, 37), 1,
            {**_DEMO, "handedness": 1.0, "ethnicity": 1.0, "race": 1.0, "education": 1.0}),
    _Cohort("HBN", 0.08, 4, {"paediatric-mixed": 0.6, "ADHD": 0.25, "ASD": 0.15}, (("T1",), ("T1", "T2")), (5, 21), 1,
            {**_DEMO, "handedness": 0.8, "ethnicity": 0.8, "race": 0.8}),
    _Cohort("ABIDE", 0.06, 30, {"HC": 0.5, "ASD": 0.5}, (("T1",),), (6, 60), 1, {**_DEMO, "handedness": 0.8}),
    _Cohort("ADHD-200", 0.03, 8, {"HC": 0.5, "ADHD": 0.5}, (("T1",),), (7, 21), 1, {**_DEMO, "handedness": 0.9}),
    _Cohort("SCHIZO", 0.015, 4, {"HC": 0.5, "SCZ": 0.5}, (("T1",),), (18, 65), 1, {**_DEMO}),
    _Cohort("OASIS", 0.10, 3, {"HC": 0.6, "AD": 0.4}, (("T1",), ("T1", "T2", "FLAIR")), (42, 97), 3,
            {**_DEMO, "handedness": 1.0, "cdr": 0.95, "mmse": 0.9, "education": 0.9, "race": 0.6, "ethnicity": 0.6}),
    _Cohort("NKI-RS", 0.08, 1, {"HC": 1.0}, (("T1",), ("T1", "T2")), (6, 85), 2, {**_DEMO, "handedness": 0.9}),
    _Cohort("IXI", 0.02, 3, {"HC": 1.0}, (("T1", "T2"),), (20, 86), 1, {**_DEMO, "ethnicity": 0.9}),
    _Cohort("BGSP", 0.05, 3, {"HC": 1.0}, (("T1",),), (18, 35), 1, {**_DEMO, "handedness": 1.0, "race": 0.9}),
    _Cohort("FCON1000", 0.06, 35, {"HC": 1.0}, (("T1",),), (8, 80), 1, {**_DEMO, "handedness": 0.4}),
    _Cohort("CoRR", 0.0575, 30, {"HC": 1.0}, (("T1",),), (6, 85), 2, {**_DEMO}),
)

_VENDORS = ("Siemens", "GE", "Philips")
_ETHN = ("Hispanic or Latino", "Not Hispanic or Latino")
_RACE = ("White", "Black", "Asian", "More than one")
_APOE = ("e3/e3", "e3/e4", "e4/e4", "e2/e3", "e2/e4")
_APOE_P = (0.55, 0.3, 0.07, 0.06, 0.02)


def _metadata(cfg: SynthConfig, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Metadata records (g3n-shards field names) until ``cfg.volumes`` volumes exist."""
    records: list[dict[str, Any]] = []
    total_share = sum(c.share for c in _COHORTS)
    for c in _COHORTS:
        budget = max(1, int(round(cfg.volumes * c.share / total_share)))
        made, s = 0, 0
        dx_names, dx_p = list(c.diagnoses), np.asarray(list(c.diagnoses.values()))
        while made < budget:
            s += 1
            subj = f"s{s:05d}"
            site = f"{c.name}-{int(rng.integers(c.sites)):02d}"
            dx = str(rng.choice(dx_names, p=dx_p / dx_p.sum()))
            base_age = float(rng.uniform(*c.age))
            sex = "F" if rng.random() < 0.5 else "M"
            has = {k: rng.random() < p for k, p in c.cover.items()}
            subj_fields: dict[str, Any] = {
                "handedness": (str(rng.choice(["R", "L", "A"], p=[0.86, 0.11, 0.03])) if has.get("handedness") else None),
                "ethnicity": str(rng.choice(_ETHN, p=[0.15, 0.85])) if has.get("ethnicity") else None,
                "race": str(rng.choice(_RACE, p=[0.7, 0.15, 0.1, 0.05])) if has.get("race") else None,
                "education": float(rng.integers(8, 22)) if has.get("education") and base_age >= 22 else None,
                "apoe_genotype": str(rng.choice(_APOE, p=_APOE_P)) if has.get("apoe") else None,
            }
            fs = float(rng.choice([1.5, 3.0])) if has.get("field_strength") else None
            vendor = str(rng.choice(_VENDORS)) if has.get("vendor") else None
            tumour: dict[str, Any] = {}
            if dx in ("GBM", "glioma"):
                tumour["tumour_grade"] = 4 if dx == "GBM" else int(rng.choice([2, 3]))
                if has.get("idh1"):
                    tumour["idh1"] = "mutant" if rng.random() < (0.1 if dx == "GBM" else 0.7) else "wildtype"
                if has.get("mgmt"):
                    tumour["mgmt"] = "methylated" if rng.random() < 0.5 else "unmethylated"
            n_visits = int(rng.integers(1, c.visits + 1))
            for v in range(n_visits):
                if made >= budget:
                    break
                age = min(base_age + 1.5 * v, 119.0)
                mods = c.modalities[int(rng.integers(len(c.modalities)))]
                sev = {"HC": 0.0, "MCI": 0.5, "AD": 1.0}.get(dx)
                clin = {
                    "cdr": (float(rng.choice([0.0, 0.5, 1.0, 2.0, 3.0], p=_cdr_p(sev))) if sev is not None and has.get("cdr") else None),
                    "mmse": (float(np.clip(round(29 - 8 * (sev or 0) + rng.normal(0, 1.5)), 0, 30)) if has.get("mmse") else None),
                    "moca": (float(np.clip(round(27 - 8 * (sev or 0) - 3 * (dx == "PD") + rng.normal(0, 2)), 0, 30)) if has.get("moca") else None),
                    "gds": float(np.clip(round(rng.gamma(2, 1.2) + (dx in ("AD", "PD")) * 2), 0, 15)) if has.get("gds") else None,
                    "updrs3": (float(np.clip(round((25 if dx == "PD" else 3) + rng.normal(0, 8)), 0, 132)) if has.get("updrs3") else None),
                    "scopa_aut": (float(np.clip(round((12 if dx == "PD" else 6) + rng.normal(0, 5)), 0, 69)) if has.get("scopa_aut") else None),
                }
                for m in mods:
                    if made >= budget:
                        break
                    rec = {"subject": subj, "session": f"ses-{v + 1}", "cohort": c.name, "site": site, "modality": m,
                           "age": round(age, 2), "sex": sex, "diagnosis": dx, "field_strength": fs, "vendor": vendor,
                           **subj_fields, **tumour, **clin}
                    rec["key"] = f"{c.name.lower()}-{subj}-ses-{v + 1}-{m.lower()}"
                    records.append(rec)
                    made += 1
    return records


def _cdr_p(sev: float | None) -> list[float]:
    if sev is None or sev == 0.0:
        return [0.9, 0.1, 0.0, 0.0, 0.0]
    if sev == 0.5:
        return [0.1, 0.8, 0.1, 0.0, 0.0]
    return [0.0, 0.3, 0.45, 0.2, 0.05]


def _encode(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Numeric label effects per volume (0 where the label is unknown: no signal, not a sentinel)."""
    n = len(records)

    def cat(field: str) -> np.ndarray:
        vals = sorted({str(r[field]) for r in records if r.get(field) is not None})
        idx = {v: i for i, v in enumerate(vals)}
        return np.asarray([idx[str(r[field])] if r.get(field) is not None else -1 for r in records])

    def num(field: str, centre: float, scale: float) -> np.ndarray:
        return np.asarray([(float(r[field]) - centre) / scale if r.get(field) is not None else 0.0 for r in records])

    return {
        "modality": cat("modality"), "site": cat("site"), "diagnosis": cat("diagnosis"), "sex": cat("sex"),
        "idh1": cat("idh1"), "mgmt": cat("mgmt"), "tumour_grade": cat("tumour_grade"), "vendor": cat("vendor"),
        "field_strength": cat("field_strength"), "handedness": cat("handedness"), "apoe_genotype": cat("apoe_genotype"),
        "ethnicity": cat("ethnicity"), "race": cat("race"),
        "age": num("age", 50, 20), "mmse": num("mmse", 27, 3), "cdr": num("cdr", 0.5, 0.5), "moca": num("moca", 25, 3),
        "education": num("education", 15, 3), "gds": num("gds", 3, 2), "updrs3": num("updrs3", 15, 10),
        "scopa_aut": num("scopa_aut", 9, 5), "n": np.asarray(n),
    }


def _unit(a: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, so a shift's size does not depend on the feature dimension."""
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def synth_features(cfg: SynthConfig | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(features float32 (N, D), metadata records with 'key'), deterministic for ``cfg.seed``."""
    cfg = cfg or SynthConfig()
    rng = np.random.default_rng(cfg.seed)
    records = _metadata(cfg, rng)
    n, d = len(records), cfg.dim
    X = rng.standard_normal((n, d), dtype=np.float32)
    enc = _encode(records)
    # per-subject random effect
    subj = np.unique(np.asarray([f"{r['cohort']}/{r['subject']}" for r in records]), return_inverse=True)[1]
    X += cfg.subject_effect * rng.standard_normal((subj.max() + 1, d), dtype=np.float32)[subj]
    strengths = {"modality": cfg.modality_signal, "site": cfg.site_signal}
    for field, codes in enc.items():
        if field == "n":
            continue
        s = strengths.get(field, cfg.signal)
        if codes.dtype.kind in "iu":
            k = int(codes.max()) + 1
            if k <= 0:
                continue
            dirs = _unit(rng.standard_normal((k, d), dtype=np.float32))
            known = codes >= 0
            X[known] += s * dirs[codes[known]]
        else:
            direction = _unit(rng.standard_normal((1, d), dtype=np.float32))[0]
            X += (s * codes.astype(np.float32))[:, None] * direction[None, :]
    return X, records
