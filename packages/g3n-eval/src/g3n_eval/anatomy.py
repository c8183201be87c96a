"""Anatomy of generated samples: do they carry the *known* effect of what was requested?

Probes (``controllability``) read whatever separates the real classes, and on a small cohort that
can be the site a disease was scanned at rather than the disease. Where the anatomy of an effect is
known -- AD enlarges the ventricles, PD darkens the putamen on T1, a synthetic cohort's generative
model says exactly what it did -- it can be measured directly, with no probe:

* a **spec** (YAML/JSON, :class:`AnatomySpec`) names region masks (an ``.npz`` of arrays on the
  volumes' grid, loaded without pickle), the **signatures** measured on each volume, and the
  **effects**: a request (field, from one class or value to another, in one modality) and the
  direction its signature must move;
* every volume is z-scored over the spec's brain region; a signature is the mean z in a region
  (``mean``), minus the mean in a reference region (``contrast``), or the left-right asymmetry
  ``|z - mirror(z)|`` in a region minus in a reference (``asymmetry``: a one-sided lesion whose
  side is random);
* **real**: the effect in real data (difference of class means, or for numeric values the
  least-squares slope times the requested change), with Cohen's d; it checks the signature and
  the spec before the generator is judged by them;
* **paired**: generated samples that share their noise and other conditions (``g3n-dit sample
  --paired``, the same pairing as controllability) and differ only in the requested value; a
  group moved when its signature changed in the expected direction; one-sided sign test, and the
  mean change as a fraction of the real effect;
* **maps**: per effect, the real and the generated change voxel by voxel (:class:`EffectMaps`),
  drawn side by side on one colour scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .anatomy_maps import EffectMaps, _stratum, effect_figures
from .controllability import _direction, _groups, pairing_key
from .data import InputError, iter_set, label_of

MASK_THRESHOLD = 0.5


class Signature(BaseModel):
    """One number per volume, from the z-scored volume and the regions."""

    model_config = ConfigDict(extra="forbid")
    name: str
    kind: Literal["mean", "contrast", "asymmetry"]
    region: str
    reference: str | None = Field(default=None, description="contrast and asymmetry: subtracted region")
    why: str = ""

    @model_validator(mode="after")
    def _reference(self) -> Signature:
        if (self.kind != "mean") != (self.reference is not None):
            need = "needs" if self.kind != "mean" else "takes no"
            raise ValueError(f"signature {self.name}: kind {self.kind} {need} a reference")
        return self


class Effect(BaseModel):
    """A request and the direction it must move a signature. ``low``/``high`` are classes
    (diagnosis HC -> AD) or numbers (age 30 -> 70)."""

    model_config = ConfigDict(extra="forbid")
    field: str
    low: str | float = Field(alias="from")
    high: str | float = Field(alias="to")
    modality: str | None = Field(default=None, description="real and generated samples of this modality only")
    signature: str
    expect: Literal["increase", "decrease"]
    why: str = ""

    @property
    def name(self) -> str:
        where = f" [{self.modality}]" if self.modality else ""
        return f"{self.field}:{label_of(self.low)}->{label_of(self.high)}{where}"

    @property
    def numeric(self) -> bool:
        return not isinstance(self.low, str) and not isinstance(self.high, str)

    @property
    def ends(self) -> tuple[Any, Any]:
        """``from`` and ``to`` as records' values are compared with them: labels, or floats for numbers."""
        return _value(self.low, self.numeric), _value(self.high, self.numeric)

    def value_in(self, record: Mapping[str, Any]) -> Any:
        """The record's value of the field (a label, or a float for numbers); None when the record is
        of another modality or has no value."""
        if self.modality is not None and label_of(record.get("modality")) != self.modality:
            return None
        return _value(record.get(self.field), self.numeric)


class AnatomySpec(BaseModel):
    """The YAML/JSON file: regions, signatures, effects (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    regions: str = Field(description="npz of region weights in [0, 1] on the volumes' grid, relative to the spec")
    brain: str = Field(description="region every volume is z-scored over")
    midline: float | None = Field(default=None,
                                  description="asymmetry: voxel index of the mid-sagittal plane on axis 0")
    signatures: list[Signature]
    effects: list[Effect]
    source: str = Field(default="", description="where the effects come from (shown in the report)")
    within: str | None = Field(default=None, description=(
        "metadata field (e.g. cohort) within whose strata real effects are estimated, so that differences "
        "between cohorts (scanners, contrast) are not taken for the effect; None pools every real sample"))

    @model_validator(mode="after")
    def _names(self) -> AnatomySpec:
        sigs = {s.name for s in self.signatures}
        for e in self.effects:
            if e.signature not in sigs:
                raise ValueError(f"effect {e.name}: unknown signature {e.signature!r} (have {sorted(sigs)})")
        if any(s.kind == "asymmetry" for s in self.signatures) and self.midline is None:
            raise ValueError("an asymmetry signature needs the spec's midline")
        return self


class Anatomy:
    """A loaded spec: masks as boolean arrays, and :meth:`signatures` of one volume."""

    def __init__(self, spec: AnatomySpec, masks: Mapping[str, np.ndarray], path: str = "spec"):
        self.spec, self.path = spec, path
        need = {spec.brain, *(r for s in spec.signatures for r in (s.region, s.reference) if r)}
        missing = sorted(need - set(masks))
        if missing:
            raise InputError(f"{path}: regions {missing} not in the regions file (has {sorted(masks)})")
        self.masks = {k: np.asarray(masks[k]) > MASK_THRESHOLD for k in need}
        shapes = {m.shape for m in self.masks.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise InputError(f"{path}: regions must be 3-D arrays of one shape, got {sorted(shapes)}")
        self.shape: tuple[int, ...] = next(iter(shapes))
        for k, m in self.masks.items():
            if not m.any():
                raise InputError(f"{path}: region {k!r} is empty")

    @classmethod
    def load(cls, path: str | Path) -> Anatomy:
        import yaml

        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
            spec = AnatomySpec.model_validate(raw)
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{p}: cannot read the anatomy spec: {e}") from None
        except (yaml.YAMLError, ValidationError) as e:
            raise InputError(f"{p}: not a valid anatomy spec: {e}") from None
        rp = p.parent / spec.regions
        try:
            with np.load(rp, allow_pickle=False) as z:
                masks = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise InputError(f"{rp}: cannot read the regions file: {e}") from None
        return cls(spec, masks, str(p))

    def _mirror(self, v: np.ndarray) -> np.ndarray:
        """v mirrored about the mid-sagittal plane (voxels mirrored off the grid are 0)."""
        k = int(round(2 * float(self.spec.midline)))  # x -> k - x
        out = np.zeros_like(v)
        n = v.shape[0]
        src = k - np.arange(n)
        ok = (src >= 0) & (src < n)
        out[ok] = v[src[ok]]
        return out

    def zscore(self, volume: np.ndarray, name: str = "volume") -> np.ndarray:
        """The volume z-scored over the spec's brain region (float64)."""
        v = np.asarray(volume, dtype=np.float64)
        if v.shape != self.shape:
            raise InputError(f"{name}: shape {v.shape}, the regions are {self.shape}")
        if not np.isfinite(v).all():
            raise InputError(f"{name}: volume contains NaN or Inf")
        b = v[self.masks[self.spec.brain]]
        sd = float(b.std())
        if sd == 0:
            raise InputError(f"{name}: constant inside the brain region")
        return (v - b.mean()) / sd

    def signatures(self, volume: np.ndarray, name: str = "volume", z: np.ndarray | None = None) -> dict[str, float]:
        z = self.zscore(volume, name) if z is None else z
        asym = np.abs(z - self._mirror(z)) if any(s.kind == "asymmetry" for s in self.spec.signatures) else None
        out = {}
        for s in self.spec.signatures:
            src = asym if s.kind == "asymmetry" else z
            val = float(src[self.masks[s.region]].mean())
            if s.reference is not None:
                val -= float(src[self.masks[s.reference]].mean())
            out[s.name] = val
        return out


def _value(v: Any, numeric: bool) -> Any:
    if numeric:
        try:
            return None if v is None or isinstance(v, bool) else float(v)
        except (TypeError, ValueError):
            return None
    return label_of(v)


def real_effect(effect: Effect, records: Sequence[Mapping[str, Any]], sig: Sequence[float],
                within: str | None = None) -> dict[str, Any]:
    """The effect in real data, and Cohen's d against the within-class (or residual) SD.

    Classes: the difference of class means; numbers: the least-squares slope times the requested
    change. With ``within`` (a field such as cohort) both are estimated inside each stratum and
    combined (class differences weighted by 1/(1/n_from + 1/n_to), slopes pooled over the strata's
    centred values), so a difference between cohorts -- scanners, contrast -- is not counted as the
    effect; strata that lack a class do not count."""
    s = np.asarray(sig, dtype=np.float64)
    strata: dict[str, list[tuple[int, Any]]] = {}  # stratum -> (record index, value)
    for i, r in enumerate(records):
        v = effect.value_in(r)
        if v is not None:
            strata.setdefault(_stratum(r, within), []).append((i, v))
    if effect.numeric:
        sxx = sxy = 0.0
        used, centred = [], []
        for name, xs in strata.items():
            if len(xs) < 2:
                continue
            x = np.array([x for _, x in xs])
            y = s[[i for i, _ in xs]]
            xc, yc = x - x.mean(), y - y.mean()
            sxx, sxy = sxx + float((xc * xc).sum()), sxy + float((xc * yc).sum())
            used.append(name)
            centred.append((xc, yc))
        n = sum(len(xc) for xc, _ in centred)
        slope = sxy / sxx if sxx > 0 else math.nan
        dof = n - len(used) - 1
        resid_sd = math.nan
        if math.isfinite(slope) and dof > 0:
            resid_sd = math.sqrt(sum(float(((yc - slope * xc) ** 2).sum()) for xc, yc in centred) / dof)
        diff = slope * (float(effect.high) - float(effect.low))
        return {"n": n, "slope": slope, "difference": diff, "strata": used,
                "d": diff / resid_sd if resid_sd > 0 else math.nan}
    lo_c, hi_c = effect.ends
    num = den = ss = 0.0
    n_from = n_to = dof = 0
    used = []
    for name, ivs in strata.items():
        lo = s[[i for i, v in ivs if v == lo_c]]
        hi = s[[i for i, v in ivs if v == hi_c]]
        if not lo.size or not hi.size:
            continue
        w = 1.0 / (1.0 / lo.size + 1.0 / hi.size)
        num, den = num + w * float(hi.mean() - lo.mean()), den + w
        ss += float(((lo - lo.mean()) ** 2).sum() + ((hi - hi.mean()) ** 2).sum())
        n_from, n_to, dof = n_from + lo.size, n_to + hi.size, dof + lo.size + hi.size - 2
        used.append(name)
    diff = num / den if den else math.nan
    sd = math.sqrt(ss / dof) if dof > 0 else math.nan
    return {"n_from": n_from, "n_to": n_to, "difference": diff, "strata": used,
            "d": diff / sd if sd > 0 else math.nan}


def paired_effect(effect: Effect, records: Sequence[Mapping[str, Any]], sig: Sequence[float]) -> dict[str, Any]:
    """Within each group of generated samples that share noise and other conditions, the signature
    at ``to`` minus at ``from``; a group moved when that change has the expected sign."""
    s = np.asarray(sig, dtype=np.float64)
    lo, hi = effect.ends
    sel = [(i, v) for i, v in ((i, effect.value_in(r)) for i, r in enumerate(records)) if v in (lo, hi)]
    keys = [pairing_key(records[i], effect.field) for i, _ in sel]
    changes = []
    for group in _groups(keys).values():
        vals = {w: [s[sel[j][0]] for j in group if sel[j][1] == w] for w in (lo, hi)}
        if vals[lo] and vals[hi]:
            changes.append(float(np.mean(vals[hi]) - np.mean(vals[lo])))
    sign = 1.0 if effect.expect == "increase" else -1.0
    out = _direction([sign * c for c in changes], "toward")
    out.pop("toward")
    out["mean_change"] = float(np.mean(changes)) if changes else math.nan
    return out


Measured = tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, float]]]


def evaluate(anatomy: Anatomy, real: Measured, generated: Measured, recon: Measured | None = None) -> dict[str, Any]:
    """Per effect: the real effect, the paired generated change, and whether each goes the expected way.

    With ``recon`` (the tokenizer's reconstructions of real volumes) also the effect as the
    reconstructions carry it and ``recon_keeps``, its fraction of the real effect: decoded samples
    can only show what the decoder can draw, so a row whose reconstructions keep little of the
    effect says nothing about the generator."""
    rows: dict[str, Any] = {}
    for e in anatomy.spec.effects:
        sign = 1.0 if e.expect == "increase" else -1.0
        real_sig = [x[e.signature] for x in real[1]]
        r = real_effect(e, real[0], real_sig, anatomy.spec.within)
        if anatomy.spec.within is not None:  # beside it, what the strata's differences add
            r["pooled_difference"] = real_effect(e, real[0], real_sig)["difference"]
        g = paired_effect(e, generated[0], [x[e.signature] for x in generated[1]])
        diff = r["difference"]
        rows[e.name] = {
            "field": e.field, "from": e.low, "to": e.high, "modality": e.modality, "signature": e.signature,
            "expect": e.expect, "why": e.why, "real": r,
            "real_confirms": bool(math.isfinite(diff) and sign * diff > 0),
            "paired": g,
            "of_real": g["mean_change"] / diff if math.isfinite(diff) and diff != 0 and g["n_groups"] else math.nan,
        }
        if recon is not None:
            rc = real_effect(e, recon[0], [x[e.signature] for x in recon[1]], anatomy.spec.within)
            # against the real effect on the very volumes that were reconstructed (all of them, or
            # e.g. one visit per subject): like with like, the ratio is the decoder's alone
            same = _same_volumes(real, recon)
            base = real_effect(e, same[0], [x[e.signature] for x in same[1]], anatomy.spec.within)["difference"]
            rows[e.name]["recon"] = {**rc, "real_difference": base, **recon_agreement(e, same, recon, anatomy.spec.within)}
            rows[e.name]["recon_keeps"] = rc["difference"] / base if math.isfinite(base) and base != 0 else math.nan
    return {"effects": rows}


def recon_agreement(effect: Effect, real: Measured, recon: Measured, within: str | None = None,
                    reps: int = 1000, seed: int = 2025) -> dict[str, Any]:
    """How well the share ``recon_keeps`` is measured, and what the reconstructions keep per volume.

    * ``keeps_interval``: a 95 % bootstrap interval of the share (volumes resampled within each
      stratum and class, real and reconstruction together). A small effect on few volumes has a
      real difference near its own noise, and then the ratio can take any value.
    * ``slope`` and ``r``: the reconstructions' signature regressed on the real one over the same
      volumes (the effect's classes, or every volume with a value, centred in each stratum). The
      slope is the fraction of a volume's departure that its reconstruction keeps, whatever its
      label; if the tokenizer draws the effect like any other variation of the signature, the
      share of the effect is this slope, measured on every volume instead of two group means. It
      tends to understate a structured effect: a volume's idiosyncratic texture is redrawn less
      faithfully than its anatomy (the demo's age effect: slope 0.82, share 1.11 with a narrow
      interval).
    """
    key_at = {r.get("key"): i for i, r in enumerate(real[0])}
    pairs = [(rec, key_at[rec.get("key")], j) for j, rec in enumerate(recon[0]) if rec.get("key") in key_at]
    x = np.array([real[1][i][effect.signature] for _, i, _ in pairs], dtype=np.float64)
    y = np.array([recon[1][j][effect.signature] for _, _, j in pairs], dtype=np.float64)
    recs = [rec for rec, _, _ in pairs]
    cells: dict[tuple[str, Any], list[int]] = {}
    for k, rec in enumerate(recs):
        v = effect.value_in(rec)
        if v is not None and (effect.numeric or v in effect.ends):
            cells.setdefault((_stratum(rec, within), None if effect.numeric else v), []).append(k)
    if not effect.numeric:  # as real_effect: only strata that hold both classes carry the effect
        both = {st for st, _ in cells if all((st, c) in cells for c in effect.ends)}
        cells = {c: idx for c, idx in cells.items() if c[0] in both}
    out: dict[str, Any] = {"slope": math.nan, "r": math.nan, "keeps_interval": [math.nan, math.nan]}
    xc, yc = [], []
    by_stratum: dict[str, list[int]] = {}
    for (stratum, _), idx in cells.items():
        by_stratum.setdefault(stratum, []).extend(idx)
    for idx in by_stratum.values():
        if len(idx) > 1:
            xc.append(x[idx] - x[idx].mean())
            yc.append(y[idx] - y[idx].mean())
    if xc:
        cx, cy = np.concatenate(xc), np.concatenate(yc)
        sxx, syy = float(cx @ cx), float(cy @ cy)
        if sxx > 0:
            out["slope"] = float(cx @ cy) / sxx
            out["r"] = float(cx @ cy) / math.sqrt(sxx * syy) if syy > 0 else math.nan
    if not cells:
        return out
    rng = np.random.default_rng(seed)
    groups = [np.array(idx) for _, idx in sorted(cells.items(), key=lambda kv: str(kv[0]))]
    shares = []
    for _ in range(reps):
        pick = np.concatenate([g[rng.integers(0, g.size, g.size)] for g in groups])
        sub = [recs[k] for k in pick]
        d_real = real_effect(effect, sub, x[pick], within)["difference"]
        d_rec = real_effect(effect, sub, y[pick], within)["difference"]
        if math.isfinite(d_real) and d_real != 0 and math.isfinite(d_rec):
            shares.append(d_rec / d_real)
    if len(shares) >= 0.9 * reps:
        out["keeps_interval"] = [float(v) for v in np.percentile(shares, [2.5, 97.5])]
    return out


def _same_volumes(real: Measured, recon: Measured) -> Measured:
    """The real volumes whose reconstructions were measured (by key; records without keys: all)."""
    keys = {r.get("key") for r in recon[0]}
    if None in keys:
        return real
    pick = [i for i, r in enumerate(real[0]) if r.get("key") in keys]
    return [real[0][i] for i in pick], [real[1][i] for i in pick]


def _measure(anatomy: Anatomy, path: str | Path, limit: int | None, progress: bool, what: str,
             each: Any, rejects: Any) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    """Signatures of every volume of a set, each z-scored volume also handed to ``each``; a volume
    that cannot be measured (shape, NaN, constant) goes to ``rejects`` and the set goes on."""
    from tqdm import tqdm

    recs, sigs = [], []
    n_bad = 0
    for key, meta, arr in tqdm(iter_set(path, "volumes", limit), desc=f"anatomy: {what}", unit="vol", disable=not progress):
        try:
            z = anatomy.zscore(arr, key)
        except InputError as e:
            rejects.add(f"{what}:{key}", str(e))
            n_bad += 1
            continue
        recs.append({**meta, "key": key})
        sigs.append(anatomy.signatures(arr, key, z))
        each(meta, z)
    if not recs:
        why = f" ({n_bad} rejected, see {rejects.path})" if n_bad else ""
        raise InputError(f"{path}: no volume could be measured{why}")
    return recs, sigs


def run_anatomy(spec: str | Path, real: str | Path, generated: str | Path, out: str | Path,
                limit: int | None = None, progress: bool = True, recon: str | Path | None = None) -> dict[str, Any]:
    """Measure the spec's signatures on a real and a generated volumes set (and, given ``recon``, on
    the tokenizer's reconstructions of real volumes); write ``anatomy.json``."""
    from .records import input_ref, write_metrics
    from .rejects import Rejects
    from .sources import request_settings

    anatomy = Anatomy.load(spec)
    maps = EffectMaps(anatomy.spec.effects, anatomy.spec.within)
    rejects = Rejects(out)
    real_m = _measure(anatomy, real, limit, progress, "real", maps.add_real, rejects)
    gen_m = _measure(anatomy, generated, limit, progress, "generated", maps.add_generated, rejects)
    recon_m = _measure(anatomy, recon, limit, progress, "recon", lambda *_: None, rejects) if recon else None
    res = evaluate(anatomy, real_m, gen_m, recon_m)
    res["rejected"] = rejects.count
    res["figures"] = effect_figures(anatomy, maps, Path(out))
    settings = {"spec": anatomy.spec.model_dump(mode="json", by_alias=True), "limit": limit,
                "z_scored_over": anatomy.spec.brain, "mask_threshold": MASK_THRESHOLD,
                "generation": request_settings(gen_m[0])}
    inputs = [input_ref(spec, "anatomy spec"), input_ref(Path(spec).parent / anatomy.spec.regions, "regions"),
              input_ref(real, "real volumes"), input_ref(generated, "generated volumes")]
    if recon:
        inputs.append(input_ref(recon, "reconstructed real volumes"))
    return write_metrics(Path(out) / "anatomy.json", "anatomy", settings, inputs, res)
