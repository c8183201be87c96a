"""Voxel maps of the anatomy's effects: where a change lands, real beside generated.

:class:`EffectMaps` accumulates, one z-scored volume at a time, the real effect voxel by voxel and
the paired generated change; :func:`effect_figures` draws them side by side on one colour scale.
The signatures and their statistics are :mod:`g3n_eval.anatomy`'s."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .controllability import pairing_key
from .data import label_of

if TYPE_CHECKING:
    from .anatomy import Anatomy, Effect


def _stratum(record: Mapping[str, Any], within: str | None) -> str:
    return "all" if within is None else str(label_of(record.get(within)))


class EffectMaps:
    """Voxel maps of each effect, accumulated one volume at a time (no set is held in memory):
    real, the difference of class means (numbers: the voxelwise slope times the change), within
    strata as :func:`real_effect`; generated, the mean over paired groups of the group's change.
    Shown beside each other they say *where* a generated change lands, which the signature alone
    cannot."""

    def __init__(self, effects: Sequence[Effect], within: str | None = None):
        self.effects, self.within = list(effects), within
        self.real: list[dict[str, dict[Any, Any]]] = [{} for _ in self.effects]  # per stratum
        self.gen: list[dict[tuple, dict[Any, list]]] = [{} for _ in self.effects]

    @staticmethod
    def _add(acc: dict, key: Any, z: np.ndarray) -> None:
        cur = acc.get(key)  # float32 sums: a paired group holds two volumes per effect until the end
        if cur is None:
            acc[key] = [z.astype(np.float32), 1]
        else:
            cur[0] += z
            cur[1] += 1

    def add_real(self, meta: Mapping[str, Any], z: np.ndarray) -> None:
        for e, strata in zip(self.effects, self.real):
            v = e.value_in(meta)
            if v is None:
                continue
            acc = strata.setdefault(_stratum(meta, self.within), {})
            if e.numeric:  # sums for the voxelwise least-squares slope (x centred by the requested range)
                x = v - 0.5 * (float(e.low) + float(e.high))
                for k, term in (("n", 1.0), ("x", x), ("xx", x * x), ("z", z), ("xz", x * z)):
                    acc[k] = acc.get(k, 0.0) + term
            elif v in e.ends:
                self._add(acc, v, z)

    def add_generated(self, meta: Mapping[str, Any], z: np.ndarray) -> None:
        for e, groups in zip(self.effects, self.gen):
            v = e.value_in(meta)
            if v is not None and v in e.ends:
                key = pairing_key(meta, e.field)
                if key is not None:
                    self._add(groups.setdefault(key, {}), v, z)

    def maps(self, e_index: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(real map, generated map) of one effect, None where there is no data."""
        e, strata, groups = self.effects[e_index], self.real[e_index].values(), self.gen[e_index]
        lo, hi = e.ends
        real = None
        if e.numeric:  # slope pooled over the strata: sum of centred cross products / centred squares
            used = [a for a in strata if a.get("n", 0) >= 2]
            sxx = sum(a["xx"] - a["x"] ** 2 / a["n"] for a in used)
            if sxx > 0:
                sxz = sum(a["xz"] - a["x"] * a["z"] / a["n"] for a in used)
                real = sxz / sxx * (float(e.high) - float(e.low))
        else:
            both = [a for a in strata if lo in a and hi in a]
            w = [1.0 / (1.0 / a[lo][1] + 1.0 / a[hi][1]) for a in both]
            if both:
                real = sum(wi * (a[hi][0] / a[hi][1] - a[lo][0] / a[lo][1]) for wi, a in zip(w, both)) / sum(w)
        changes = [g[hi][0] / g[hi][1] - g[lo][0] / g[lo][1] for g in groups.values() if lo in g and hi in g]
        return real, (sum(changes) / len(changes) if changes else None)


def effect_figures(anatomy: Anatomy, maps: EffectMaps, out: Path) -> dict[str, str]:
    """One PNG per effect with both maps: central planes, red = brighter, blue = darker, one scale."""
    from .figures import diff_montage

    brain = anatomy.masks[anatomy.spec.brain]
    figures = {}
    for i, e in enumerate(maps.effects):
        real, gen = maps.maps(i)
        if real is None or gen is None:
            continue
        name = f"anatomy_{i}_{e.field}_{label_of(e.low)}_to_{label_of(e.high)}"
        diff_montage([real * brain, gen * brain], [f"real {label_of(e.high)}-{label_of(e.low)}", "generated, paired"],
                     out / f"{name}.png")
        figures[name] = f"{name}.png"
    return figures
