"""The page's sections: one renderer per measurement, from its metrics document to HTML.

:data:`SECTIONS` maps a metrics document's ``measurement`` to its heading and renderer;
:mod:`g3n_eval.report` assembles the page from them. The small table, number and figure
helpers live here too, so a renderer reads with everything it uses.
"""

from __future__ import annotations

import csv
import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .controllability import BLIND_AUC, BLIND_P, is_blind
from .records import MetricsFileError


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.{digits}g}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    h = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(str(c))}</th>' for i, c in enumerate(header))
    body = []
    for r in rows:
        body.append("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{html.escape(_fmt(c))}</td>'
                                     for i, c in enumerate(r)) + "</tr>")
    return f"<table><tr>{h}</tr>{''.join(body)}</table>"


def _figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _recon_section(doc: dict[str, Any]) -> str:
    s = doc["results"]["summary"]
    rows = []
    for metric in ("mse", "psnr", "ssim"):
        for region, key in (("whole volume", metric), ("brain mask", f"{metric}_brain")):
            v = s[key]
            rows.append([metric.upper(), region, v["mean"], v["std"], v["median"], v["min"], v["max"], v["n"]])
    tok = doc["settings"].get("tokenizer") or {}
    head = f"<p>Tokenizer: <code>{html.escape(str(tok.get('name', 'given reconstructions')))}</code>; " \
           f"{doc['results']['n']} volumes, {doc['results'].get('rejected', 0)} rejected.</p>"
    return head + _table(["metric", "region", "mean", "std", "median", "min", "max", "n"], rows, left=2)


def _control_section(doc: dict[str, Any]) -> str:
    res = doc["results"]
    space = doc["settings"].get("space", "volume")
    head = (f"<p>Feature space: <b>{html.escape(space)}</b> — generated samples "
            f"{html.escape(str(doc['settings'].get('generated_path', '')))}; each probe trained on the real samples "
            f"of the conditions every sample of its row asked for (<i>fitted on</i>, e.g. the T1 volumes when every "
            f"request named T1), or on every real sample where that slice lacks a class.</p>")
    rows = []
    with_recon = any("recon" in r for r in res["tasks"].values())
    for name, r in res["tasks"].items():
        null = r["null"]
        prior = r["prior"]
        pair = r.get("paired") or {}
        real = r.get("real") or {}
        perm = real.get("permutation") or {}
        rc = r.get("recon") or {}
        rperm = rc.get("permutation") or {}
        recon_cell = [(f"{_fmt(rc['auc'], 3)}, p {_fmt(rperm['p'], 3)} ({_fmt(rperm['null95'], 3)})" if rperm else
                       _fmt(rc["auc"], 3)) + (" blind" if rc["blind"] else "") if rc else "-"]
        rows.append([name, _fitted_on(r), real.get("agreement"), real.get("auc"),
                     f"{_fmt(perm['p'], 3)} ({_fmt(perm['null95'], 3)})" if perm else "-",
                     *(recon_cell if with_recon else []),
                     r["cond"]["agreement"], r["cond"]["auc"], r["cond"]["n"],
                     _moved(pair), pair.get("mean_shift"), pair.get("p"),
                     f"{_fmt(null['fraction'], 3)} {null['class'] or ''}".strip(), null["n"],
                     f"{_fmt(prior['fraction'], 3)} {prior['class'] or ''}".strip()])
    out = head + _table(["task", "fitted on", "real", "real AUC", "real p (to beat)",
                         *(["recon AUC, p (to beat)"] if with_recon else []), "cond", "cond AUC", "n cond",
                         "paired moved", "paired shift", "paired p", "null", "n null", "prior"], rows, left=2)
    n_perm = doc["settings"].get("probe", {}).get("real_permutations")
    if n_perm:
        out += (f"<p>Real p: the probe's cross-validation on real data re-run on {n_perm} shuffled labellings (labels "
                f"move between subjects, folds fixed); p is the share that scored an AUC at least as high, "
                f"<i>to beat</i> the AUC a probe needs for p &lt; 0.05. A probe with p &gt; {BLIND_P} cannot be told "
                f"from one that sees nothing of the task on these subjects.</p>")
    if with_recon:
        out += ("<p>Recon AUC: each probe of the real column's cross-validation scores the tokenizer's reconstructions "
                "of the real volumes it held out, and p is the share of labellings shuffled between subjects that "
                "score them at least as well. Decoded samples can only show what the probe still sees after a volume "
                f"has been through the tokenizer: with p above {BLIND_P} (without the test, AUC at most {BLIND_AUC}) "
                "the row is <i>blind</i> on reconstructions, even where it sees the real ones, and its cond column "
                "cannot show controllability on decoded samples; its paired column still says which way they "
                "moved, along a direction the probe does not reliably see.</p>")
    if any((r.get("paired") or {}).get("n_groups") for r in res["tasks"].values()):
        out += ("<p>Paired: generated samples that share their noise and other conditions and differ only in the "
                "requested class; <i>moved</i> counts the groups whose probe probability moved toward the requested "
                "class, <i>shift</i> is its mean change, <i>p</i> the one-sided sign test.</p>")
    blind = [name for name, r in res["tasks"].items() if is_blind(r.get("real"))]
    if blind:
        auc_rule = f"cross-validated AUC on real data at most {BLIND_AUC}"
        rule = f"real p above {BLIND_P}; rows without the test: {auc_rule}" if n_perm else auc_rule
        out += (f"<p>Blind probes ({rule}: they cannot tell the real classes apart, so their cond and paired "
                f"columns cannot show controllability either way): {', '.join(html.escape(b) for b in blind)}.</p>")
    for field, sw in res.get("sweeps", {}).items():
        lv = [[f"{field} {k}", v["n"], v["mean"], v["std"]] for k, v in sw["levels"].items()]
        pair = sw.get("paired") or {}
        paired = (f"; paired: slope positive in {_moved(pair)} groups, mean slope {_fmt(pair.get('mean_slope'))}, "
                  f"sign-test p {_fmt(pair.get('p'), 3)}") if pair.get("n_groups") else ""
        rs = sw.get("recon") or {}
        recon = (f"; the same probe, cross-validated by subject, on held-out real volumes: slope {_fmt(rs['real']['slope'])}, "
                 f"r {_fmt(rs['real']['pearson_r'])}, MAE {_fmt(rs['real']['mae'])}; on their reconstructions: slope "
                 f"{_fmt(rs['recon']['slope'])}, r {_fmt(rs['recon']['pearson_r'])}, MAE {_fmt(rs['recon']['mae'])} "
                 f"(true vs predicted)") if rs else ""
        out += (f"<p>{html.escape(field)} sweep (probe fitted on {html.escape(_fitted_on(sw))}): slope {_fmt(sw['slope'])}, "
                f"Pearson r {_fmt(sw['pearson_r'])}{paired}{recon}</p>")
        out += _table(["requested", "n", "predicted mean", "std"], lv)
    if res.get("skipped"):
        out += "<p>Skipped: " + "; ".join(f"{html.escape(k)} ({html.escape(v)})" for k, v in res["skipped"].items()) + "</p>"
    gen = doc["settings"].get("generation") or {}
    out += "<p>Generation: " + html.escape(", ".join(f"{k}={json.dumps(v)}" for k, v in gen.items() if k != "checkpoint")) + "</p>"
    return out


def _fitted_on(row: dict[str, Any]) -> str:
    """The real slice a probe was fitted on: 'T1', 'modality=T1, sex=F', or 'all' (older documents: 'all')."""
    where = row.get("real_slice") or {}
    return ", ".join(where.values()) if len(where) == 1 else ", ".join(f"{k}={v}" for k, v in where.items()) or "all"


def _moved(pair: dict[str, Any]) -> str:
    return f"{pair['n_moved']}/{pair['n_groups']}" if pair.get("n_groups") else "-"


def _interval(v: list | None) -> str:
    """[lo, hi] fractions as 'lo to hi %' (n/a where not measured)."""
    if not v or any(x is None or x != x for x in v):
        return "n/a"
    return f"{100 * v[0]:.0f} to {100 * v[1]:.0f} %"


def _anatomy_section(doc: dict[str, Any]) -> str:
    spec = doc["settings"].get("spec") or {}
    rows = []
    effects = doc["results"]["effects"]
    with_recon = any("recon" in r for r in effects.values())
    for name, r in effects.items():
        real, pair, rc = r["real"], r["paired"], r.get("recon") or {}
        n_real = real.get("n") if "n" in real else f"{real.get('n_from')}/{real.get('n_to')}"
        rows.append([name, r["signature"], r["expect"], n_real, real["difference"], real.get("pooled_difference"),
                     real["d"], r["real_confirms"], _moved(pair), pair.get("p"), pair.get("mean_change"), r.get("of_real")]
                    + ([rc.get("difference"), r.get("recon_keeps"), _interval(rc.get("keeps_interval")), rc.get("slope"),
                        rc.get("r")] if with_recon else []))
    within = ""
    if spec.get("within"):
        w = html.escape(str(spec["within"]))
        within = (f", estimated within each {w} so that differences between {w}s (scanners, contrast) do not "
                  f"count; <i>pooled</i>: over every real sample")
    head = ("<p>Known effects measured on the volumes themselves, no probe: each volume z-scored over the brain, "
            "then a region mean, a contrast of two regions, or a left-right asymmetry. <i>real</i> is the effect in "
            f"real data (class means, or the slope times the change for numbers) and Cohen's d{within}; <i>as expected</i> "
            "says whether real data confirm the direction. <i>paired moved</i> counts the generated groups (same "
            "noise, other conditions equal) whose signature changed the expected way; <i>of real</i> is their mean "
            "change as a fraction of the real effect. The images <i>anatomy</i> show each effect voxel by voxel, real above and "
            "generated (mean paired change) below, on one colour scale (red brighter, blue darker): where a change "
            "lands, e.g. a scanner's bias pattern learned with a disease.")
    if with_recon:
        head += (" <i>recon</i> is the same real effect measured on the tokenizer's reconstructions of real "
                 "volumes, and <i>recon keeps</i> its fraction of the real effect on those same volumes (a subset, "
                 "e.g. one visit per subject, is held against itself): decoded samples can only show what "
                 "the decoder draws, so where the reconstructions keep little of an effect, its paired column says "
                 "nothing about the generator. <i>keeps 95 %</i>: a bootstrap interval of that fraction (volumes "
                 "resampled within each class); a small effect on few volumes gives a wide one, and then the fraction "
                 "is not measured. <i>recon slope</i> and <i>r</i>: the reconstructions' signature regressed on the "
                 "real one over the same volumes, the fraction of any volume's departure they keep.")
    if spec.get("source"):
        head += f" Effects from: {html.escape(str(spec['source']))}."
    out = head + "</p>" + _table(["effect", "signature", "expect", "n real", "real change", "pooled", "real d",
                                  "as expected", "paired moved", "paired p", "paired change", "of real"]
                                 + (["recon change", "recon keeps", "keeps 95 %", "recon slope", "r"] if with_recon else []),
                                 rows, left=3)
    items = [f"<li><b>{html.escape(s['name'])}</b>: {html.escape(s.get('why') or s['kind'])}</li>"
             for s in spec.get("signatures", [])]
    items += [f"<li>{html.escape(name)}: {html.escape(r['why'])}</li>"
              for name, r in doc["results"]["effects"].items() if r.get("why")]
    return out + (f"<ul>{''.join(items)}</ul>" if items else "")


def _fidelity_section(doc: dict[str, Any]) -> str:
    res = doc["results"]
    pairs = sorted(set(res.get("fid", {})) | set(res.get("encoder_fd", {})))
    rows = []
    for p in pairs:
        f = res.get("fid", {}).get(p, {})
        rows.append([p.replace("_", " "), f.get("sagittal"), f.get("coronal"), f.get("axial"), f.get("pooled"),
                     res.get("encoder_fd", {}).get(p)])
    fid = doc["settings"].get("fid") or {}
    note = (f"<p>FID: Inception-V3 ({html.escape(str(fid.get('variant')))}) weights "
            f"<code>{html.escape(str(fid.get('weights_digest')))}</code>, image {fid.get('image_size')}, "
            f"slice offsets {fid.get('slice_offsets')}. Samples: {html.escape(json.dumps(res['n']))}.</p>") if fid else \
        "<p>FID not measured (no Inception weights given); encoder Frechet distance only.</p>"
    out = note + _table(["pair", "FID sagittal", "FID coronal", "FID axial", "FID pooled", "encoder FD"], rows)
    if res.get("arms"):
        field = doc["settings"].get("arm_field")
        arows = []
        for val, arm in res["arms"].items():
            for p in sorted(set(arm["fid_pooled"]) | set(arm["encoder_fd"])):
                arows.append([f"{field}={val}", p.replace("_", " "), arm["fid_pooled"].get(p), arm["encoder_fd"].get(p),
                              json.dumps(arm["n"])])
        for p in sorted(set(res["arms_mean"]["fid_pooled"]) | set(res["arms_mean"]["encoder_fd"])):
            arows.append(["mean over arms", p.replace("_", " "), res["arms_mean"]["fid_pooled"].get(p),
                          res["arms_mean"]["encoder_fd"].get(p), ""])
        out += _table(["arm", "pair", "FID pooled", "encoder FD", "n"], arows, left=2)
    return out


def _memo_section(doc: dict[str, Any]) -> str:
    r = doc["results"]
    verdict = '<span class="bad">MEMORISATION FOUND</span>' if r["memorisation"] else '<span class="ok">no memorisation</span>'
    rows = [["synthetic → train", r["syn_to_train"]["mean"], r["syn_to_train"]["min"], r["syn_to_train"]["median"], r["n_synthetic"]],
            ["held-out real → train", r["heldout_to_train"]["mean"], r["heldout_to_train"]["min"], r["heldout_to_train"]["median"], r["n_heldout"]]]
    s = doc["settings"]
    return (f"<p>{verdict}. Ratio of means {_fmt(r['ratio_of_means'])} (gate: ≥ {_fmt(s['min_ratio'])}); "
            f"{_fmt(r['fraction_below'])} of synthetic samples below percentile {_fmt(s['percentile'])} of "
            f"held-out distances ({_fmt(r['threshold'])}; chance {_fmt(r['expected_fraction'], 3)}, binomial p {_fmt(r['p_value'], 3)}; "
            f"gate: ≤ {_fmt(s['max_fraction_below'])} and p < {_fmt(s['alpha'])}); {r['n_copies']} exact copies; "
            f"{r['dim']}-d latents, {r['n_train']} training samples.</p>"
            + "".join(f"<p class='bad'>{html.escape(x)}</p>" for x in r["reasons"])
            + _table(["nearest-neighbour distance", "mean", "min", "median", "n"], rows))


def _forecast_section(doc: dict[str, Any]) -> str:
    r = doc["results"]
    a = r["age"]
    rows = [[f"+{k} y", v["n"], v["mean_predicted_change"]] for k, v in a["levels"].items()]
    pair = a.get("paired") or {}
    paired = (f" Paired, within each baseline: predicted ageing rose with the interval for {_moved(pair)} baselines, "
              f"mean slope {_fmt(pair.get('mean_slope'))}, sign-test p {_fmt(pair.get('p'), 3)}."
              if pair.get("n_groups") else "")
    real = a.get("real_followups") or {}
    if real.get("n"):
        paired += (f" Real ageing, the check on the probe: on {real['n']} real follow-up pairs of the baselines' set "
                   f"(decoded like the forecasts, {_fmt(real['mean_interval'], 3)} years apart on average) it predicts "
                   f"{real['n_older']} older and {real['n_younger']} younger (sign-test p {_fmt(real['p'], 3)}), "
                   f"{_fmt(real['recovered'], 3)} of the true interval on average"
                   + ("; it does not see real sessions age, so it cannot show whether the forecasts do." if real["blind"]
                      else "."))
    return (f"<p>{r['n_pairs']} forecasts. Brain-age probe on decoded forecasts vs requested interval: slope "
            f"{_fmt(a['slope'])} (fraction of requested ageing recovered), Pearson r {_fmt(a['pearson_r'])}; "
            f"mean |forecast − baseline| {_fmt(r['difference']['mean_abs_change'])} (z-units).{paired}</p>"
            + _table(["requested interval", "n", "mean predicted ageing (y)"], rows)
            + _forecast_anatomy(r.get("anatomy") or {}))


def _forecast_anatomy(anat: dict[str, Any]) -> str:
    """The forecasts' ageing measured on the known anatomy (no probe), one sentence per age effect."""
    out = []
    for name, e in anat.items():
        pair, real = e.get("paired") or {}, e.get("real_followups") or {}
        s = (f"Known anatomy, no probe ({html.escape(name)}: {html.escape(e['signature'])} expected to "
             f"{e['expect']}{'; ' + html.escape(e['why']) if e.get('why') else ''}): the change moved the expected way "
             f"with the interval in {_moved(pair)} baselines (sign-test p {_fmt(pair.get('p'), 3)}), "
             f"{_fmt(e['slope'])} per year")
        if real.get("n_groups"):
            s += (f"; on {real['n_groups']} real follow-up pairs it moved the expected way in {real['n_moved']} "
                  f"(p {_fmt(real['p'], 3)}), {_fmt(real['mean_change_per_year'])} per year, so the forecasts show "
                  f"{_fmt(e.get('recovered'), 3)} of the real rate")
        out.append(f"<p>{s}.</p>")
    return "".join(out)


def _probe_section(run: Path, show: Callable[[Any], str] = str) -> str:
    f = run / "results.csv"
    try:
        rows = list(csv.DictReader(f.open()))
    except OSError as e:
        raise MetricsFileError(f"{f}: cannot read g3n-probe results: {e}") from None
    if not rows:
        return f"<p>{html.escape(show(f))}: no results.</p>"
    cols = list(rows[0].keys())

    def cell(v: str) -> Any:
        try:
            return float(v) if "." in v or "e" in v.lower() else v
        except ValueError:
            return v

    note = ("" if "chance" not in cols else
            "<p>chance: the same folds scored by a constant predictor (training-part class frequencies or mean).</p>")
    if any(r.get("perm_p") for r in rows):
        note += ("<p>perm_p: permutation test, the share of cross-validations on labels shuffled between subjects "
                 "(same folds; <code>permutations</code> of them) that scored at least as well; perm_null95: the score "
                 "to beat for p &lt; 0.05 (the shuffled scores' 95th percentile, 5th for errors). With few subjects "
                 "a probe that learned nothing can land far from chance; this says how far.</p>")
    return (f"<p>From <code>{html.escape(show(run))}</code></p>" + note
            + _table(cols, [[cell(r[c]) for c in cols] for r in rows], left=3))


def _tokenizers_section(doc: dict[str, Any]) -> str:
    pr = doc["settings"]["probe"]
    tasks = pr["tasks"]
    rows = [[r["tokenizer"], f"{r['values_per_volume']:,}", r["mse"], r["psnr"], r["ssim"],
             *[r["auc"].get(t) if r["auc"].get(t) is not None else "n/a" for t in tasks]] for r in doc["results"]["rows"]]
    n = doc["results"]["rows"][0]["n_heldout"] if doc["results"]["rows"] else 0
    return (f"<p>Table 5 in kind: each tokenizer's reconstruction of {n} held-out volumes (brain z-space, whole "
            f"volume) and the AUC of probes on the mean over tokens of its latents ({pr['volumes']} volumes, slice "
            f"{html.escape(pr['slice'])}, subject-grouped cross-validation).</p>"
            + _table(["tokenizer", "values / volume", "MSE", "PSNR (dB)", "SSIM", *[f"{t} AUC" for t in tasks]], rows))


SECTIONS = {
    "tokenizers": ("Tokenizers", _tokenizers_section),
    "reconstruction": ("Reconstruction", _recon_section),
    "controllability": ("Controllability", _control_section),
    "anatomy": ("Anatomy of generated samples", _anatomy_section),
    "fidelity": ("Fidelity", _fidelity_section),
    "memorisation": ("Memorisation audit", _memo_section),
    "forecast": ("Longitudinal forecasts", _forecast_section),
}
