"""`g3n-demo`: the whole BrainG3N chain on the built-in cohort, on CPU, in one command.

The built-in cohort is the labelled synthetic cohort of `g3n-data synth` plus the 10 real IXI
T1 volumes shipped in this package. Every stage is one of the stage packages' own commands;
every intermediate is a shard set in the run folder, and a re-run skips finished stages. A stage
whose settings changed (e.g. `samples_per_request: 16` in a --config file) starts over, and so does every
stage after it:

    synth ─┐
    real ──┴▶ volumes ─▶ mae ─▶ tokens ─▶ probe
                 │        └──▶ tokenizer ─▶ latents ─▶ dit ─▶ samples ──┐
                 │                            ├──▶ dit-long ─▶ forecasts ├▶ eval report
                 │                            └──▶ counterfactuals ──────┘
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from g3n_shards import ShardSet, atomic_write_bytes, subset_shard_set

from .runner import Stage, StageFailed, run_stages

#: The samples the demo asks the generator for: one request per class of each condition, so that
#: the evaluation can compare what was requested with what a probe sees (method.md Table 2a).
#: They are sampled paired (sample j of every request from the same noise), so the evaluation can
#: also compare requests that differ in one condition only, noise for noise.
SAMPLE_REQUESTS: list[dict] = [
    *({"conditions": {"disease": d, "modality": "T1"}} for d in ("HC", "MCI", "AD", "PD")),
    *({"conditions": {"sex": s, "modality": "T1"}} for s in ("F", "M")),
    *({"conditions": {"modality": m}} for m in ("T1", "T2", "FLAIR", "T1c")),
    *({"conditions": {"age": a, "modality": "T1"}} for a in (30, 50, 70)),
    # IDH1 is only defined for gliomas: ask for one (the synthetic cohort labels grade-4 tumours
    # GBM, all IDH1-wildtype there, so "glioma", grades 2-3, is the diagnosis with both classes)
    *({"conditions": {"disease": "glioma", "idh1": i, "modality": "T1c"}} for i in ("wildtype", "mutant")),
]


#: the probe rows the headline prints: the labels method.md's signal must show on (age, sex,
#: diagnosis, modality, IDH1); the probe stage runs its permutation test on these slices. IDH1 on
#: three slices: T1c is the paper's row, yet on the synthetic cohort FLAIR (oedema, the T2-FLAIR
#: mismatch) and the patient-pooled slice carry it more steadily (configs/signal/README.md)
HEADLINE_PROBES: list[tuple[str, str, str]] = [
    ("disease", "all", "auc"), ("sex", "all", "auc"), ("modality", "all", "auc"), ("idh1", "T1c", "auc"),
    ("idh1", "FLAIR", "auc"), ("idh1", "pooled", "auc"), ("brain_age", "T1", "mae")]


class DemoConfig(BaseModel):
    """Sizes of the demo run; the defaults finish in under 15 minutes on 2 idle CPU cores."""

    model_config = ConfigDict(extra="forbid")
    run_dir: Path = Path("runs/demo")
    subjects: int = Field(100, ge=12, description="synthetic subjects (several volumes each; 100 gives the "
                          "20 glioma subjects the IDH1 probe needs)")
    seed: int = 2025
    workers: int = Field(2, ge=1)
    real: bool = Field(True, description="include the 10 real IXI T1 volumes shipped with the package")
    real_skullstrip: str = Field("atlas", description="robex (about 45 s a volume), atlas, or none")
    mae_steps: int = 400
    mae_norm_pix_loss: bool = Field(True, description="MAE target: each patch normalised by its own mean and std "
                                    "(MAE's norm_pix_loss). On the demo cohort, over MAE seeds 2025/1/2, the T1 "
                                    "brain-age probe's MAE was 10.56/11.33/11.36 years with it and 11.75/11.80/10.41 "
                                    "without, IDH1 (all) AUC 0.83/0.62/0.79 with it and 0.70/0.65/0.67 without")
    tokenizer_epochs: int = 2
    tokenizer_steps_per_epoch: int = 20
    dit_preset: str = Field("small", description="g3n-dit preset of the generator (small: 2x2x2 latent patches)")
    dit_steps: int = Field(2400, description="generator training steps. At 800 (three seeds), disease requests "
                           "moved the latents but hardly the decoded anatomy: an AD sample's ventricles were 0.03-0.08 "
                           "z darker than its HC pair's (real AD vs HC: 0.26), and HC->AD moved 1-3 of 8 paired groups "
                           "on decoded volumes. At 2400: 0.21-0.28 z, and 7-8 of 8 groups")
    dit_precision: Literal["fp32", "bf16", "auto"] = Field("auto", description="generator training precision: fp32, bf16, or auto (bf16 on CPUs "
                               "with AMX, where it trains 1.6x faster, and on CUDA)")
    probe_permutations: int = Field(49, ge=0, description="permutation test of the probes whose scores the demo "
                                    "reports (the panel's headline rows, and each controllability probe on real data): "
                                    "that many cross-validations on shuffled labels each (p >= 1/50); 0 skips it")
    longitudinal_steps: int = 200
    recon_volumes: int = 8
    anatomy_recon: bool = Field(False, description="also decode every real latent and measure each anatomy effect on "
                                "the tokenizer's reconstructions: how much of it the decoder draws at all, so a row "
                                "the decoded samples do not move can be told apart from a generator that did not "
                                "learn it; and score each decoded-space controllability probe on the reconstructions "
                                "of the real volumes it held out, so a probe that cannot see its task on decoded "
                                "volumes is marked blind there. Costs about 2 minutes (one decode a volume). On the demo run the "
                                "reconstructions keep 2 % of the PD putamen drop and all of the AD ventricle widening; "
                                "a tokenizer trained 6 times longer (240 steps, 7 minutes) keeps 83 % of the PD drop")
    samples_per_request: int = 8
    sample_steps: int = 25


def ixi_csv() -> Path:
    return Path(str(resources.files("g3n_pipeline") / "cohort" / "ixi10" / "ixi10.csv"))


def _split_subsets(run: Path, source: str, prefix: str) -> None:
    """Write PREFIX-train / PREFIX-test subsets of SOURCE following splits.json (by subject)."""
    from g3n_data.splits import load_splits

    splits = load_splits(run / "splits.json")
    src = ShardSet.open(run / source)
    have = set(src.keys())
    for name in ("train", "test"):
        keys = [k for k in splits.keys[name] if k in have]
        out = run / f"{prefix}-{name}"
        subset_shard_set(src, keys, out, overwrite=True)


def build_stages(cfg: DemoConfig) -> list[Stage]:
    s = str  # paths become command-line strings
    w = str(cfg.workers)
    stages = [
        Stage("synth", "synthetic labelled cohort (g3n-data synth)", ["volumes-synth"], lambda r: [
            ["g3n_data.cli", "synth", "--out", s(r / "volumes-synth"), "--subjects", str(cfg.subjects),
             "--seed", str(cfg.seed), "--geometry", "demo", "--workers", w, "--overwrite"]]),
    ]
    parts = ["volumes-synth"]
    if cfg.real:
        stages.append(Stage("real", "real IXI T1: ingest and preprocess (g3n-data)", ["volumes-real"], lambda r: [
            ["g3n_data.cli", "ingest", "csv", s(ixi_csv()), "--out", s(r / "ingest-ixi"), "--cohort", "IXI",
             "--site", "IXI-HH"],
            ["g3n_data.cli", "preprocess", s(r / "ingest-ixi" / "worklist.jsonl"), "--out", s(r / "volumes-real"),
             "--preset", "demo", "--skullstrip", cfg.real_skullstrip, "--workers", w]]))
        parts.append("volumes-real")
    stages += [
        Stage("cohort", "one volumes set, subject-level splits", ["volumes", "splits.json", "volumes-train", "volumes-test"],
              lambda r: [["g3n_shards.cli", "merge", s(r / "volumes"), *(s(r / p) for p in parts), "--overwrite"],
                         ["g3n_data.cli", "split", "--in", s(r / "volumes"), "--out", s(r / "splits.json"),
                          "--seed", str(cfg.seed)]],
              after=lambda r: _split_subsets(r, "volumes", "volumes")),
        Stage("mae", "3D MAE pretraining, tiny preset (g3n-mae train)", ["mae/export"], lambda r: [
            ["g3n_mae.cli", "train", "--preset", "tiny", "--data", s(r / "volumes"), "--run-dir", s(r / "mae"),
             "--steps", str(cfg.mae_steps), "--engine", "torch", "--seed", str(cfg.seed), "--no-tensorboard",
             "--norm-pix-loss" if cfg.mae_norm_pix_loss else "--no-norm-pix-loss"]]),
        Stage("encode", "encode every volume (g3n-mae encode)", ["tokens"], lambda r: [
            ["g3n_mae.cli", "encode", s(r / "mae"), "--volumes", s(r / "volumes"), "--out", s(r / "tokens"),
             "--store", "both", "--overwrite"]]),
        Stage("probe", "the clinical probe panel (g3n-probe run)", ["probe"], lambda r: [
            ["g3n_probe.cli", "run", s(r / "tokens"), "--out", s(r / "probe"), "--name", "BrainG3N-tiny",
             *(["--permutations", str(cfg.probe_permutations),
                "--permute", ",".join(f"{t}/{sl}" for t, sl, _ in HEADLINE_PROBES)] if cfg.probe_permutations else [])]]),
        Stage("tokenizer", "MAE-CNN tokenizer, tiny preset (g3n-tokenizer train, encode)",
              ["tokenizer/tokenizer.safetensors", "latents", "latents-train", "latents-test"], lambda r: [
            ["g3n_tokenizer.cli", "train", "--volumes", s(r / "volumes-train"), "--out", s(r / "tokenizer"),
             "--tokenizer", "mae-cnn", "--mae-checkpoint", s(r / "mae"), "--preset", "tiny",
             "--epochs", str(cfg.tokenizer_epochs), "--steps-per-epoch", str(cfg.tokenizer_steps_per_epoch),
             "--seed", str(cfg.seed)],
            ["g3n_tokenizer.cli", "encode", "--volumes", s(r / "volumes"), "--checkpoint",
             s(r / "tokenizer" / "tokenizer.safetensors"), "--out", s(r / "latents"), "--overwrite"]],
              after=lambda r: _split_subsets(r, "latents", "latents")),
        Stage("dit", f"conditional flow-matching DiT, {cfg.dit_preset} preset (g3n-dit train, sample; g3n-tokenizer decode)",
              ["dit", "samples", "samples-decoded"], inputs=["requests.jsonl"], commands=lambda r: [
            ["g3n_dit.cli", "train", "--latents", s(r / "latents-train"), "--out", s(r / "dit"), "--preset", cfg.dit_preset,
             "--max-steps", str(cfg.dit_steps), "--seed", str(cfg.seed), "--precision", cfg.dit_precision],
            ["g3n_dit.cli", "sample", "--checkpoint", s(r / "dit"), "--out", s(r / "samples"),
             "--requests", s(r / "requests.jsonl"), "--steps", str(cfg.sample_steps), "--seed", str(cfg.seed),
             "--paired", "--overwrite"],
            # decoded once here, for every measurement that looks at generated volumes
            ["g3n_tokenizer.cli", "decode", "--latents", s(r / "samples"), "--out", s(r / "samples-decoded"),
             "--format", "volumes", "--overwrite"]]),
        Stage("longitudinal", "longitudinal bridge and forecasts (g3n-dit)", ["dit-long", "forecasts"], lambda r: [
            ["g3n_dit.cli", "train-longitudinal", "--latents", s(r / "latents-train"), "--out", s(r / "dit-long"),
             "--preset", "tiny", "--max-steps", str(cfg.longitudinal_steps), "--seed", str(cfg.seed)],
            ["g3n_dit.cli", "forecast", "--checkpoint", s(r / "dit-long"), "--latents", s(r / "latents-test"),
             "--keys", *first_visit_keys(r / "latents-test", modality="T1", n=8),
             "--intervals", "2", "5", "10", "--out", s(r / "forecasts"), "--overwrite"]]),
        Stage("counterfactual", "counterfactuals: HC scans as AD and 10 years older (g3n-dit)", ["counterfactuals"],
              lambda r: [
            ["g3n_dit.cli", "counterfactual", "--checkpoint", s(r / "dit"), "--latents", s(r / "latents-test"),
             "--keys", *first_visit_keys(r / "latents-test", modality="T1", n=4, diagnosis="HC"),
             "--set", "disease=AD", "--set", "age=+10", "--out", s(r / "counterfactuals"), "--overwrite"]]),
        Stage("eval", "evaluation and the HTML report (g3n-eval)", ["eval/report/index.html"], lambda r: [
            ["g3n_eval.cli", "recon", "--volumes", s(r / "volumes-test"), "--tokenizer-checkpoint",
             s(r / "tokenizer" / "tokenizer.safetensors"), "--tokenizer", "mae-cnn", "--limit", str(cfg.recon_volumes),
             "--save-recon", "--out", s(r / "eval" / "recon")],
            # every real latent decoded: the anatomy and the decoded-space probes on reconstructions
            *([["g3n_tokenizer.cli", "decode", "--latents", s(r / "latents"), "--out", s(r / "eval" / "recon-real"),
                "--format", "volumes", "--overwrite"]] if cfg.anatomy_recon else []),
            ["g3n_eval.cli", "controllability", "--real", s(r / "tokens"), "--generated", s(r / "samples-decoded"),
             "--encoder", s(r / "mae"), "--permutations", str(cfg.probe_permutations),
             *(["--recon", s(r / "eval" / "recon-real")] if cfg.anatomy_recon else []),
             "--out", s(r / "eval" / "controllability")],
            ["g3n_eval.cli", "controllability", "--space", "latent", "--real", s(r / "latents"), "--generated",
             s(r / "samples"), "--permutations", str(cfg.probe_permutations),
             "--out", s(r / "eval" / "controllability-latent")],
            # the synthetic cohort's known anatomy (ventricles, putamen, lesion site), measured without a probe
            ["g3n_data.cli", "synth-anatomy", "--out", s(r / "eval" / "anatomy-spec"), "--geometry", "demo"],
            ["g3n_eval.cli", "anatomy", "--spec", s(r / "eval" / "anatomy-spec" / "anatomy.yaml"), "--real",
             s(r / "volumes"), "--generated", s(r / "samples-decoded"), "--out", s(r / "eval" / "anatomy"),
             *(["--recon", s(r / "eval" / "recon-real")] if cfg.anatomy_recon else [])],
            ["g3n_eval.cli", "memorisation", "--synthetic", s(r / "samples"), "--train", s(r / "latents-train"),
             "--heldout", s(r / "latents-test"), "--out", s(r / "eval" / "memorisation")],
            ["g3n_eval.cli", "fidelity", "--real", s(r / "volumes-test"), "--generated", s(r / "samples-decoded"),
             "--recon", s(r / "eval" / "recon" / "recon-volumes"), "--skip-fid", "--encoder", s(r / "mae"),
             "--out", s(r / "eval" / "fidelity")],
            ["g3n_eval.cli", "forecast", "--forecasts", s(r / "forecasts"), "--baselines", s(r / "latents-test"),
             "--real", s(r / "tokens"), "--encoder", s(r / "mae"), "--out", s(r / "eval" / "forecast")],
            ["g3n_eval.cli", "report", s(r / "eval" / "recon"), s(r / "eval" / "controllability"),
             s(r / "eval" / "controllability-latent"), s(r / "eval" / "anatomy"),
             s(r / "eval" / "memorisation"), s(r / "eval" / "fidelity"), s(r / "eval" / "forecast"),
             "--probe-run", s(r / "probe"), "--volumes", f"real={r / 'volumes-test'}",
             "--volumes", f"generated={r / 'samples-decoded'}", "--volumes", f"counterfactual={r / 'counterfactuals'}",
             "--title", "BrainG3N demo", "--out", s(r / "eval" / "report")]]),
    ]
    return stages


def first_visit_keys(latents: Path, modality: str, n: int, diagnosis: str | None = None) -> list[str]:
    """Keys of the first session of up to ``n`` subjects (deterministic: sorted by key)."""
    metas = ShardSet.open(latents).metadata()
    first: dict[str, tuple[float, str]] = {}
    for key, m in sorted(metas.items()):
        if m.modality != modality or (diagnosis and m.diagnosis != diagnosis) or m.age is None:
            continue
        if m.subject not in first or m.age < first[m.subject][0]:
            first[m.subject] = (m.age, key)
    keys = sorted(k for _, k in first.values())[:n]
    if not keys:
        raise StageFailed(f"{latents}: no {modality} latents{f' with diagnosis {diagnosis}' if diagnosis else ''} to start from")
    return keys


def headline(run: Path) -> list[str]:
    """The figures printed at the end: probe scores on the main tasks, controllability, the age
    sweep, the known anatomy, memorisation, fidelity and forecasts, read from the stages' own result files."""
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

    def load(name: str, folder: str | None = None) -> dict:
        f = run / "eval" / (folder or name) / f"{name}.json"
        return json.loads(f.read_text()).get("results", {}) if f.is_file() else {}

    for folder, space in (("controllability", "decoded + re-encoded"), ("controllability-latent", "latent space")):
        ctrl = load("controllability", folder)
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
    for name, r in (load("anatomy").get("effects") or {}).items():
        real = (r.get("real") or {}).get("difference")
        if real is not None and (r.get("paired") or {}).get("n_groups"):
            keeps = r.get("recon_keeps")
            kept = f"; tokenizer reconstructions keep {100 * keeps:.0f} % of the real change" if keeps is not None else ""
            lines.append(f"anatomy (no probe) {name} {r['signature']} (expected to {r['expect']}): real change "
                         f"{real:+.2f}{_paired(r['paired'], 'change')}{kept}")
    mem = load("memorisation")
    if mem:
        lines.append(f"memorisation: {'FOUND' if mem.get('memorisation') else 'none found'} "
                     f"(ratio of mean NN distances {mem.get('ratio_of_means', float('nan')):.2f})")
    fd = (load("fidelity").get("encoder_fd") or {})
    if fd:
        lines.append("encoder Frechet distance: " + ", ".join(f"{k} {v:.2f}" for k, v in fd.items()))
    fc = (load("forecast").get("age") or {})
    if fc:
        real = fc.get("real_followups") or {}
        seen = (f"; on {real['n']} decoded real follow-up pairs ({real['mean_interval']:.1f} y apart on average) the "
                f"probe sees {real['n_older']}/{real['n']} older (p {real['p']:.2g})"
                + (": blind, cannot judge the forecasts" if real["blind"] else "")) if real.get("n") else ""
        lines.append(f"forecasts: brain-age change vs requested interval slope {fc['slope']:.2f}, r {fc['pearson_r']:.2f}"
                     f"{_paired(fc.get('paired'), 'slope')}{seen}")
    return lines


def _paired(pair: dict | None, what: str) -> str:
    """'; paired: 8/8 moved toward the request (shift +0.11, p 0.004)' for a summary line."""
    if not pair or not pair.get("n_groups"):
        return ""

    def num(v: float | None, fmt: str) -> str:  # NaN is written to JSON as null
        return "n/a" if v is None or v != v else format(v, fmt)

    return (f"; paired: {pair['n_moved']}/{pair['n_groups']} moved toward the request "
            f"({what} {num(pair.get(f'mean_{what}'), '+.2f')}, p {num(pair.get('p'), '.3f')})")


def run_demo(cfg: DemoConfig, force: bool = False, until: str | None = None) -> Path:
    run = cfg.run_dir.resolve()
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run / "demo-config.json", cfg.model_dump_json(indent=2).encode())
    atomic_write_bytes(run / "requests.jsonl", b"".join(
        json.dumps({**req, "n": cfg.samples_per_request}).encode() + b"\n" for req in SAMPLE_REQUESTS))
    stages = build_stages(cfg)
    names = [st.name for st in stages]
    if until is not None and until not in names:
        raise SystemExit(f"--until: unknown stage {until!r}; stages: {', '.join(names)}")
    t = time.perf_counter()
    run_stages(run, stages, force=force, until=until)
    print(f"\nBrainG3N demo finished in {time.perf_counter() - t:.0f} s; run folder {run}")
    report = run / "eval" / "report" / "index.html"
    if report.is_file():
        print(f"report: {report}")
    for line in headline(run):
        print("  " + line)
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="g3n-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=None,
                   help=f"run folder (default: the config's run_dir, else {DemoConfig().run_dir})")
    p.add_argument("--config", type=Path, help="JSON/YAML DemoConfig; flags override it")
    p.add_argument("--subjects", type=int, help="synthetic subjects")
    p.add_argument("--seed", type=int, help="seed of every stage (the synthetic cohort, training, sampling)")
    p.add_argument("--workers", type=int, help="parallel processes for data stages")
    p.add_argument("--no-real", action="store_true", help="leave out the real IXI volumes")
    p.add_argument("--force", action="store_true", help="redo stages even if they are done")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    args = p.parse_args(argv)
    data: dict = {}
    if args.config:
        import yaml

        data = yaml.safe_load(args.config.read_text()) or {}
    if args.run_dir is not None:
        data["run_dir"] = args.run_dir
    for k in ("subjects", "seed", "workers"):
        if getattr(args, k) is not None:
            data[k] = getattr(args, k)
    if args.no_real:
        data["real"] = False
    cfg = DemoConfig.model_validate(data)
    try:
        run_demo(cfg, force=args.force, until=args.until)
    except StageFailed as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
