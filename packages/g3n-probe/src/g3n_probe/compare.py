"""Run one panel on several feature sets with identical samples, labels and splits.

Only samples present in every set are used, and the first set's metadata is used for all, so
labels and fold assignments cannot differ between encoders: any difference in the table is
the features'.
"""

from __future__ import annotations

import logging

from .config import Panel, ProtocolConfig
from .features import FeatureSet
from .panel import PanelResult, run_panel

log = logging.getLogger("g3n_probe")


def align(feature_sets: list[FeatureSet]) -> list[FeatureSet]:
    """Restrict every set to the keys common to all (each keeps its own features)."""
    if len(feature_sets) < 1:
        raise ValueError("compare needs at least one feature set")
    names = [f.name for f in feature_sets]
    if len(set(names)) != len(names):
        raise ValueError(f"feature set names must differ (got {names}); name them with NAME=PATH")
    common = set(feature_sets[0].keys)
    for f in feature_sets[1:]:
        common &= set(f.keys)
    if not common:
        raise ValueError("the feature sets share no sample keys")
    out = []
    for f in feature_sets:
        if len(f) != len(common):
            log.warning("%s: %d of %d samples are not in every feature set and are left out", f.name, len(f) - len(common), len(f))
        out.append(f.subset(sorted(common)) if len(f) != len(common) else f)
    return out


def run_compare(feature_sets: list[FeatureSet], panel: Panel, cfg: ProtocolConfig, progress: bool = True) -> list[PanelResult]:
    """The panel on each aligned feature set, with the first set's metadata as the label source."""
    sets = align(feature_sets)
    ref = sets[0].records
    return [run_panel(fs, panel, cfg, progress=progress, records=ref) for fs in sets]
