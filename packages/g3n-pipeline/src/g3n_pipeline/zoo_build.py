"""`g3n-zoo-build`: rebuild the shipped models (g3n-zoo) from scratch, then pack them.

The models are trained on the demo cohort's **train split only** (the same synthetic cohort, IXI
volumes, seed and subject-level split as `g3n-demo`), each with the stage's own command, for as
long as they need on a CPU (hours). The run folder works like the demo's: each stage leaves a
marker, a re-run skips finished stages, and a killed trainer resumes from its last checkpoint.

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
and the exact command into the zoo folder, and the manifest with every file's SHA-256.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from g3n_shards import ShardSet, atomic_write_bytes, file_sha256

from . import train_split
from .demo import DemoConfig, build_stages
from .demo_inputs import zoo_file as zoo_file  # re-exported: zoo_build.zoo_file was public
from .runner import Stage, StageFailed, config_data, run_stages

#: the demo stages that make the cohort the models are trained on
COHORT_STAGES = ("synth", "real", "cohort")


class ZooConfig(BaseModel):
    """Training lengths of the shipped models (the architectures are the demo's presets)."""

    model_config = ConfigDict(extra="forbid")
    run_dir: Path = Path("runs/zoo")
    seed: int = 2025
    subjects: int = Field(100, ge=12, description="synthetic subjects of the cohort (the demo's)")
    real: bool = Field(True, description="include the IXI volumes, as the demo does")
    mae_steps: int = Field(3000, ge=1, description="MAE pretraining steps (batch 4)")
    mae_warmup: int = Field(200, ge=0, description="MAE warm-up steps (at most mae_steps)")
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


def build_zoo_stages(cfg: ZooConfig) -> list[Stage]:
    s = str
    _check_decoder_stage(cfg)
    lengths = [*(["--epochs", str(cfg.tokenizer_epochs)] if cfg.tokenizer_epochs else []),
               *(["--steps-per-epoch", str(cfg.tokenizer_steps_per_epoch)] if cfg.tokenizer_steps_per_epoch else [])]
    mae_cnn, akl = tokenizer_folders(cfg, "mae-cnn")[-1], tokenizer_folders(cfg, "autoencoderkl")[-1]

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
    stages += [
        Stage("mae", "3D MAE pretraining, tiny preset (g3n-mae train, export)", ["mae/export"], lambda r: [
            ["g3n_mae.cli", "train", "--preset", "tiny", "--data", s(r / "volumes-train"), "--run-dir", s(r / "mae"),
             "--steps", str(cfg.mae_steps), "--warmup", str(min(cfg.mae_warmup, cfg.mae_steps)), "--engine", "torch", "--seed", seed, "--no-tensorboard",
             "--norm-pix-loss", "--log-every", "50", "--ckpt-every", "500", "--keep-last", "2", "--resume"],
            ["g3n_mae.cli", "export", s(r / "mae"), s(r / "mae" / "export")]]),
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
            ["g3n_eval.cli", "tokenizers", "--arm", "MAE-CNN c=32", "mae-cnn", s(r / mae_cnn / "tokenizer.safetensors"),
             "--arm", "AutoencoderKL", "autoencoderkl", s(r / akl / "tokenizer.safetensors"),
             "--volumes", s(r / "volumes"), "--heldout", s(r / "volumes-test"), "--out", s(r / "tokenizers")]]),
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
    return stages


# ---- packing ----------------------------------------------------------------------------------
def machine_description() -> str:
    """'CPU model, N cores (widest vector ISA)': speed on CPU depends on AMX / AVX-512 more than on the model name."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.processor() or platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("amx_tile", "AMX")) if flag in flags]
    return f"{cpu}, {os.cpu_count()} cores" + (f" ({', '.join(isa)})" if isa else "")


#: a tensor is stored in fp16 only if that changes none of its values by more than this share of its
#: largest magnitude; tensors of tiny values (fp16 subnormals, e.g. a zero-initialised layer early in
#: training) stay fp32
FP16_TOLERANCE = 1e-3


def _to_fp16(src: Path, dst: Path, run: Path, keep_fp32: Callable[[str], bool] = lambda k: False) -> dict[str, Any]:
    """Copy a safetensors file with its float tensors in fp16 (metadata kept, the run folder's path in
    it written as $RUN, e.g. a warm start's ``init``); returns what that cost: the largest relative
    round-trip error of a tensor stored in fp16, and the tensors kept in fp32."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = {k: v.replace(str(run), "$RUN") for k, v in (f.metadata() or {}).items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out, worst, kept = {}, 0.0, []
    for k, v in tensors.items():
        if v.is_floating_point() and not keep_fp32(k):
            h = v.half()
            scale = float(v.abs().max()) or 1.0
            err = float((h.float() - v.float()).abs().max()) / scale if torch.isfinite(h).all() else float("inf")
            if err <= FP16_TOLERANCE:
                out[k], worst = h.contiguous(), max(worst, err)
                continue
            kept.append(k)
        out[k] = v.contiguous()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    save_file(out, str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # shipped files are read by everyone
    os.replace(tmp, dst)
    return {"dtype": "float16", "max_relative_roundtrip_error": worst, "kept_fp32": kept}


def _rate_minutes(metrics: Path, batch: int, rate_key: str) -> float | None:
    """Training time from a trainer's log: each logged window's steps x batch / its throughput.
    (Read from the log rather than timed by the runner, so a run killed and resumed counts whole.)"""
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    total, prev = 0.0, 0
    for r in rows:
        if r.get(rate_key):
            total += (r["step"] - prev) * batch / r[rate_key]
        prev = r["step"]
    return round(total / 60, 1) if total else None


def _portable(arg: str, run: Path) -> str:
    """A command-line argument without this machine's paths: the run folder becomes $RUN and a file of
    the repository (e.g. a config shipped in a package) its path from the repository's root."""
    if arg.startswith(str(run)):
        return "$RUN" + arg[len(str(run)):]
    if arg.startswith("/") and "/packages/" in arg:
        return "packages/" + arg.split("/packages/", 1)[1]
    return arg


def _scrub_paths(obj: Any, run: Path) -> Any:
    """Every string of a JSON-able record with this machine's paths made portable (see _portable)."""
    if isinstance(obj, dict):
        return {k: _scrub_paths(v, run) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub_paths(v, run) for v in obj]
    return _portable(obj, run) if isinstance(obj, str) else obj


def _command(stage: Stage, run: Path) -> list[str]:
    return [" ".join(shlex.quote(_portable(a, run)) for a in ["python", "-m", *argv]) for argv in stage.commands(run)]


def _data(run: Path) -> dict[str, Any]:
    ss = ShardSet.open(run / "volumes-train")
    metas = ss.metadata()
    return {"set": "volumes-train: the demo cohort's train split (g3n-demo's synthetic cohort, seed 2025, and the IXI "
                   "T1 volumes), never its test split", "digest": ss.digest, "volumes": len(metas),
            "subjects": len({(m.cohort, m.subject) for m in metas.values()})}


def _write_card(folder: Path, card: dict[str, Any]) -> None:
    from g3n_zoo import INTENDED_USE

    card = {"intended_use": INTENDED_USE, **card}
    atomic_write_bytes(folder / "card.json", (json.dumps(card, indent=1) + "\n").encode())
    tr = card["training"]
    lines = [f"# {card['name']}: {card['title']}", "", f"**Intended use.** {card['intended_use']}", "",
             f"- loads with: {card['stage']} (`{card['load']}` in this folder)",
             f"- data: {card['data']['set']}; {card['data']['volumes']} volumes of {card['data']['subjects']} subjects, "
             f"set digest `{card['data']['digest']}`",
             f"- training: {tr['steps']} steps, {tr.get('wall_minutes', '?')} min of training (from the trainer's log) on "
             f"{tr['machine']}, "
             f"built {tr['built']}",
             "- final losses: " + ", ".join(f"{k} {v:.4g}" for k, v in tr["final"].items() if isinstance(v, (int, float))),
             *(["- training stages, each from the one before: " + ", then ".join(
                 f"{st['folder']} (best epoch {st['best_epoch']}, val_loss {st['val_loss']:.4g})"
                 for st in tr["final"]["stages"])] if tr["final"].get("stages") else []),
             f"- weights: {card['weights']['dtype']} (largest relative round-trip error of a tensor "
             f"{card['weights']['max_relative_roundtrip_error']:.1e}; kept in fp32, their values too small for fp16: "
             f"{', '.join(card['weights']['kept_fp32']) or 'none'})",
             "- config: `config.json`", "",
             "Rebuild every shipped model from scratch with `uv run g3n-zoo-build --pack` (hours on CPU). This model's "
             "commands in that run (`$RUN` = its run folder):", "", "```", *card["command"], "```", ""]
    atomic_write_bytes(folder / "card.md", "\n".join(lines).encode())


def _tail_metrics(path: Path, keys: tuple[str, ...]) -> dict[str, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out: dict[str, float] = {}
    for k in keys:
        vals = [r[k] for r in rows[-5:] if isinstance(r.get(k), (int, float))]
        if vals:
            out[f"{k} (mean of the last {len(vals)} logged)"] = sum(vals) / len(vals)
    return out


#: the shipped models, by name
MODELS = ("mae", "mae-cnn", "autoencoderkl", "dit", "bridge")


def pack(cfg: ZooConfig, dest: Path, only: set[str] | None = None) -> Path:
    """Write the trained models of ``cfg.run_dir`` into the zoo folder ``dest`` (replacing it).
    ``only``: write just these models and keep the others' files in ``dest`` as they are (a model
    added or replaced without rewriting the rest: safetensors does not write its metadata in a fixed
    order, so a re-pack of unchanged weights would still change their bytes)."""
    from g3n_zoo.zoo import FORMAT, VERSION, Manifest, ModelEntry, file_entries

    unknown = sorted(set(only or ()) - set(MODELS))
    if unknown:
        raise StageFailed(f"--only: unknown model(s) {', '.join(unknown)}; models: {', '.join(MODELS)}")
    run = cfg.run_dir.resolve()
    stages = {st.name: st for st in build_zoo_stages(cfg.model_copy(update={"run_dir": run}))}
    data = _data(run)
    machine, built = machine_description(), datetime.now(timezone.utc).strftime("%Y-%m-%d")
    staging = dest.with_name(f".{dest.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    entries: dict[str, ModelEntry] = {}

    def card(name: str, title: str, stage_pkg: str, load: str, stage: str | tuple[str, ...], steps: int,
             minutes: float | None, final: dict, weights: dict) -> None:
        _write_card(staging / name, {
            "name": name, "title": title, "stage": stage_pkg, "load": load, "data": data,
            "training": {"steps": steps, "wall_minutes": minutes, "machine": machine, "built": built, "final": final},
            "weights": weights, "command": [c for st in ((stage,) if isinstance(stage, str) else stage)
                                            for c in _command(stages[st], run)]})

    def want(name: str) -> bool:
        return only is None or name in only

    if only is not None:  # the other models are kept byte for byte (a re-pack would rewrite their files)
        for name in MODELS:
            if name not in only and (dest / name).is_dir():
                shutil.copytree(dest / name, staging / name)

    # MAE: the full model (encoder and its pretraining decoder), so a demo run can continue pretraining
    if want("mae"):
        mae = run / "mae" / "export"
        w = _to_fp16(mae / "model.safetensors", staging / "mae" / "model.safetensors", run)
        shutil.copyfile(mae / "config.json", staging / "mae" / "config.json")
        mcfg = json.loads((mae / "config.json").read_text())
        m = mcfg["model"]
        grid = [i // p for i, p in zip(m["img_size"], m["patch_size"])]
        train_split.write(ShardSet.open(run / "volumes-train"), staging / "mae" / train_split.FILE_NAME, machine)
        card("mae", f"3D MAE, {mcfg.get('preset') or 'custom'} preset ({'x'.join(map(str, m['img_size']))} voxels, "
             f"{'x'.join(map(str, m['patch_size']))} patches, {grid[0] * grid[1] * grid[2]} tokens, width "
             f"{m['embed_dim']}, depth {m['depth']})", "g3n-mae", "model.safetensors",
             "mae", mcfg["train"]["total_steps"],
             _rate_minutes(run / "mae" / "metrics.jsonl", mcfg["train"]["batch_size"], "volumes_per_s"),
             _tail_metrics(run / "mae" / "metrics.jsonl", ("loss",)), w)

    def tokenizer(name: str, title: Callable[[dict], str]) -> None:
        """A tokenizer: the best epoch by validation loss of its last training stage (each later
        stage warm-started from the one before). Steps and minutes add up to each stage's best
        epoch; the config is the last stage's."""
        from g3n_tokenizer.checkpoint import read_header

        folders = tokenizer_folders(cfg, name)
        tok = run / folders[-1]
        w = _to_fp16(tok / "tokenizer.safetensors", staging / name / "tokenizer.safetensors", run)
        states = [json.loads((run / f / "train_state.json").read_text()) for f in folders]
        state = states[-1]
        tok_cfg = {"tokenizer": state["tokenizer"], "model": read_header(tok / "tokenizer.safetensors")["config"],
                   "train": state["config"]}
        if len(states) > 1:
            tok_cfg["earlier_stages"] = [st["config"] for st in states[:-1]]
        atomic_write_bytes(staging / name / "config.json", (json.dumps(tok_cfg, indent=1) + "\n").encode())
        best = state["history"][state["best_epoch"]]
        steps = sum(int(st["history"][st["best_epoch"]]["step"]) for st in states)
        seconds = sum(h["seconds"] for st in states for h in st["history"][: st["best_epoch"] + 1])
        final = {"train_loss": best["train_loss"], "val_loss": best["val_loss"], "best_epoch": state["best_epoch"]}
        if len(states) > 1:
            final["stages"] = [{"folder": f, "best_epoch": st["best_epoch"], "val_loss": st["best_val"]}
                               for f, st in zip(folders, states)]
        trained_by = tuple(next(n for n, st in stages.items() if f"{f}/tokenizer.safetensors" in st.outputs) for f in folders)
        card(name, title(tok_cfg["model"]["tokenizer"]), "g3n-tokenizer", "tokenizer.safetensors", trained_by, steps,
             round(seconds / 60, 1), final, w)

    if want("mae-cnn"):
        tokenizer("mae-cnn", lambda t: f"MAE-CNN tokenizer (frozen MAE encoder, projection to c = {t['c']}, 3D CNN decoder)")
    if want("autoencoderkl"):
        tokenizer("autoencoderkl", lambda t: (
            f"AutoencoderKL baseline tokenizer (MONAI, channels {tuple(t['channels'])}, latent {t['latent_channels']} x "
            f"{' x '.join(str(n // 2 ** (len(t['channels']) - 1)) for n in t['img_size'])})"))
    if want("autoencoderkl") or (want("mae-cnn") and (staging / "autoencoderkl").is_dir()):
        # Table 5 in kind: both tokenizers on the demo's held-out split (the demo prints and reports it);
        # it holds both tokenizers' figures, so a new one of either rewrites it
        doc = _scrub_paths(json.loads((run / "tokenizers" / "tokenizers.json").read_text()), run)
        atomic_write_bytes(staging / "autoencoderkl" / "table5.json", (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())

    # generator and bridge: the last checkpoint's raw and EMA weights (no optimizer)
    from g3n_dit.checkpoint import resolve_checkpoint

    for name, folder, title in (("dit", "dit", f"conditional flow-matching DiT, {cfg.dit_preset} preset"),
                                ("bridge", "dit-long", f"longitudinal bridge, {cfg.bridge_preset} preset")):
        if not want(name):
            continue
        ck = resolve_checkpoint(run / folder)
        st = json.loads((ck / "state.json").read_text())
        costs, files = [], {}
        for f in ("model.safetensors", "ema.safetensors"):
            costs.append(_to_fp16(ck / f, staging / name / f, run, keep_fp32=lambda k: k.startswith("norm.")))
            files[f] = file_sha256(staging / name / f)
        worst = {"dtype": "float16", "max_relative_roundtrip_error": max(c["max_relative_roundtrip_error"] for c in costs),
                 "kept_fp32": sorted({k for c in costs for k in c["kept_fp32"]})}
        st["files"] = files  # the training state (optimizer, RNG) is not shipped
        st = _scrub_paths(st, run)  # the run folder's paths (data location, tokenizer file) as $RUN/...
        atomic_write_bytes(staging / name / "state.json", (json.dumps(st, indent=2, sort_keys=True) + "\n").encode())
        atomic_write_bytes(staging / name / "config.json", (json.dumps(st["run_config"], indent=1) + "\n").encode())
        card(name, title, "g3n-dit", ".", name, int(st["step"]),
             _rate_minutes(run / folder / "metrics.jsonl", st["run_config"]["train"]["batch_size"], "samples_per_s"),
             _tail_metrics(run / folder / "metrics.jsonl", ("loss",)), worst)

    for name in sorted(p.name for p in staging.iterdir() if p.is_dir()):
        card_ = json.loads((staging / name / "card.json").read_text())
        entries[name] = ModelEntry(stage=card_["stage"], kind=name, load=card_["load"],
                                   files=file_entries(staging / name))
    man = Manifest(format=FORMAT, version=VERSION, models=entries)
    atomic_write_bytes(staging / "manifest.json", (man.model_dump_json(indent=1) + "\n").encode())
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(staging, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="g3n-zoo-build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, help=f"run folder (default {ZooConfig().run_dir})")
    p.add_argument("--config", type=Path, help="YAML/JSON ZooConfig (training lengths)")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.add_argument("--pack", type=Path, nargs="?", const=Path("-"), metavar="ZOO_DIR",
                   help="after the last stage, write the models into ZOO_DIR (default: the g3n-zoo package's weights "
                        "folder, i.e. replace the shipped models)")
    p.add_argument("--only", nargs="+", choices=MODELS, metavar="MODEL",
                   help=f"with --pack: write only these models ({', '.join(MODELS)}), keeping the others as they are")
    a = p.parse_args(argv)
    cfg = ZooConfig.model_validate(config_data(a.config, a.run_dir))
    cfg = cfg.model_copy(update={"run_dir": cfg.run_dir.resolve()})
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cfg.run_dir / "zoo-config.json", cfg.model_dump_json(indent=2).encode())
    stages = build_zoo_stages(cfg)
    names = [st.name for st in stages]
    if a.until is not None and a.until not in names:
        p.error(f"--until: unknown stage {a.until!r}; stages: {', '.join(names)}")
    if a.only and a.pack is None:
        p.error("--only goes with --pack")
    t = time.perf_counter()
    try:
        run_stages(cfg.run_dir, stages, until=a.until)
        if a.pack is not None and a.until is None:
            import g3n_zoo

            dest = g3n_zoo.root() if str(a.pack) == "-" else a.pack
            print(f"packed into {pack(cfg, dest, set(a.only) if a.only else None)}")
    except StageFailed as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    print(f"g3n-zoo-build finished in {time.perf_counter() - t:.0f} s; run folder {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
