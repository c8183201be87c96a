"""The demo's closing summary: one line per figure a reader looks for first (probe scores, the
encoder beside its baselines, the shipped tokenizers, reconstruction, controllability, anatomy,
memorisation, fidelity, forecasts), read from the result files the stages wrote in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

from .demo_inputs import shipped_table5

#: the probe rows the headline prints: the labels docs/method.md's signal must show on (age, sex,
#: diagnosis, modality, IDH1); the probe stage runs its permutation test on these slices. IDH1 on
#: three slices: T1c is the paper's row, yet on the synthetic cohort FLAIR (oedema, the T2-FLAIR
#: mismatch) and the patient-pooled slice carry it more steadily (configs/signal/README.md)
HEADLINE_PROBES: list[tuple[str, str, str]] = [
    ("disease", "all", "auc"), ("sex", "all", "auc"), ("modality", "all", "auc"), ("idh1", "T1c", "auc"),
    ("idh1", "FLAIR", "auc"), ("idh1", "pooled", "auc"), ("brain_age", "T1", "mae")]

#: the rows of the comparison the headline prints: (task, slice, metric)
BASELINE_ROWS: list[tuple[str, str, str]] = [("brain_age", "T1", "mae"), ("disease", "all", "auc"), ("sex", "all", "auc"),
                                             ("idh1", "pooled", "auc")]


def headline(run: Path) -> list[str]:
    """The figures printed at the end: probe scores on the main tasks, controllability, the age
    sweep, the known anatomy, memorisation, fidelity and forecasts, read from the stages' own result files."""
    lines = probe_lines(run) + baseline_lines(run) + tokenizer_lines(run)
    rec = (_load(run, "recon").get("summary") or {})
    if (rec.get("ssim") or {}).get("mean") is not None:
        lines.append(f"tokenizer reconstruction of {rec['ssim']['n']} held-out volumes: SSIM {rec['ssim']['mean']:.3f}, "
                     f"PSNR {rec['psnr']['mean']:.1f} dB, MSE {rec['mse']['mean']:.3f} (whole volume; "
                     f"brain only: SSIM {rec['ssim_brain']['mean']:.3f}, PSNR {rec['psnr_brain']['mean']:.1f} dB)")
    lines += controllability_lines(run)
    for name, r in (_load(run, "anatomy").get("effects") or {}).items():
        real = (r.get("real") or {}).get("difference")
        if real is not None and (r.get("paired") or {}).get("n_groups"):
            keeps = r.get("recon_keeps")
            kept = (f"; tokenizer reconstructions keep {100 * keeps:.0f} % of the real change on the same volumes"
                    f"{_recon_detail(r.get('recon') or {})}" if keeps is not None else "")
            lines.append(f"anatomy (no probe) {name} {r['signature']} (expected to {r['expect']}): real change "
                         f"{real:+.2f}{_paired(r['paired'], 'change')}{kept}")
    mem = _load(run, "memorisation")
    if mem:
        lines.append(f"memorisation: {'FOUND' if mem.get('memorisation') else 'none found'} "
                     f"(ratio of mean NN distances {mem.get('ratio_of_means', float('nan')):.2f})")
    fd = (_load(run, "fidelity").get("encoder_fd") or {})
    if fd:
        lines.append("encoder Frechet distance: " + ", ".join(f"{k} {v:.2f}" for k, v in fd.items()))
    return lines + forecast_lines(run)


def _recon_detail(recon: dict) -> str:
    """' (95 % interval a to b %; per volume x %)' where g3n-eval measured them."""
    lo, hi = recon.get("keeps_interval") or (None, None)
    if lo is None or hi is None or recon.get("slope") is None:
        return ""
    return f" (95 % interval {100 * lo:.0f} to {100 * hi:.0f} %; per volume {100 * recon['slope']:.0f} %)"


def _load(run: Path, name: str, folder: str | None = None) -> dict:
    """The ``results`` of ``eval/FOLDER/NAME.json`` (folder: the name), {} where the stage wrote none."""
    f = run / "eval" / (folder or name) / f"{name}.json"
    return json.loads(f.read_text()).get("results", {}) if f.is_file() else {}


def probe_lines(run: Path) -> list[str]:
    """The probe panel's scores on the headline rows, with chance and the permutation test."""
    lines = []
    results = run / "probe" / "results.csv"
    if results.is_file():
        import csv

        wanted = set(HEADLINE_PROBES)
        for row in csv.DictReader(results.open()):
            if (row.get("task"), row.get("slice"), row.get("metric")) in wanted:
                chance = f"chance {float(row['chance']):.3f}" if row.get("chance") else ""
                if row.get("perm_p"):
                    chance += (f"; permutation test: p {float(row['perm_p']):.2g} over {row['permutations']} shuffled "
                               f"labellings, {float(row['perm_null95']):.3f} to beat for p < 0.05")
                chance = f" ({chance})" if chance else ""
                lines.append(f"probe {row['task']} ({row['slice']}): {row['metric']} {float(row['mean']):.3f}{chance}")
    return lines


def controllability_lines(run: Path) -> list[str]:
    """Per task: does a probe see in the samples what was requested, in both spaces; and the age sweep."""
    lines = []
    for folder, space in (("controllability", "decoded + re-encoded"), ("controllability-latent", "latent space")):
        ctrl = _load(run, "controllability", folder)
        for task, r in (ctrl.get("tasks") or {}).items():
            cond = r.get("cond") or {}
            if cond.get("agreement") is not None:
                on = "".join(f"{v} " for v in (r.get("real_slice") or {}).values())
                real = r.get("real") or {}
                perm = real.get("permutation") or {}
                seen = f", permutation p {perm['p']:.2g}" if isinstance(perm.get("p"), float) else ""
                if real.get("blind"):
                    seen += ": blind, cannot judge the samples"
                rc = r.get("recon")
                if rc:
                    rp = (rc.get("permutation") or {}).get("p")
                    seen += (f"; on reconstructions of held-out real data: AUC {rc['auc']:.2f}"
                             + (f", permutation p {rp:.2g}" if isinstance(rp, float) else "")
                             + (": blind on reconstructions" if rc["blind"] else ""))
                lines.append(f"controllability [{space}] {task}: agreement {cond['agreement']:.2f}, AUC of the probe "
                             f"score vs the request {cond.get('auc', float('nan')):.2f} (probe on real {on}data: "
                             f"AUC {real.get('auc', float('nan')):.2f}{seen}){_paired(r.get('paired'), 'shift')}")
        age = (ctrl.get("sweeps") or {}).get("age")
        if age:
            means = ", ".join(f"{k}->{v['mean']:.1f}" for k, v in age["levels"].items())
            rs = age.get("recon")
            seen = (f"; the probe on held-out real volumes: slope {rs['real']['slope']:.2f}, on their reconstructions: "
                    f"{rs['recon']['slope']:.2f} (true vs predicted age)") if rs else ""
            lines.append(f"age sweep [{space}] (requested->predicted): {means}; slope {age['slope']:.2f}, "
                         f"r {age['pearson_r']:.2f}{_paired(age.get('paired'), 'slope')}{seen}")
    return lines


def forecast_lines(run: Path) -> list[str]:
    """The forecasts' brain-age change against the requested interval, and their anatomy (no probe)."""
    lines = []
    fc = (_load(run, "forecast").get("age") or {})
    if fc:
        real = fc.get("real_followups") or {}
        seen = (f"; on {real['n']} decoded real follow-up pairs ({real['mean_interval']:.1f} y apart on average) the "
                f"probe sees {real['n_older']}/{real['n']} older (p {real['p']:.2g})"
                + (": blind, cannot judge the forecasts" if real["blind"] else "")) if real.get("n") else ""
        lines.append(f"forecasts: brain-age change vs requested interval slope {fc['slope']:.2f}, r {fc['pearson_r']:.2f}"
                     f"{_paired(fc.get('paired'), 'slope')}{seen}")
    for name, a in (_load(run, "forecast").get("anatomy") or {}).items():
        real = a.get("real_followups") or {}
        # the real rate is signed like the forecasts' change: the expected direction is positive
        seen = (f"; on {real['n_groups']} decoded real follow-up pairs {_num(real.get('mean_change_per_year'), '+.3f')}/y, "
                f"{real['n_moved']}/{real['n_groups']} moved the expected way (p {_num(real.get('p'), '.2g')}); forecasts "
                f"{_num(a.get('recovered'), '.2f')} of that rate") if real.get("n_groups") else ""
        lines.append(f"forecasts, anatomy (no probe) {name} {a['signature']} (expected to {a['expect']}): change "
                     f"{_num(a.get('slope'), '+.3f')}/y in the expected direction{_paired(a.get('paired'), 'slope')}{seen}")
    return lines


def _scores(results: Path) -> dict[tuple[str, str, str], float]:
    import csv

    if not results.is_file():
        return {}
    return {(r["task"], r["slice"], r["metric"]): float(r["mean"]) for r in csv.DictReader(results.open()) if r.get("mean")}


def baseline_lines(run: Path) -> list[str]:
    """The encoder beside its two baselines (raw voxels at its width, itself untrained), same probes and folds."""
    runs = {"encoder": run / "probe", "raw voxels": run / "baselines" / "probe-raw",
            "random-init MAE": run / "baselines" / "probe-random"}
    scores = {name: _scores(p / "results.csv") for name, p in runs.items()}
    lines = []
    for row in BASELINE_ROWS:
        if all(row in sc for sc in scores.values()):
            better = min if row[2] == "mae" else max
            best = better(scores, key=lambda n: scores[n][row])
            lines.append(f"encoder vs baselines, {row[0]} ({row[1]}) {row[2]}: "
                         + ", ".join(f"{n} {scores[n][row]:.3f}" for n in scores) + f"; best: {best}")
    return lines


def tokenizer_lines(run: Path) -> list[str]:
    """The shipped tokenizers side by side (Table 5 in kind), for a run that starts from them."""
    cfg = run / "demo-config.json"
    table5 = shipped_table5() if cfg.is_file() and not json.loads(cfg.read_text()).get("from_scratch") else None
    if table5 is None:
        return []
    lines = []
    for r in json.loads(table5.read_text())["results"]["rows"]:
        aucs = ", ".join(f"{t} AUC {'n/a' if a is None else format(a, '.3f')}" for t, a in r["auc"].items())
        lines.append(f"shipped tokenizers on the {r['n_heldout']} held-out volumes (Table 5 in kind, at zoo build): "
                     f"{r['tokenizer']} {r['values_per_volume']:,} values/volume, MSE {r['mse']:.3f}, PSNR "
                     f"{r['psnr']:.1f} dB, SSIM {r['ssim']:.3f}; probes on its latents: {aucs}")
    return lines


def _paired(pair: dict | None, what: str) -> str:
    """'; paired: 8/8 moved toward the request (shift +0.11, p 0.004)' for a summary line."""
    if not pair or not pair.get("n_groups"):
        return ""
    return (f"; paired: {pair['n_moved']}/{pair['n_groups']} moved toward the request "
            f"({what} {_num(pair.get(f'mean_{what}'), '+.2f')}, p {_num(pair.get('p'), '.3f')})")


def _num(v: float | None, fmt: str) -> str:
    """A figure for a summary line; NaN (written to JSON as null) as n/a."""
    return "n/a" if v is None or v != v else format(v, fmt)
