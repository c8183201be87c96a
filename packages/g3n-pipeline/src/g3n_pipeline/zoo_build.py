"""`g3n-zoo-build`: rebuild the shipped models (g3n-zoo) from scratch, then pack them.

The models are trained on the demo cohort's **train split only** (the same synthetic cohort, IXI
volumes, seed and subject-level split as `g3n-demo`), each with the stage's own command, for as
long as they need on a CPU (hours). The MAE may pretrain on more: `mae_extra_subjects` adds
synthetic subjects drawn with another seed (new subjects, never the demo's test split), and
`mae_seeds` trains one MAE per seed and keeps the best on a validation set of new subjects
(mae_select.py), as one seed's brain age is a draw. The run folder works like the demo's: each
stage leaves a marker, a re-run skips finished stages, and a killed trainer resumes from its last
checkpoint.

    cohort (as g3n-demo) ─▶ volumes-train ─▶ mae ─▶ tokenizer (MAE-CNN) ─▶ latents-train ─▶ dit
                                   │                    │                         └──▶ bridge
                                   │                    └─▶ tokenizer-decoder ──────┐
                                   └──▶ tokenizer-baseline ─▶ tokenizer-baseline-2 ─┴▶ tokenizers (Table 5 in kind)

Each tokenizer trains in two stages. The MAE-CNN's: projection and decoder together, then (from the
best epoch, at half the learning rate, on mirrored volumes too) the decoder alone. The projection is
frozen in the second stage, so the latents the generator and the bridge train on are the first
stage's, whichever decoder ships. The AutoencoderKL baseline's second stage continues the whole
autoencoder the same way for about the same CPU time, so Table 5 compares equal budgets.

`--pack` (after the last stage) writes each model's weights (fp16), its config, its model card
and the exact command into the zoo folder, and the manifest with every file's SHA-256
(`zoo_pack.py`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from g3n_shards import atomic_write_bytes

from . import mae_select
from .demo import DemoConfig, build_stages, raw_voxel_baseline
from .demo_inputs import zoo_file as zoo_file  # re-exported: zoo_build.zoo_file was public
from .runner import Stage, StageFailed, config_data, run_stages

#: the demo stages that make the cohort the models are trained on
COHORT_STAGES = ("synth", "real", "cohort")
#: the MAE's pretraining set when it has extra subjects (ZooConfig.mae_extra_subjects)
MAE_DATA = "volumes-mae"
#: the extra subjects' ID prefix (pre00000, ...): their keys must not collide with the cohort's syn00000, ...
MAE_EXTRA_PREFIX = "pre"
#: the validation subjects' ID prefix (val00000, ...), when the MAE is chosen among seeds (ZooConfig.mae_seeds)
MAE_VAL_PREFIX = "val"
#: the shipped models, by name
MODELS = ("mae", "mae-cnn", "autoencoderkl", "dit", "bridge")
#: the stages each model needs besides the cohort's (and mae-data with the MAE): `--only` runs no others
MODEL_STAGES = {
    "mae": ("mae",),
    "mae-cnn": ("mae", "tokenizer", "tokenizer-decoder", "tokenizers"),
    "autoencoderkl": ("tokenizer-baseline", "tokenizer-baseline-2", "tokenizers"),
    "dit": ("mae", "tokenizer", "dit"),
    "bridge": ("mae", "tokenizer", "bridge"),
}
#: what a model is trained on: the MAE-CNN wraps the MAE's encoder; the generator and the bridge learn
#: the MAE-CNN's latents. A zoo that mixes models of two runs must agree along these links.
UPSTREAM = {"mae-cnn": "mae", "dit": "mae-cnn", "bridge": "mae-cnn"}


class ZooConfig(BaseModel):
    """Training lengths of the shipped models (the architectures are the demo's presets)."""

    model_config = ConfigDict(extra="forbid")
    run_dir: Path = Path("runs/zoo")
    seed: int = 2025
    subjects: int = Field(100, ge=12, description="synthetic subjects of the cohort (the demo's)")
    real: bool = Field(True, description="include the IXI volumes, as the demo does")
    mae_steps: int = Field(3000, ge=1, description="MAE pretraining steps (batch 4)")
    mae_warmup: int = Field(200, ge=0, description="MAE warm-up steps (at most mae_steps)")
    mae_extra_subjects: int = Field(
        0, ge=0, description="synthetic subjects pretrained on besides the train split (the MAE only): drawn with "
        f"mae_extra_seed, named {MAE_EXTRA_PREFIX}00000, ...; 0: the train split alone")
    mae_extra_seed: int = Field(4242, description="seed of the extra subjects (must differ from seed: the same seed "
                                "would draw the cohort's own subjects again, its test split among them)")
    mae_seeds: list[int] = Field(
        default_factory=list, description="train one MAE candidate per seed (each its own resumable stage, mae-s<SEED>) "
        "and keep the one the probe panel scores best on a validation set of new synthetic subjects (mae_select.py); "
        "empty: one MAE, trained with seed")
    mae_val_subjects: int = Field(200, ge=40, description="synthetic subjects of the validation set the MAE candidates "
                                  "are chosen on (with mae_seeds)")
    mae_val_seed: int = Field(9001, description="seed of the validation subjects (named val00000, ...): it must differ "
                              "from seed and mae_extra_seed, so that no model trained on them")
    tokenizer_config: str = Field("tokenizer-mae-cnn.yaml", description="MAE-CNN training config (g3n_pipeline/zoo/)")
    tokenizer_epochs: int | None = Field(None, ge=1, description="override the config's max_epochs")
    tokenizer_steps_per_epoch: int | None = Field(None, ge=1, description="override the config's steps_per_epoch")
    tokenizer_decoder_config: str | None = Field(
        "tokenizer-mae-cnn-decoder.yaml", description="the MAE-CNN tokenizer's second stage: the decoder alone trains "
        "on from the first stage's best epoch (g3n_pipeline/zoo/; it must freeze 'proj'); null: one stage")
    baseline_tokenizer_stage2_config: str | None = Field(
        "tokenizer-autoencoderkl-2.yaml", description="the AutoencoderKL baseline's second stage, from its first "
        "stage's best epoch (g3n_pipeline/zoo/); null: one stage")
    baseline_tokenizer_config: str = Field("tokenizer-autoencoderkl.yaml",
                                           description="AutoencoderKL baseline training config (g3n_pipeline/zoo/)")
    dit_steps: int = Field(6000, ge=1, description="generator steps (batch 8)")
    bridge_steps: int = Field(2500, ge=1, description="longitudinal bridge steps (batch 8)")
    dit_preset: str = "small"
    bridge_preset: str = "small"
    bridge_config: str = Field("bridge.yaml", description="the bridge's settings (g3n_pipeline/zoo/), shared with the demo")

    @model_validator(mode="after")
    def _extra_subjects_are_new(self) -> "ZooConfig":
        if self.mae_extra_subjects and self.mae_extra_seed == self.seed:
            raise ValueError(f"mae_extra_seed must differ from seed ({self.seed}): the same seed draws the demo "
                             "cohort's subjects again, test split included")
        if self.mae_seeds:
            if len(set(self.mae_seeds)) != len(self.mae_seeds):
                raise ValueError(f"mae_seeds repeats a seed: {self.mae_seeds}")
            trained = {self.seed, *([self.mae_extra_seed] if self.mae_extra_subjects else [])}
            if self.mae_val_seed in trained:
                raise ValueError(f"mae_val_seed ({self.mae_val_seed}) must differ from seed and mae_extra_seed: the "
                                 "validation subjects would be subjects a model trained on")
        return self


def tokenizer_folders(cfg: ZooConfig, name: str) -> tuple[str, ...]:
    """The run folders of a shipped tokenizer's training stages, in order (each later one starts
    from the one before); the last one's best epoch is what ships."""
    if name == "mae-cnn":
        return ("tokenizer", "tokenizer-decoder") if cfg.tokenizer_decoder_config else ("tokenizer",)
    return ("tokenizer-akl", "tokenizer-akl-2") if cfg.baseline_tokenizer_stage2_config else ("tokenizer-akl",)


def _check_decoder_stage(cfg: ZooConfig) -> None:
    """The second stage must keep the projection: ``latents-train`` is encoded by the first."""
    from g3n_tokenizer.config import load_config

    if not cfg.tokenizer_decoder_config:
        return
    path = zoo_file(cfg.tokenizer_decoder_config)
    if "proj" not in load_config(path).train.freeze:
        raise StageFailed(f"{path}: the tokenizer's decoder stage must freeze 'proj' (train: freeze: [proj]); "
                          "latents-train, and the generator and bridge trained on it, come from the first stage")


def build_zoo_stages(cfg: ZooConfig, only: Collection[str] | None = None, zoo: Path | None = None) -> list[Stage]:
    """The build's stages. ``only``: just the stages these models need (MODEL_STAGES); Table 5's arm
    of a tokenizer not rebuilt is then the one in ``zoo`` (default: the shipped zoo), the one kept."""
    s = str
    _check_decoder_stage(cfg)
    lengths = [*(["--epochs", str(cfg.tokenizer_epochs)] if cfg.tokenizer_epochs else []),
               *(["--steps-per-epoch", str(cfg.tokenizer_steps_per_epoch)] if cfg.tokenizer_steps_per_epoch else [])]
    if only is not None and zoo is None:
        import g3n_zoo

        zoo = g3n_zoo.root()

    def table5_arm(r: Path, name: str) -> Path:
        """The tokenizer Table 5 scores: this run's last stage, or the zoo's when ``only`` keeps it."""
        if only is None or name in only:
            return r / tokenizer_folders(cfg, name)[-1] / "tokenizer.safetensors"
        return zoo / name / "tokenizer.safetensors"

    def train_tokenizer(r: Path, out: str, kind: str, config: str, init: str | None = None) -> list[str]:
        """g3n-tokenizer train into ``out`` (mae-cnn: around the run's MAE; ``init``: a stage's folder to start from)."""
        return ["g3n_tokenizer.cli", "train", "--volumes", s(r / "volumes-train"), "--out", s(r / out), "--tokenizer", kind,
                *(["--mae-checkpoint", s(r / "mae" / "export")] if kind == "mae-cnn" else []),
                *(["--init", s(r / init / "tokenizer.safetensors")] if init else []),
                "--config", s(zoo_file(config)), "--resume", *lengths]

    demo = DemoConfig(run_dir=cfg.run_dir, seed=cfg.seed, subjects=cfg.subjects, real=cfg.real,
                      from_scratch=True)  # only its cohort stages are used
    stages = [st for st in build_stages(demo) if st.name in COHORT_STAGES]
    seed = str(cfg.seed)
    if cfg.mae_extra_subjects:
        stages.append(Stage(
            "mae-data", f"the MAE's pretraining set: the train split and {cfg.mae_extra_subjects} more synthetic "
            "subjects of another seed (g3n-data synth, g3n-shards merge)", [MAE_DATA], lambda r: [
                ["g3n_data.cli", "synth", "--out", s(r / "volumes-extra"), "--subjects", str(cfg.mae_extra_subjects),
                 "--seed", str(cfg.mae_extra_seed), "--subject-prefix", MAE_EXTRA_PREFIX, "--geometry", "demo",
                 "--workers", str(demo.workers), "--overwrite"],
                ["g3n_shards.cli", "merge", s(r / MAE_DATA), s(r / "volumes-train"), s(r / "volumes-extra"),
                 "--overwrite"]]))
    mae_data = MAE_DATA if cfg.mae_extra_subjects else "volumes-train"

    def train_mae(r: Path, folder: str, mae_seed: int) -> list[list[str]]:
        return [["g3n_mae.cli", "train", "--preset", "tiny", "--data", s(r / mae_data), "--run-dir", s(r / folder),
                 "--steps", str(cfg.mae_steps), "--warmup", str(min(cfg.mae_warmup, cfg.mae_steps)), "--engine", "torch",
                 "--seed", str(mae_seed), "--no-tensorboard", "--norm-pix-loss", "--log-every", "50", "--ckpt-every",
                 "500", "--keep-last", "2", "--resume"],
                ["g3n_mae.cli", "export", s(r / folder), s(r / folder / "export")]]

    if not cfg.mae_seeds:
        stages.append(Stage("mae", "3D MAE pretraining, tiny preset (g3n-mae train, export)", ["mae/export"],
                            lambda r: train_mae(r, "mae", cfg.seed)))
    else:
        stages += mae_candidate_stages(cfg, train_mae, demo.workers)
    stages += [
        Stage("tokenizer", "MAE-CNN tokenizer, tiny preset (g3n-tokenizer train, encode)",
              ["tokenizer/tokenizer.safetensors", "latents-train"], lambda r: [
            train_tokenizer(r, "tokenizer", "mae-cnn", cfg.tokenizer_config),
            ["g3n_tokenizer.cli", "encode", "--volumes", s(r / "volumes-train"), "--checkpoint",
             s(r / "tokenizer" / "tokenizer.safetensors"), "--out", s(r / "latents-train"), "--overwrite"]],
              # the training config's content, not only its path: an edited config trains again
              external=[zoo_file(cfg.tokenizer_config)]),
        *([Stage("tokenizer-decoder", "MAE-CNN tokenizer, second stage: the decoder alone (g3n-tokenizer train --init)",
                 ["tokenizer-decoder/tokenizer.safetensors"], lambda r: [
            train_tokenizer(r, "tokenizer-decoder", "mae-cnn", cfg.tokenizer_decoder_config, init="tokenizer")],
                 external=[zoo_file(cfg.tokenizer_decoder_config)])] if cfg.tokenizer_decoder_config else []),
        Stage("tokenizer-baseline", "AutoencoderKL baseline tokenizer, tiny preset (g3n-tokenizer train)",
              ["tokenizer-akl/tokenizer.safetensors"], lambda r: [
            train_tokenizer(r, "tokenizer-akl", "autoencoderkl", cfg.baseline_tokenizer_config)],
              external=[zoo_file(cfg.baseline_tokenizer_config)]),
        *([Stage("tokenizer-baseline-2", "AutoencoderKL baseline tokenizer, second stage (g3n-tokenizer train --init)",
                 ["tokenizer-akl-2/tokenizer.safetensors"], lambda r: [
            train_tokenizer(r, "tokenizer-akl-2", "autoencoderkl", cfg.baseline_tokenizer_stage2_config,
                            init="tokenizer-akl")],
                 external=[zoo_file(cfg.baseline_tokenizer_stage2_config)])] if cfg.baseline_tokenizer_stage2_config else []),
        Stage("tokenizers", "the two tokenizers side by side on the held-out split (g3n-eval tokenizers)",
              ["tokenizers/tokenizers.json"], lambda r: [
            ["g3n_eval.cli", "tokenizers", "--arm", "MAE-CNN c=32", "mae-cnn", s(table5_arm(r, "mae-cnn")),
             "--arm", "AutoencoderKL", "autoencoderkl", s(table5_arm(r, "autoencoderkl")),
             "--volumes", s(r / "volumes"), "--heldout", s(r / "volumes-test"), "--out", s(r / "tokenizers")]],
              external=[table5_arm(cfg.run_dir, n) for n in ("mae-cnn", "autoencoderkl") if only is not None and n not in only]),
        # g3n-dit train continues from its last checkpoint by itself: a killed stage keeps it (resumable)
        Stage("dit", f"conditional flow-matching DiT, {cfg.dit_preset} preset (g3n-dit train)", ["dit"], resumable=True,
              commands=lambda r: [
            ["g3n_dit.cli", "train", "--latents", s(r / "latents-train"), "--out", s(r / "dit"),
             "--preset", cfg.dit_preset, "--max-steps", str(cfg.dit_steps), "--seed", seed, "--precision", "auto"]]),
        Stage("bridge", f"longitudinal bridge, {cfg.bridge_preset} preset (g3n-dit train-longitudinal)", ["dit-long"],
              resumable=True, commands=lambda r: [
            ["g3n_dit.cli", "train-longitudinal", "--latents", s(r / "latents-train"), "--out", s(r / "dit-long"),
             "--preset", cfg.bridge_preset, "--config", s(zoo_file(cfg.bridge_config)), "--max-steps",
             str(cfg.bridge_steps), "--seed", seed]], external=[zoo_file(cfg.bridge_config)]),
    ]
    if only is not None:
        need = {*COHORT_STAGES, *(st for m in only for st in MODEL_STAGES[m])}
        stages = [st for st in stages if st.name in need or (st.name.startswith("mae-") and "mae" in need)]
    return stages


def mae_candidate_folders(cfg: ZooConfig) -> list[str]:
    """The run folders of the MAE candidates (``mae-s<SEED>``), one per seed of ``mae_seeds``."""
    return [f"mae-s{seed}" for seed in cfg.mae_seeds]


def mae_candidate_stages(cfg: ZooConfig, train_mae: Callable[[Path, str, int], list[list[str]]],
                         workers: int) -> list[Stage]:
    """With ``mae_seeds``: the validation set and the raw voxels' probe panel on it (``mae-val``), one
    stage per candidate (train, export, encode the validation set, probe panel: ``mae-s<SEED>``), and
    the ``mae`` stage that keeps the best by mae_select.py's rule in ``mae/export``."""
    s = str
    tasks = ",".join(t for t, _, _ in mae_select.TASKS.values())
    stages = [Stage(
        "mae-val", f"the MAE candidates' validation set: {cfg.mae_val_subjects} new synthetic subjects (seed "
        f"{cfg.mae_val_seed}), and the raw voxels' probe panel on it (g3n-data synth, g3n-eval raw-features, g3n-probe run)",
        ["mae-val/volumes", "mae-val/probe-raw"], lambda r: [
            ["g3n_data.cli", "synth", "--out", s(r / "mae-val" / "volumes"), "--subjects", str(cfg.mae_val_subjects),
             "--seed", str(cfg.mae_val_seed), "--subject-prefix", MAE_VAL_PREFIX, "--geometry", "demo",
             "--workers", str(workers), "--overwrite"],
            *raw_voxel_baseline(r / "mae-val" / "volumes", r / "mae-val", tasks)],
        owns=["mae-val"])]
    for seed, folder in zip(cfg.mae_seeds, mae_candidate_folders(cfg)):
        stages.append(Stage(
            folder, f"MAE candidate, seed {seed}: pretraining as the mae stage, then the probe panel on the validation "
            "set (g3n-mae train, export, encode; g3n-probe run)", [f"{folder}/export", f"{folder}/probe-val"],
            lambda r, folder=folder, seed=seed: [
                *train_mae(r, folder, seed),
                ["g3n_mae.cli", "encode", s(r / folder / "export"), "--volumes", s(r / "mae-val" / "volumes"),
                 "--out", s(r / folder / "tokens-val"), "--store", "mean", "--overwrite"],
                ["g3n_probe.cli", "run", s(r / folder / "tokens-val"), "--out", s(r / folder / "probe-val"),
                 "--name", f"MAE seed {seed}", "--tasks", tasks, "--quiet"]]))
    stages.append(Stage(
        "mae", f"the MAE kept: of {len(cfg.mae_seeds)} candidates, the best on the validation set beside the raw voxels "
        "(g3n_pipeline.mae_select)", ["mae/export", "mae/selection.json"], lambda r: [
            ["g3n_pipeline.mae_select", "--raw", s(r / "mae-val" / "probe-raw"), "--out", s(r / "mae"),
             *(s(r / f) for f in mae_candidate_folders(cfg))]]))
    return stages


def main(argv: list[str] | None = None) -> int:
    from .zoo_pack import check_links, pack  # zoo_pack imports this module

    p = argparse.ArgumentParser(prog="g3n-zoo-build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, help=f"run folder (default {ZooConfig().run_dir})")
    p.add_argument("--config", type=Path, help="YAML/JSON ZooConfig (training lengths)")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.add_argument("--pack", type=Path, nargs="?", const=Path("-"), metavar="ZOO_DIR",
                   help="after the last stage, write the models into ZOO_DIR (default: the g3n-zoo package's weights "
                        "folder, i.e. replace the shipped models)")
    p.add_argument("--only", nargs="+", choices=MODELS, metavar="MODEL",
                   help=f"with --pack: train and write only these models ({', '.join(MODELS)}); the others stay as "
                        "they are in ZOO_DIR, and Table 5 scores a kept tokenizer from there. A model must be rebuilt "
                        "with the one it is trained on (a new mae needs a new mae-cnn, dit and bridge)")
    a = p.parse_args(argv)
    if a.only and a.pack is None:
        p.error("--only goes with --pack")
    cfg = ZooConfig.model_validate(config_data(a.config, a.run_dir))
    cfg = cfg.model_copy(update={"run_dir": cfg.run_dir.resolve()})
    zoo, only = None, set(a.only) if a.only else None
    if a.pack is not None:
        import g3n_zoo

        zoo = g3n_zoo.root() if str(a.pack) == "-" else a.pack.resolve()
    stages = build_zoo_stages(cfg, only, zoo)
    names = [st.name for st in stages]
    if a.until is not None and a.until not in names:
        p.error(f"--until: unknown stage {a.until!r}; stages: {', '.join(names)}")
    if only is not None:
        if not (zoo / "manifest.json").is_file():
            p.error(f"--only keeps the other models of the zoo in {zoo}, and there is none; leave out --only to "
                    "pack every model")
        try:
            check_links(cfg.run_dir, zoo, only)
        except StageFailed as e:
            p.error(str(e))
        # the Table 5 stage reads a kept tokenizer from the zoo (its external files)
        missing = [f.parent.name for st in stages if st.name == "tokenizers" for f in st.external if not f.is_file()]
        if missing:
            p.error(f"--only: Table 5 scores the kept {missing[0]} from {zoo}, which has none; add {missing[0]} to --only")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cfg.run_dir / "zoo-config.json", cfg.model_dump_json(indent=2).encode())
    t = time.perf_counter()
    try:
        run_stages(cfg.run_dir, stages, until=a.until)
        if zoo is not None and a.until is None:
            print(f"packed into {pack(cfg, zoo, only)}")
    except StageFailed as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    print(f"g3n-zoo-build finished in {time.perf_counter() - t:.0f} s; run folder {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
