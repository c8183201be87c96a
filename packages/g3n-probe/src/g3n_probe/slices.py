"""Slices of a feature set: all volumes, one modality, or patient-pooled sessions.

Patient-pooled means one unit per session (subject + session): its feature is the mean of
that session's volumes over modalities. ``run`` and ``apply`` share this code, so a pooled
probe is applied to exactly the kind of vector it was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import MODALITIES
from .targets import session_id, subject_id


@dataclass
class SliceView:
    """Rows of one slice: features, the member volume indices of each row, and their ids."""

    X: np.ndarray
    members: list[np.ndarray]  # indices into the source rows, one array per unit
    unit_keys: list[str]
    subjects: np.ndarray  # object array of subject ids, one per unit

    @property
    def n_volumes(self) -> int:
        return int(sum(len(m) for m in self.members))


def slice_indices(name: str, records: Sequence[Mapping[str, Any]], candidates: np.ndarray) -> np.ndarray:
    """Candidate row indices that belong to a per-volume slice (``all`` or a modality)."""
    if name == "all" or name == "pooled":
        return candidates
    if name not in MODALITIES:
        raise ValueError(f"unknown slice {name!r}")
    return np.asarray([i for i in candidates if records[i].get("modality") == name], dtype=np.int64)


def build_view(
    name: str, X: np.ndarray, records: Sequence[Mapping[str, Any]], idx: np.ndarray, min_modalities: int = 1
) -> SliceView:
    """The slice's units over the given rows. Per-volume slices keep rows; ``pooled`` averages
    the rows of each session (sessions with fewer than ``min_modalities`` volumes are left out)."""
    idx = np.asarray(idx, dtype=np.int64)
    if name != "pooled":
        idx = slice_indices(name, records, idx)
        return SliceView(
            X=X[idx],
            members=[np.asarray([i]) for i in idx],
            unit_keys=[str(records[i].get("key", i)) for i in idx],
            subjects=np.asarray([subject_id(records[i]) for i in idx], dtype=object),
        )
    groups: dict[str, list[int]] = {}
    for i in idx.tolist():
        groups.setdefault(session_id(records[i]), []).append(i)
    units = sorted(u for u, m in groups.items() if len(m) >= min_modalities)
    members = [np.asarray(sorted(groups[u]), dtype=np.int64) for u in units]
    if members:
        # one reduceat over the rows in unit order instead of a Python loop of means
        flat = np.concatenate(members)
        starts = np.cumsum([0] + [len(m) for m in members[:-1]])
        sizes = np.asarray([len(m) for m in members], dtype=np.float64)
        Xp = (np.add.reduceat(X[flat].astype(np.float64), starts, axis=0) / sizes[:, None]).astype(X.dtype, copy=False)
    else:
        Xp = np.zeros((0, X.shape[1]), dtype=X.dtype)
    return SliceView(
        X=Xp,
        members=members,
        unit_keys=units,
        subjects=np.asarray([subject_id(records[m[0]]) for m in members], dtype=object),
    )
