"""Longitudinal forecast evaluation (docs/method.md §6).

A brain-age probe (trained on real embeddings) scores the decoded-and-re-encoded forecast and
its baseline; the predicted ageing (forecast - baseline) is regressed on the *requested*
interval: the slope is the fraction of the requested ageing the forecast recovers (paper: about
0.27, positive Pearson r). The voxel difference map (forecast - baseline, in the baseline's
brain z-units, averaged over subjects) shows where the change happens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .data import InputError, label_of
from .stats import line_fit


def ageing_recovery(requested_interval: Sequence[float], predicted_baseline_age: Sequence[float],
                    predicted_forecast_age: Sequence[float], baselines: Sequence[str] | None = None) -> dict[str, Any]:
    """Slope and Pearson r of predicted ageing vs requested interval, plus per-interval means.

    With ``baselines`` (the baseline each forecast starts from), also the paired test: within each
    baseline forecast at two or more intervals, the slope of its predicted ageing on the interval,
    how many baselines aged with the interval (slope > 0) and a one-sided sign test. The pooled slope
    mixes subjects whose brain-age predictions differ by years; within a subject only the interval
    changes."""
    from .controllability import paired_sweep

    dt = np.asarray(requested_interval, dtype=np.float64)
    change = np.asarray(predicted_forecast_age, np.float64) - np.asarray(predicted_baseline_age, np.float64)
    if dt.shape != change.shape:
        raise ValueError(f"{dt.size} intervals but {change.size} predictions")
    levels = {format(float(v), "g"): {"n": int((dt == v).sum()), "mean_predicted_change": float(change[dt == v].mean())}
              for v in np.unique(dt)}
    out = {**line_fit(dt, change), "mean_requested": float(dt.mean()) if dt.size else float("nan"),
           "mean_predicted_change": float(change.mean()) if change.size else float("nan"), "levels": levels}
    if baselines is not None:
        if len(baselines) != dt.size:
            raise ValueError(f"{dt.size} intervals but {len(baselines)} baselines")
        out["paired"] = paired_sweep(dt, change, [(str(b),) for b in baselines])
    return out


def followup_pairs(keys: Sequence[str], metas: Sequence[Mapping[str, Any]], modalities: set[str] | None = None,
                   min_interval: float = 0.1) -> list[tuple[str, str, float]]:
    """(first session key, later session key, years between) for every subject with two or more
    sessions of one modality that have an age: the ageing a forecast test can be checked on. Generated
    samples (those with a generation request) are left out; a synthetic cohort's scans are not."""
    by: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for k, m in zip(keys, metas):
        mod, age, subj = m.get("modality"), m.get("age"), m.get("subject")
        if age is None or subj is None or m.get("request") or (modalities is not None and mod not in modalities):
            continue
        by.setdefault((str(subj), str(mod)), []).append((float(age), str(k)))
    pairs = []
    for _, sessions in sorted(by.items()):
        sessions.sort()
        (a0, k0), later = sessions[0], sessions[1:]
        pairs += [(k0, k, a - a0) for a, k in later if a - a0 >= min_interval]
    return pairs


def followup_ageing(interval: Sequence[float], predicted_first: Sequence[float],
                    predicted_later: Sequence[float]) -> dict[str, Any]:
    """What the brain-age probe sees of *real* ageing: on real follow-up pairs (decoded like the
    forecasts), how many are predicted older at the later session (one-sided sign test) and the
    fraction of the true interval the mean predicted change recovers. A probe that does not see
    real sessions age (p > :data:`~g3n_eval.controllability.BLIND_P`) cannot show whether forecasts do:
    the forecast row is then blind."""
    from .controllability import BLIND_P
    from .stats import sign_test

    dt = np.asarray(interval, dtype=np.float64)
    change = np.asarray(predicted_later, np.float64) - np.asarray(predicted_first, np.float64)
    up, down = int((change > 0).sum()), int((change < 0).sum())
    p = sign_test(up, down)
    return {"n": int(dt.size), "mean_interval": float(dt.mean()) if dt.size else math.nan,
            "mean_predicted_change": float(change.mean()) if dt.size else math.nan,
            "recovered": float(change.mean() / dt.mean()) if dt.size and dt.mean() > 0 else math.nan,
            "n_older": up, "n_younger": down, "p": p, "blind": bool(not p <= BLIND_P)}


def anatomy_ageing(anatomy: Any, forecast_vols: Sequence[np.ndarray], baseline_vols: Sequence[np.ndarray],
                   pairs: Sequence[tuple[int, int, float]], baseline_keys: Sequence[str],
                   baseline_metas: Sequence[Mapping[str, Any]],
                   followups: Sequence[tuple[int, int, float]] = ()) -> dict[str, Any]:
    """Forecast ageing measured on the known anatomy, with no probe.

    For each numeric ``age`` effect of the anatomy spec (e.g. the ventricles widen with age), the
    effect's signature is measured on each decoded forecast and on its decoded baseline. The change
    (forecast - baseline) is signed so that the expected direction is positive and treated as
    :func:`ageing_recovery` treats predicted ages: regressed on the requested interval, and paired
    within each baseline (a baseline moved when its change grows with the interval). ``pairs`` are
    (forecast index, baseline index, interval); ``followups`` (first index, later index, years) are
    real follow-up sessions in ``baseline_vols``: the same signature's real change per year, decoded
    like the forecasts, is the rate the forecasts are compared with."""
    from .controllability import _direction

    def of_modality(e: Any, meta: Mapping[str, Any]) -> bool:
        return e.modality is None or label_of(meta.get("modality")) == e.modality

    effects = [e for e in anatomy.spec.effects if e.field == "age" and e.numeric]
    if not effects:
        raise InputError(f"{anatomy.path}: has no numeric age effect to measure forecasts' ageing with")
    need_b = sorted({b for _, b, _ in pairs} | {k for a, b, _ in followups for k in (a, b)})
    base_sig = {b: anatomy.signatures(baseline_vols[b], baseline_keys[b]) for b in need_b}
    fc_sig = {i: anatomy.signatures(forecast_vols[i], f"forecast {i}") for i, _, _ in pairs}
    out = {}
    for e in effects:
        sign = 1.0 if e.expect == "increase" else -1.0
        of = [(i, b, dt) for i, b, dt in pairs if of_modality(e, baseline_metas[b])]
        if len(of) < 2:
            continue
        fi, bi, dts = zip(*of)
        rec = ageing_recovery(dts, [sign * base_sig[b][e.signature] for b in bi],
                              [sign * fc_sig[i][e.signature] for i in fi], [baseline_keys[b] for b in bi])
        rec = {"signature": e.signature, "expect": e.expect, "why": e.why, "modality": e.modality, **rec}
        fu = [(a, b, dt) for a, b, dt in followups if of_modality(e, baseline_metas[a])]
        if fu:
            rate = [sign * (base_sig[b][e.signature] - base_sig[a][e.signature]) / dt for a, b, dt in fu]
            real = _direction(rate, "mean_change_per_year")
            rec["real_followups"] = {**real, "n": len(fu), "mean_interval": float(np.mean([dt for *_, dt in fu]))}
            per_year = real["mean_change_per_year"]
            rec["recovered"] = float(rec["slope"] / per_year) if per_year > 0 else math.nan
        out[e.name] = rec
    return out


def difference_map(forecasts: Sequence[np.ndarray], baselines: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Mean (forecast - baseline) and mean |forecast - baseline| over subjects, voxel by voxel."""
    if len(forecasts) != len(baselines) or not forecasts:
        raise ValueError(f"need matching non-empty lists, got {len(forecasts)} forecasts and {len(baselines)} baselines")
    diffs = []
    for f, b in zip(forecasts, baselines):
        f, b = np.asarray(f, np.float64), np.asarray(b, np.float64)
        if f.shape != b.shape:
            raise ValueError(f"forecast shape {f.shape} != baseline shape {b.shape}")
        diffs.append(f - b)
    d = np.stack(diffs)
    return {"mean": d.mean(0).astype(np.float32), "mean_abs": np.abs(d).mean(0).astype(np.float32)}


def _pair_forecasts(fc: Any, base_by_key: dict[str, int], baselines: Any, rejects: Any) -> list[tuple[int, int, float]]:
    """(forecast index, baseline index, interval) of every forecast whose request names a baseline
    of the set; the others go to ``rejects``."""
    pairs = []
    for i, (k, m) in enumerate(zip(fc.keys, fc.metas)):
        req = m.get("request") or {}
        src = (req.get("source") or {}).get("key")
        dt = req.get("interval")
        if src is None or dt is None:
            rejects.add(k, "request has no source.key / interval: not a forecast")
        elif src not in base_by_key:
            rejects.add(k, f"baseline {src!r} is not in {baselines}")
        else:
            pairs.append((i, base_by_key[src], float(dt)))
    return pairs


def _age_probe(age_probe: Any, real: Any, encoder: Any, tokenizers: Any, protocol: Any, progress: bool
               ) -> tuple[Any, dict[str, Any]]:
    """The brain-age probe and where it comes from: a saved g3n-probe regression probe, or a ridge
    fitted here (through g3n-probe) on the real features' ages.

    Its penalty is chosen by GCV unless ``protocol`` says otherwise. The probe reads change *within*
    a subject (a forecast against its baseline, a follow-up against the first visit), and GCV's
    leave-one-visit-out criterion rewards tracking a subject's age across visits; the panel's
    subject-grouped choice rewards telling subjects apart and shrinks those directions. Measured on
    the demo (11 held-out real follow-up pairs): GCV's probe sees 10 older, the grouped one 6."""
    from g3n_probe import LinearProbe, fit_regressor, protocol_preset

    from .sources import features_of

    if age_probe is not None:
        probe = LinearProbe.load(age_probe)
        if probe.kind != "regression":
            raise InputError(f"{age_probe}: is a {probe.kind} probe; forecasts need a brain-age regression probe")
        return probe, {"probe": str(age_probe)}
    if real is None:
        raise InputError("give --age-probe PROBE_DIR or --real FEATURES to fit the brain-age probe")
    real_fs, _ = features_of(real, encoder, tokenizers, None, progress)
    keep = [i for i, r in enumerate(real_fs.records) if r.get("age") is not None]
    if len(keep) < 3:
        raise InputError(f"{real}: only {len(keep)} samples with an age to fit the brain-age probe")
    groups = np.asarray([str(real_fs.records[i].get("subject") or real_fs.keys[i]) for i in keep])
    cfg = protocol or protocol_preset("paper", ridge_inner_cv="gcv")
    probe, rep = fit_regressor(real_fs.X[keep], np.asarray([real_fs.records[i]["age"] for i in keep], float), cfg, groups)
    return probe, {"fitted_on": str(real), "n": len(keep), "ridge_inner_cv": cfg.ridge_inner_cv, "alpha": rep.alpha}


def _maps_and_figures(fc: Any, base: Any, pairs: list[tuple[int, int, float]], out: Any, montage_n: int
                      ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The mean difference maps (saved as ``forecast_difference.npz``) and the montages."""
    import io

    from .figures import diff_montage, volume_montage
    from .records import atomic_write_bytes

    maps = difference_map([fc.arrays[i] for i, _, _ in pairs], [base.arrays[b] for _, b, _ in pairs])
    buf = io.BytesIO()
    np.savez(buf, mean=maps["mean"], mean_abs=maps["mean_abs"])
    atomic_write_bytes(out / "forecast_difference.npz", buf.getvalue())
    diff_montage([maps["mean"]], ["mean forecast-baseline"], out / "forecast_difference.png")
    n = min(montage_n, len(pairs))
    vols, labels, diffs = [], [], []
    for i, b, dt in pairs[:n]:
        vols += [base.arrays[b], fc.arrays[i]]
        labels += [f"baseline {base.keys[b][:10]}", f"+{dt:g}y forecast"]
        diffs.append(fc.arrays[i] - base.arrays[b])
    volume_montage(vols, labels, out / "forecast_montage.png")
    diff_montage(diffs, [f"+{dt:g}y diff" for _, _, dt in pairs[:n]], out / "forecast_subject_differences.png")
    return maps, {"forecast_difference": "forecast_difference.png", "forecast_montage": "forecast_montage.png",
                  "forecast_subject_differences": "forecast_subject_differences.png"}


def run_forecast(forecasts: Any, baselines: Any, out: Any, encoder: Any, tokenizers: Any = None,
                 real: Any = None, age_probe: Any = None, protocol: Any = None, limit: int | None = None,
                 montage_n: int = 4, progress: bool = True, anatomy: Any = None) -> dict[str, Any]:
    """Brain-age recovery and difference maps of a forecast set against its baselines.

    Each forecast's ``meta.request`` names its source (``source.key``) and ``interval`` (years).
    The age probe is a saved g3n-probe regression probe (``age_probe``) or is fitted here (ridge,
    through g3n-probe) on the ``real`` features' ages. With ``anatomy`` (an anatomy spec, see
    :mod:`g3n_eval.anatomy`), the spec's age effects are also measured on the decoded volumes
    (:func:`anatomy_ageing`): ageing checked with no probe.
    """
    from pathlib import Path

    from .data import open_set
    from .records import input_ref, write_metrics
    from .rejects import Rejects
    from .sources import request_settings, volumes_of

    out = Path(out)
    rejects = Rejects(out)
    fc = volumes_of(forecasts, tokenizers, limit, progress)
    # decode only the baselines some forecast starts from (a test split holds many more), and the
    # real follow-up sessions of their modalities in the same set: the real ageing the probe must
    # see before its verdict on forecasts means anything
    sources = {((m.get("request") or {}).get("source") or {}).get("key") for m in fc.metas}
    bmetas = {str(k): m.model_dump() for k, m in open_set(baselines).metadata().items()}
    mods = {bmetas[k].get("modality") for k in sources if k in bmetas}
    fpairs = followup_pairs(list(bmetas), list(bmetas.values()), mods)
    base = volumes_of(baselines, tokenizers, None, progress,
                      only={k for k in sources if k is not None} | {k for a, b, _ in fpairs for k in (a, b)})
    base_by_key = {k: i for i, k in enumerate(base.keys)}
    pairs = _pair_forecasts(fc, base_by_key, baselines, rejects)
    if len(pairs) < 2:
        raise InputError(f"{forecasts}: {len(pairs)} forecast(s) could be paired with a baseline; need 2 (see {rejects.path})")
    probe, probe_src = _age_probe(age_probe, real, encoder, tokenizers, protocol, progress)
    fi, bi, dts = zip(*pairs)
    # each decoded baseline-set volume encoded once: a baseline is forecast at several intervals,
    # and a follow-up pair's first session is often a forecast's baseline too
    base_age = probe.predict_scores(encoder(base.arrays))
    rec = ageing_recovery(dts, base_age[list(bi)], probe.predict_scores(encoder([fc.arrays[i] for i in fi])),
                          [base.keys[b] for b in bi])
    fpairs = [(base_by_key[a], base_by_key[b], dt) for a, b, dt in fpairs if a in base_by_key and b in base_by_key]
    if fpairs:
        rec["real_followups"] = followup_ageing([dt for *_, dt in fpairs], base_age[[a for a, _, _ in fpairs]],
                                                base_age[[b for _, b, _ in fpairs]])
    anat = None
    if anatomy is not None:
        from .anatomy import Anatomy

        anat = anatomy_ageing(Anatomy.load(anatomy), fc.arrays, base.arrays, pairs, base.keys, base.metas, fpairs)
    maps, figures = _maps_and_figures(fc, base, pairs, out, montage_n)
    settings = {
        "age_probe": probe_src,
        "encoder": {"weights": encoder.weights, "digest": encoder.digest},
        "tokenizers": tokenizers.provenance() if tokenizers is not None else [],
        "generation": request_settings(fc.metas),
        "difference_space": "brain z-space (decoded)",
        "limit": limit,
    }
    inputs = [input_ref(forecasts, "forecasts"), input_ref(baselines, "baselines")]
    if real is not None and age_probe is None:
        inputs.append(input_ref(real, "real features (age probe)"))
    if age_probe is not None:
        inputs.append(input_ref(age_probe, "age probe"))
    if anatomy is not None:
        inputs.append(input_ref(anatomy, "anatomy spec"))
    results = {"n_pairs": len(pairs), "rejected": rejects.count, "age": rec, **({"anatomy": anat} if anat is not None else {}),
               "difference": {"mean_abs_change": float(maps["mean_abs"].mean()),
                              "file": "forecast_difference.npz"}, "figures": figures}
    return write_metrics(out / "forecast.json", "forecast", settings, inputs, results)
