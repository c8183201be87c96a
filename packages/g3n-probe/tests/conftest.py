"""Shared fixtures: small cohorts with a known signal, built on plain arrays (no shards, no torch)."""

from __future__ import annotations

import numpy as np
import pytest


def make_cohort(
    n_subjects: int = 120,
    visits: int = 2,
    dim: int = 12,
    signal: float = 3.0,
    seed: int = 0,
    modalities: tuple[str, ...] = ("T1", "T2"),
) -> tuple[np.ndarray, list[dict]]:
    """Subjects with ``visits`` sessions x ``modalities`` volumes. ``sex`` and ``age`` shift
    feature 0 and 1 by ``signal`` noise SDs (0 = pure noise); ``idh1`` is given to few subjects."""
    rng = np.random.default_rng(seed)
    rows, recs = [], []
    for s in range(n_subjects):
        sex = "F" if s % 2 else "M"
        age = float(rng.uniform(20, 80))
        subj_offset = rng.normal(0, 0.3, dim)
        for v in range(visits):
            for m in modalities:
                x = rng.normal(0, 1, dim) + subj_offset
                x[0] += signal * (sex == "F")
                x[1] += signal * (age - 50) / 15
                x[2] += 2.0 * (m == "T2")
                rows.append(x)
                recs.append({
                    "key": f"c-s{s:04d}-ses-{v}-{m.lower()}", "subject": f"s{s:04d}", "session": f"ses-{v}",
                    "cohort": "C", "site": f"site{s % 3}", "modality": m, "sex": sex, "age": round(age + v, 2),
                    "diagnosis": "HC" if s % 4 else "AD",
                    "idh1": ("mutant" if s % 2 else "wildtype") if s < 6 else None,
                })
    return np.asarray(rows, dtype=np.float64), recs


@pytest.fixture
def cohort():
    return make_cohort()


@pytest.fixture(scope="session")
def make():
    """The cohort factory (tests cannot import conftest under --import-mode=importlib)."""
    return make_cohort
