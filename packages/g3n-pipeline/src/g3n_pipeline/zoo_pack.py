"""Packing for `g3n-zoo-build --pack`: each trained model of a zoo run folder goes into the zoo
folder with its weights in fp16 (where that loses nothing measurable), its config, its model card
(data, steps, training time, machine, final losses, intended use) and the exact commands that
reproduce it, all paths of this machine written as $RUN; then the manifest with every file's SHA-256.
The zoo folder is replaced as a whole (staged, then renamed), so a killed pack leaves the old one."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
from datetime import datetime, timezone
from collections.abc import Collection
from pathlib import Path
from typing import Any, Callable

from g3n_shards import ShardSet, atomic_write_bytes, file_sha256

from . import train_split
from .runner import Stage, StageFailed
from .zoo_build import (MAE_DATA, MAE_EXTRA_PREFIX, MAE_VAL_PREFIX, MODELS, UPSTREAM, ZooConfig, build_zoo_stages,
                        mae_candidate_folders, tokenizer_folders)


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


def _data(run: Path, cfg: ZooConfig, name: str = "volumes-train") -> dict[str, Any]:
    ss = ShardSet.open(run / name)
    metas = ss.metadata()
    split = (f"the demo cohort's train split (g3n-demo's synthetic cohort, seed {cfg.seed}, and the IXI T1 volumes), "
             "never its test split")
    what = (f"{name}: {split}" if name == "volumes-train" else
            f"{name}: {split}, and {cfg.mae_extra_subjects} more synthetic subjects drawn with seed {cfg.mae_extra_seed} "
            f"({MAE_EXTRA_PREFIX}00000, ...)")
    return {"set": what, "digest": ss.digest, "volumes": len(metas),
            "subjects": len({(m.cohort, m.subject) for m in metas.values()})}


def _selection(run: Path, cfg: ZooConfig) -> dict[str, Any]:
    """The MAE's selection record (mae/selection.json) with the validation set it was made on."""
    ss = ShardSet.open(run / "mae-val" / "volumes")
    metas = ss.metadata()
    return {"validation": {"set": f"{cfg.mae_val_subjects} synthetic subjects drawn with seed {cfg.mae_val_seed} "
                           f"({MAE_VAL_PREFIX}00000, ...): no model trained on them, none is in the demo's test split",
                           "digest": ss.digest, "volumes": len(metas)},
            **json.loads((run / "mae" / "selection.json").read_text())}


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
             *(_selection_lines(card["selection"]) if card.get("selection") else []),
             "- config: `config.json`", "",
             "Rebuild every shipped model from scratch with `uv run g3n-zoo-build --pack` (hours on CPU). This model's "
             "commands in that run (`$RUN` = its run folder):", "", "```", *card["command"], "```", ""]
    atomic_write_bytes(folder / "card.md", "\n".join(lines).encode())


def _selection_lines(sel: dict[str, Any]) -> list[str]:
    """The card's account of how the MAE was chosen: the rule, then one line per candidate."""
    from .mae_select import table

    return [f"- chosen among {len(sel['candidates'])} candidates (one seed each) on a validation set, "
            f"{sel['validation']['set']}; {sel['validation']['volumes']} volumes, digest "
            f"`{sel['validation']['digest']}`. Rule: {sel['rule']}", "", "  ```",
            *(f"  {line}" for line in table(sel)), "  ```", ""]


def _tail_metrics(path: Path, keys: tuple[str, ...]) -> dict[str, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out: dict[str, float] = {}
    for k in keys:
        vals = [r[k] for r in rows[-5:] if isinstance(r.get(k), (int, float))]
        if vals:
            out[f"{k} (mean of the last {len(vals)} logged)"] = sum(vals) / len(vals)
    return out


#: where a run keeps what a model downstream (UPSTREAM) was trained on, the same model's file in a
#: zoo, and which of its tensors that training saw (the MAE-CNN's latents do not depend on its decoder)
_LINKS: dict[str, tuple[str, str, Callable[[str], bool]]] = {
    "mae": ("mae/export/model.safetensors", "mae/model.safetensors", lambda k: True),
    "mae-cnn": ("tokenizer/tokenizer.safetensors", "mae-cnn/tokenizer.safetensors",
                lambda k: not k.startswith("head.decoder.")),
}


def _same_as_packed(run_file: Path, zoo_file: Path, keys: Callable[[str], bool]) -> bool:
    """Whether a run's weights are the zoo's, as packing them would store them (fp16 where the zoo has fp16)."""
    from safetensors import safe_open

    with safe_open(str(run_file), framework="pt") as a, safe_open(str(zoo_file), framework="pt") as b:
        names = [k for k in a.keys() if keys(k)]
        if sorted(names) != sorted(k for k in b.keys() if keys(k)):
            return False
        for k in names:
            x, y = a.get_tensor(k), b.get_tensor(k)
            if x.shape != y.shape or not bool((x.to(y.dtype) == y).all()):
                return False
    return True


def check_links(run: Path, zoo: Path, only: Collection[str]) -> None:
    """Refuse an ``only`` that would leave the zoo with models of two runs that do not fit together:
    where a model is packed from this run and the one it was trained on (UPSTREAM) is kept from the
    zoo, or the other way round, this run's upstream model must be the zoo's, tensor for tensor as
    packed. A run that has not trained it yet fails too: what it trains will not be the zoo's."""
    for down, up in UPSTREAM.items():
        if (down in only) == (up in only):
            continue
        kept = up if down in only else down
        run_file, zoo_rel, keys = _LINKS[up]
        if not (zoo / kept).is_dir() or not (zoo / zoo_rel).is_file():
            continue  # nothing kept to disagree with
        trained = (run / run_file).is_file()
        if trained and _same_as_packed(run / run_file, zoo / zoo_rel, keys):
            continue
        state = "differs from" if trained else "(not trained yet) will differ from"
        why = (f"this run's {down} is trained on this run's {up}, which {state} the zoo's" if down in only else
               f"the zoo's {down} is trained on the zoo's {up}, and this run's {up} {state} it")
        raise StageFailed(f"--only {' '.join(sorted(only))}: {why}; add {kept} to --only")


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
    if only is not None:
        check_links(run, dest, only)
    stages = {st.name: st for st in build_zoo_stages(cfg.model_copy(update={"run_dir": run}))}
    data = _data(run, cfg)
    machine, built = machine_description(), datetime.now(timezone.utc).strftime("%Y-%m-%d")
    staging = dest.with_name(f".{dest.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    entries: dict[str, ModelEntry] = {}

    def card(name: str, title: str, stage_pkg: str, load: str, stage: str | tuple[str, ...], steps: int,
             minutes: float | None, final: dict, weights: dict, trained_on: dict[str, Any] | None = None,
             **extra: Any) -> None:
        _write_card(staging / name, {
            "name": name, "title": title, "stage": stage_pkg, "load": load, "data": trained_on or data,
            "training": {"steps": steps, "wall_minutes": minutes, "machine": machine, "built": built, "final": final},
            "weights": weights, "command": [c for st in ((stage,) if isinstance(stage, str) else stage)
                                            for c in _command(stages[st], run)], **extra})

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
             (*(["mae-data"] if cfg.mae_extra_subjects else []),
              *(["mae-val", *mae_candidate_folders(cfg)] if cfg.mae_seeds else []), "mae"),
             mcfg["train"]["total_steps"],
             _rate_minutes(run / "mae" / "metrics.jsonl", mcfg["train"]["batch_size"], "volumes_per_s"),
             _tail_metrics(run / "mae" / "metrics.jsonl", ("loss",)), w,
             trained_on=_data(run, cfg, MAE_DATA) if cfg.mae_extra_subjects else None,
             **({"selection": _selection(run, cfg)} if cfg.mae_seeds else {}))

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
