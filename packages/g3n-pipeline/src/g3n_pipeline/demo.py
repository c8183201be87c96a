"""`g3n-demo`: the whole BrainG3N chain on the built-in cohort, on CPU, in one command.

The built-in cohort is the labelled synthetic cohort of `g3n-data synth` plus the 10 real IXI
T1 volumes shipped in this package. Every training stage starts from the shipped models (g3n-zoo,
trained for hours on the same cohort's train split) and trains briefly, so every training path
runs; `--from-scratch` trains everything from random initialisation instead (about twice
as long, and the models barely learn). Every stage is one of the stage packages' own commands;
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
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from g3n_shards import atomic_write_bytes

from g3n_mae.config import preset as mae_preset

from .demo_inputs import TEST_SPLITS as TEST_SPLITS  # re-exported: demo.TEST_SPLITS was public
from .demo_inputs import _check_zoo_data as _check_zoo_data
from .demo_inputs import (_split_cohort, _split_subsets, first_visit_keys, ixi_csv, recon_keys, shipped, shipped_table5,
                          zoo_file)
from .headline import BASELINE_ROWS as BASELINE_ROWS  # re-exported: the headline's names stay importable here
from .headline import HEADLINE_PROBES, headline
from .headline import _paired as _paired
from .headline import _scores as _scores
from .headline import baseline_lines as baseline_lines
from .headline import tokenizer_lines as tokenizer_lines
from .runner import Stage, StageFailed, config_data, run_stages

#: The samples the demo asks the generator for: one request per class of each condition, so that
#: the evaluation can compare what was requested with what a probe sees (docs/method.md Table 2a).
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


#: the modalities the synthetic cohort's anatomy effects are measured in (g3n-data synth-anatomy):
#: the only real volumes besides the held-out ones the evaluation decodes
ANATOMY_MODALITIES = ("T1", "T1c")

#: the probe tasks the encoder and its two baselines are compared on (the headline's tasks)
BASELINE_TASKS = "disease,sex,modality,idh1,brain_age"


#: training lengths by mode: from the shipped models (brief: every training path runs) or from scratch
WARM_START = dict(mae_steps=30, mae_lr=1e-4, tokenizer_epochs=1, tokenizer_steps_per_epoch=4, tokenizer_lr=5e-5,
                  dit_steps=25, dit_lr=1e-4, longitudinal_steps=25, longitudinal_lr=1e-4)
FROM_SCRATCH = dict(mae_steps=400, mae_lr=None, tokenizer_epochs=2, tokenizer_steps_per_epoch=20, tokenizer_lr=None,
                    dit_steps=1800, dit_lr=None, longitudinal_steps=200, longitudinal_lr=None)


class DemoConfig(BaseModel):
    """Sizes of the demo run. Training lengths left unset follow the mode (``from_scratch`` or not)."""

    model_config = ConfigDict(extra="forbid")
    run_dir: Path = Path("runs/demo")
    subjects: int = Field(100, ge=12, description="synthetic subjects (100 gives the IDH1 probe 20 glioma subjects)")
    seed: int = 2025
    workers: int = Field(2, ge=1)
    real: bool = Field(True, description="include the 10 real IXI T1 volumes shipped with the package")
    real_skullstrip: str = Field("atlas", description="robex (about 45 s a volume), atlas, or none")
    from_scratch: bool = Field(False, description="train every model from random initialisation instead of "
                               "fine-tuning the shipped ones (g3n-zoo) briefly")
    mae_steps: int | None = Field(None, ge=1, description="MAE training steps (30 fine-tuning, 400 from scratch)")
    mae_lr: float | None = Field(None, gt=0, description="MAE peak learning rate (default: 1e-4 fine-tuning, the preset's from scratch)")
    mae_norm_pix_loss: bool = Field(True, description="MAE target: each patch normalised by its own mean and std")
    tokenizer_epochs: int | None = Field(None, ge=1, description="tokenizer epochs (1 fine-tuning, 2 from scratch)")
    tokenizer_steps_per_epoch: int | None = Field(None, ge=1, description="tokenizer steps per epoch (4 fine-tuning, 20 from scratch)")
    tokenizer_lr: float | None = Field(None, gt=0, description="tokenizer learning rate (5e-5 fine-tuning, the preset's from scratch)")
    dit_preset: str = Field("small", description="g3n-dit preset of the generator (small: 2x2x2 latent patches)")
    dit_steps: int | None = Field(None, ge=1, description="generator training steps (25 fine-tuning, 1800 from scratch)")
    dit_lr: float | None = Field(None, gt=0, description="generator learning rate (1e-4 fine-tuning, the preset's from scratch)")
    dit_precision: Literal["fp32", "bf16", "auto"] = Field("auto", description="generator training precision "
                                                           "(auto: bf16 on CPUs with AMX and on CUDA)")
    probe_permutations: int = Field(49, ge=0, description="shuffled labellings in each permutation test of a "
                                    "reported probe score (0 skips the tests)")
    longitudinal_preset: str = Field("small", description="g3n-dit preset of the longitudinal bridge")
    longitudinal_steps: int | None = Field(None, ge=1, description="bridge training steps (25 fine-tuning, 200 from scratch)")
    longitudinal_lr: float | None = Field(None, gt=0, description="bridge learning rate (1e-4 fine-tuning, the preset's from scratch)")
    longitudinal_config: str = Field("bridge.yaml", description="the bridge's settings: a YAML file, or one shipped in "
                                     "g3n_pipeline/zoo/ (bridge.yaml: the shipped bridge's)")
    recon_volumes: int = Field(64, ge=1, description="held-out volumes whose reconstructions g3n-eval recon scores")
    anatomy_recon: bool = Field(True, description="decode the real latents of the anatomy's modalities: its effects "
                                "and the decoded-space probes are measured on the tokenizer's reconstructions too")
    samples_per_request: int = 8
    sample_steps: int = Field(18, ge=1, description="Euler steps of each sample (g3n-dit sample's default is 50): on "
                              "the demo's generator 18 steps move the same anatomy rows as 25, in 70 % of the time")
    forecast_steps: int = Field(25, ge=1, description="Euler steps of each forecast segment (g3n-dit forecast's "
                                "default is 100; the bridge's field is nearly straight: 25 steps change the demo's "
                                "forecasts by 0.5 % of their change, in a quarter of the time)")
    sample_guidance_for: dict[str, float] = Field(
        default_factory=lambda: {"idh1": 3.0},
        description="per-condition guidance scales of the samples (the rest: 1.5). IDH1's lesion site is the "
                    "generator's weakest effect (about 20 glioma subjects); at 3 it moves in 7 of 8 pairs, at 1.5 in 6")

    @model_validator(mode="after")
    def _lengths(self) -> "DemoConfig":
        for k, v in (FROM_SCRATCH if self.from_scratch else WARM_START).items():
            if getattr(self, k) is None and v is not None:
                setattr(self, k, v)
        return self


def _ext(init: dict[str, Path], name: str) -> list[Path]:
    return [init[name]] if name in init else []


def _lr(flag: str, value: float | None) -> list[str]:
    return [flag, repr(value)] if value is not None else []


def raw_voxel_baseline(volumes: Path, out: Path, tasks: str) -> list[list[str]]:
    """The encoder's raw-voxel baseline: downsampled voxels (``out/raw-voxels``) through the probe
    panel (``out/probe-raw``), reduced by PCA in each fold to the tiny encoder's width, so both
    probes see as many features."""
    width = mae_preset("tiny").model.embed_dim
    return [["g3n_eval.cli", "raw-features", "--volumes", str(volumes), "--out", str(out / "raw-voxels")],
            ["g3n_probe.cli", "run", str(out / "raw-voxels"), "--out", str(out / "probe-raw"),
             "--name", f"raw voxels (PCA {width})", "--pca", str(width), "--tasks", tasks]]


def build_stages(cfg: DemoConfig) -> list[Stage]:
    s = str  # paths become command-line strings
    w = str(cfg.workers)
    # the shipped models each training stage starts from (checked against the zoo's manifest)
    init = {} if cfg.from_scratch else {name: shipped(name) for name in ("mae", "mae-cnn", "dit", "bridge")}
    table5 = None if cfg.from_scratch else shipped_table5()
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
              after=lambda r: _split_cohort(r, check_zoo=not cfg.from_scratch)),
        Stage("mae", f"3D MAE {'pretraining' if cfg.from_scratch else 'fine-tuning'}, tiny preset (g3n-mae train)",
              ["mae/export"], lambda r: [
            ["g3n_mae.cli", "train", "--preset", "tiny", "--data", s(r / "volumes-train"), "--run-dir", s(r / "mae"),
             "--steps", str(cfg.mae_steps), "--engine", "torch", "--seed", str(cfg.seed), "--no-tensorboard",
             "--norm-pix-loss" if cfg.mae_norm_pix_loss else "--no-norm-pix-loss", *_lr("--lr", cfg.mae_lr),
             *(["--warmup", "0", "--init", s(init["mae"])] if init else [])]], external=_ext(init, "mae")),
        Stage("encode", "encode every volume (g3n-mae encode)", ["tokens"], lambda r: [
            ["g3n_mae.cli", "encode", s(r / "mae"), "--volumes", s(r / "volumes"), "--out", s(r / "tokens"),
             "--store", "both", "--overwrite"]]),
        Stage("probe", "the clinical probe panel (g3n-probe run)", ["probe"], lambda r: [
            ["g3n_probe.cli", "run", s(r / "tokens"), "--out", s(r / "probe"), "--name", "BrainG3N-tiny",
             *(["--permutations", str(cfg.probe_permutations),
                "--permute", ",".join(f"{t}/{sl}" for t, sl, _ in HEADLINE_PROBES)] if cfg.probe_permutations else [])]]),
        Stage("baselines", "the encoder's baselines through the same probes: raw voxels (g3n-eval raw-features, "
              "PCA in each fold) and the MAE at random initialisation", ["baselines/probe-raw", "baselines/probe-random"],
              lambda r: [
            *raw_voxel_baseline(r / "volumes", r / "baselines", BASELINE_TASKS),
            ["g3n_mae.cli", "untrained", s(r / "baselines" / "mae-random.safetensors"), "--preset", "tiny",
             "--seed", str(cfg.seed)],
            ["g3n_mae.cli", "encode", s(r / "baselines" / "mae-random.safetensors"), "--volumes", s(r / "volumes"),
             "--out", s(r / "baselines" / "tokens-random"), "--store", "mean", "--overwrite"],
            ["g3n_probe.cli", "run", s(r / "baselines" / "tokens-random"), "--out", s(r / "baselines" / "probe-random"),
             "--name", "MAE at random initialisation", "--tasks", BASELINE_TASKS]]),
        Stage("tokenizer", "MAE-CNN tokenizer, tiny preset (g3n-tokenizer train, encode)",
              ["tokenizer/tokenizer.safetensors", "latents", "latents-train", "latents-test"], lambda r: [
            ["g3n_tokenizer.cli", "train", "--volumes", s(r / "volumes-train"), "--out", s(r / "tokenizer"),
             "--tokenizer", "mae-cnn", "--mae-checkpoint", s(r / "mae"), "--preset", "tiny",
             "--epochs", str(cfg.tokenizer_epochs), "--steps-per-epoch", str(cfg.tokenizer_steps_per_epoch),
             "--seed", str(cfg.seed), *_lr("--lr", cfg.tokenizer_lr),
             *(["--precision", "auto", "--init", s(init["mae-cnn"])] if init else [])],
            ["g3n_tokenizer.cli", "encode", "--volumes", s(r / "volumes"), "--checkpoint",
             s(r / "tokenizer" / "tokenizer.safetensors"), "--out", s(r / "latents"), "--overwrite"]],
              after=lambda r: _split_subsets(r, "latents", "latents"), external=_ext(init, "mae-cnn")),
        Stage("dit", f"conditional flow-matching DiT, {cfg.dit_preset} preset (g3n-dit train, sample; g3n-tokenizer decode)",
              ["dit", "samples", "samples-decoded"], inputs=["requests.jsonl"], external=_ext(init, "dit"), commands=lambda r: [
            ["g3n_dit.cli", "train", "--latents", s(r / "latents-train"), "--out", s(r / "dit"), "--preset", cfg.dit_preset,
             "--max-steps", str(cfg.dit_steps), "--seed", str(cfg.seed), "--precision", cfg.dit_precision,
             *_lr("--lr", cfg.dit_lr), *(["--init", s(init["dit"])] if init else [])],
            ["g3n_dit.cli", "sample", "--checkpoint", s(r / "dit"), "--out", s(r / "samples"),
             "--requests", s(r / "requests.jsonl"), "--steps", str(cfg.sample_steps), "--seed", str(cfg.seed),
             *(a for k, w in sorted(cfg.sample_guidance_for.items()) for a in ("--guidance-for", f"{k}={w:g}")),
             "--paired", "--overwrite"],
            # decoded once here, for every measurement that looks at generated volumes
            ["g3n_tokenizer.cli", "decode", "--latents", s(r / "samples"), "--out", s(r / "samples-decoded"),
             "--format", "volumes", "--overwrite"]]),
        Stage("longitudinal", "longitudinal bridge and forecasts (g3n-dit)", ["dit-long", "forecasts"],
              external=[*_ext(init, "bridge"), zoo_file(cfg.longitudinal_config)], commands=lambda r: [
            ["g3n_dit.cli", "train-longitudinal", "--latents", s(r / "latents-train"), "--out", s(r / "dit-long"),
             "--preset", cfg.longitudinal_preset, "--config", s(zoo_file(cfg.longitudinal_config)),
             "--max-steps", str(cfg.longitudinal_steps), "--seed", str(cfg.seed),
             *_lr("--lr", cfg.longitudinal_lr), *(["--init", s(init["bridge"])] if init else [])],
            ["g3n_dit.cli", "forecast", "--checkpoint", s(r / "dit-long"), "--latents", s(r / "latents-test"),
             "--keys", *first_visit_keys(r / "latents-test", modality="T1", n=8),
             "--intervals", "2", "5", "10", "--steps", str(cfg.forecast_steps), "--out", s(r / "forecasts"),
             "--overwrite"]]),
        Stage("counterfactual", "counterfactuals: HC scans as AD and 10 years older (g3n-dit)", ["counterfactuals"],
              lambda r: [
            ["g3n_dit.cli", "counterfactual", "--checkpoint", s(r / "dit"), "--latents", s(r / "latents-test"),
             "--keys", *first_visit_keys(r / "latents-test", modality="T1", n=4, diagnosis="HC"),
             "--set", "disease=AD", "--set", "age=+10", "--out", s(r / "counterfactuals"), "--overwrite"]]),
        Stage("eval", "evaluation and the HTML report (g3n-eval)", ["eval/report/index.html"],
              external=[table5] if table5 else [], commands=lambda r: [
            *([
                # real latents decoded once (decoding is the evaluation's costly part): those the anatomy
                # effects are measured in, and the held-out volumes the reconstruction metrics score
                ["g3n_tokenizer.cli", "decode", "--latents", s(r / "latents"), "--out", s(r / "eval" / "recon-real"),
                 "--format", "volumes", "--overwrite", "--keys",
                 *recon_keys(r / "latents", r / "volumes-test", ANATOMY_MODALITIES, cfg.recon_volumes)],
                ["g3n_eval.cli", "recon", "--volumes", s(r / "volumes-test"), "--recon", s(r / "eval" / "recon-real"),
                 "--limit", str(cfg.recon_volumes), "--save-recon", "--out", s(r / "eval" / "recon")],
            ] if cfg.anatomy_recon else [
                ["g3n_eval.cli", "recon", "--volumes", s(r / "volumes-test"), "--tokenizer-checkpoint",
                 s(r / "tokenizer" / "tokenizer.safetensors"), "--tokenizer", "mae-cnn", "--limit",
                 str(cfg.recon_volumes), "--save-recon", "--out", s(r / "eval" / "recon")]]),
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
            # the baselines (first T1 visits) and their real follow-ups (held-out volumes) as decoded above,
            # not decoded again
            ["g3n_eval.cli", "forecast", "--forecasts", s(r / "forecasts"), "--baselines",
             s(r / "eval" / "recon-real") if cfg.anatomy_recon else s(r / "latents-test"),
             "--real", s(r / "tokens"), "--encoder", s(r / "mae"), "--anatomy",
             s(r / "eval" / "anatomy-spec" / "anatomy.yaml"), "--out", s(r / "eval" / "forecast")],
            ["g3n_eval.cli", "report", s(r / "eval" / "recon"), s(r / "eval" / "controllability"),
             s(r / "eval" / "controllability-latent"), s(r / "eval" / "anatomy"),
             s(r / "eval" / "memorisation"), s(r / "eval" / "fidelity"), s(r / "eval" / "forecast"),
             *([s(table5)] if table5 else []), "--probe-run", s(r / "probe"), "--probe-run", s(r / "baselines" / "probe-raw"),
             "--probe-run", s(r / "baselines" / "probe-random"), "--volumes", f"real={r / 'volumes-test'}",
             "--volumes", f"generated={r / 'samples-decoded'}", "--volumes", f"counterfactual={r / 'counterfactuals'}",
             "--title", "BrainG3N demo", "--out", s(r / "eval" / "report")]]),
    ]
    return stages


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
    if cfg.from_scratch:
        print("models: trained from random initialisation (--from-scratch)", flush=True)
    else:
        import g3n_zoo

        print(f"models: the shipped ones (g3n-zoo, {g3n_zoo.root()}), fine-tuned briefly; --from-scratch trains them "
              f"from random initialisation.\n  {g3n_zoo.INTENDED_USE}", flush=True)
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
    p.add_argument("--from-scratch", action="store_true", help="train every model from random initialisation instead "
                   "of fine-tuning the shipped ones briefly (about twice as long; the models barely learn)")
    p.add_argument("--force", action="store_true", help="redo stages even if they are done")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    args = p.parse_args(argv)
    data = config_data(args.config, args.run_dir)
    for k in ("subjects", "seed", "workers"):
        if getattr(args, k) is not None:
            data[k] = getattr(args, k)
    if args.no_real:
        data["real"] = False
    if args.from_scratch:
        data["from_scratch"] = True
    cfg = DemoConfig.model_validate(data)
    try:
        run_demo(cfg, force=args.force, until=args.until)
    except StageFailed as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
