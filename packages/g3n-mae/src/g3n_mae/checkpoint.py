"""Checkpoints: safetensors weights + safetensors optimizer state + a JSON train state. No pickle.

Layout of a run's checkpoints::

    <run>/checkpoints/step_00000200/
        model.safetensors      full fp32 weights; safetensors metadata embeds the model config
        optimizer.safetensors  AdamW moments per *named* parameter ("exp_avg/<name>", ...)
        state.json             step, samples, config, data cursors and RNG states per rank, figures
    <run>/checkpoints/latest.json  {"step": 200, "dir": "step_00000200"}

Why this shape:

* Everything is consolidated (full tensors keyed by parameter name, independent of how ZeRO or
  DDP partitioned them), so a checkpoint written by N processes loads on M processes, and the
  weights load with nothing but ``safetensors`` + this package.
* A checkpoint directory is assembled under a temporary name and renamed into place, and
  ``latest.json`` is replaced last: a crash at any moment leaves the previous checkpoint intact
  and discoverable. Only the last ``keep_last`` complete checkpoints are kept.
* RNG states are stored as JSON (python, numpy) and base64 bytes (torch), never pickled.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from g3n_shards import atomic_path, atomic_write_text, file_sha256  # noqa: F401 - re-exported: one writer, one file digest for the project

from . import __version__
from .config import ModelConfig, config_to_json, model_config_from_json
from .model import MAE3D, interpolate_pos_embed

FORMAT = "g3n-mae-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FORMAT = "g3n-mae-weights"
STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match; the message names the path."""


# ---------------------------------------------------------------------------------------------
# atomic file helpers
# ---------------------------------------------------------------------------------------------


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:  # created by safetensors itself: the umask's mode, not mkstemp's 0600
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (CPU); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e


# ---------------------------------------------------------------------------------------------
# RNG state <-> JSON
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and CUDA) RNG states as JSON-able values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------


def weights_metadata(model_cfg: ModelConfig, extra: dict[str, str] | None = None) -> dict[str, str]:
    meta = {"format": WEIGHTS_FORMAT, "g3n_mae_version": __version__, "model_config": config_to_json(model_cfg)}
    meta.update(extra or {})
    return meta


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, extra: dict[str, str] | None = None) -> str:
    """Atomically write full fp32 weights with the config embedded; returns the file's SHA-256."""
    atomic_save_safetensors({k: v.float() for k, v in state_dict.items()}, path, weights_metadata(model_cfg, extra))
    return file_sha256(path)


def resolve_weights(path: str | Path) -> Path:
    """Accept a .safetensors file, an export dir, a checkpoint step dir or a run/checkpoints dir."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (p / "model.safetensors", p / "encoder.safetensors"):
        if cand.is_file():
            return cand
    latest = find_latest(p) or find_latest(p / "checkpoints")
    if latest is not None:
        return latest / "model.safetensors"
    raise CheckpointError(f"{p}: no weights found (expected a .safetensors file, an export or checkpoint directory)")


def load_model(
    path: str | Path, img_size: tuple[int, int, int] | None = None, encoder_only: bool = False
) -> tuple[MAE3D, ModelConfig, str]:
    """Build the model from the embedded config and load weights strictly.

    ``img_size`` asks for another geometry (same patch size): the fixed positional embeddings are
    interpolated trilinearly over the token grid. Returns (model in eval mode, config, sha256).
    With ``encoder_only`` a weights file may lack the decoder (an encoder-only export).
    """
    wpath = resolve_weights(path)
    tensors, meta = read_safetensors(wpath)
    if meta.get("format") != WEIGHTS_FORMAT or "model_config" not in meta:
        raise CheckpointError(f"{wpath}: not a g3n-mae weights file (metadata format={meta.get('format')!r})")
    saved_cfg = model_config_from_json(meta["model_config"], source=str(wpath))
    cfg = saved_cfg if img_size is None else saved_cfg.with_geometry(tuple(img_size))
    if cfg.grid_size != saved_cfg.grid_size:
        for key in ("pos_embed", "decoder_pos_embed"):
            if key in tensors:
                tensors[key] = interpolate_pos_embed(tensors[key], saved_cfg.grid_size, cfg.grid_size)
    model = MAE3D(cfg)
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if encoder_only:
        missing = [k for k in missing if not _is_decoder_key(k)]
    if missing or unexpected:
        raise CheckpointError(f"{wpath}: weights do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{wpath}: tensor {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict(tensors, strict=not encoder_only)
    model.eval()
    return model, cfg, file_sha256(wpath)


def _is_decoder_key(k: str) -> bool:
    return k.startswith(("decoder_", "mask_token"))


#: ModelConfig fields that set the training objective, not the weights: a warm start may change them.
OBJECTIVE_FIELDS = ("mask_ratio", "norm_pix_loss")


def read_init_weights(path: str | Path, model_cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(full MAE weights, provenance record) for a warm start (``g3n-mae train --init``).

    ``path`` resolves like ``load_model``'s (weights file, export, checkpoint or run dir). The
    weights must be the *full* MAE (encoder, MAE decoder, mask token): continuing pretraining
    needs the decoder too, so an encoder-only export is refused. The embedded architecture must
    equal ``model_cfg`` (every differing field is named); only the objective fields
    (``OBJECTIVE_FIELDS``) may differ, since they change the loss, not the meaning of a weight.
    Weights shipped in fp16 (a model zoo) are cast to fp32, what training keeps. The record
    (resolved path, SHA-256, step, changed objective fields) goes into the run's checkpoints and
    model card.
    """
    wpath = resolve_weights(path)
    tensors, meta = read_safetensors(wpath)
    if meta.get("format") != WEIGHTS_FORMAT or "model_config" not in meta:
        raise CheckpointError(f"{wpath}: not a g3n-mae weights file (metadata format={meta.get('format')!r})")
    saved = model_config_from_json(meta["model_config"], source=str(wpath))
    ours, theirs = model_cfg.model_dump(mode="json"), saved.model_dump(mode="json")
    diff = [f"{k}: {theirs[k]} in the init weights, {ours[k]} in this run" for k in ours
            if k not in OBJECTIVE_FIELDS and ours[k] != theirs[k]]
    if diff:
        raise CheckpointError(f"{wpath}: --init weights have another architecture than this run's model config: "
                              + "; ".join(diff))
    if not any(_is_decoder_key(k) for k in tensors):
        raise CheckpointError(f"{wpath}: encoder-only weights; --init needs the full MAE (encoder + decoder + mask "
                              "token): give a run dir, a checkpoint or a full export")
    record: dict[str, Any] = {"path": str(wpath.resolve()), "sha256": file_sha256(wpath), "step": meta.get("step")}
    changed = {k: [theirs[k], ours[k]] for k in OBJECTIVE_FIELDS if theirs[k] != ours[k]}
    if changed:
        record["objective_changed"] = changed  # field: [init, this run]
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, record


# ---------------------------------------------------------------------------------------------
# training checkpoints
# ---------------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (state.json present), oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file()]
    return sorted(out, key=lambda p: p.name)


def find_latest(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint: ``latest.json`` if valid, else the highest step dir."""
    root = Path(ckpt_root)
    ptr = root / "latest.json"
    if ptr.is_file():
        try:
            cand = root / json.loads(ptr.read_text())["dir"]
            if (cand / "state.json").is_file():
                return cand
        except (ValueError, KeyError, OSError):
            pass
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def save_checkpoint(
    ckpt_root: Path, step: int, model_cfg: ModelConfig, model_sd: dict[str, torch.Tensor],
    optim_tensors: dict[str, torch.Tensor], state: dict[str, Any], keep_last: int,
) -> Path:
    """Write one checkpoint atomically, point ``latest.json`` at it, prune old ones."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # left by a killed save (one writer per run)
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"  # not mkdtemp: its mode 0700 would stay
    tmp.mkdir()
    try:
        digest = save_weights(tmp / "model.safetensors", model_sd, model_cfg, {"step": str(step)})
        atomic_save_safetensors(optim_tensors, tmp / "optimizer.safetensors", {"format": "g3n-mae-optimizer"})
        full_state = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "g3n_mae_version": __version__, "step": step,
            "weights_sha256": digest, "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **state,
        }
        atomic_write_text(tmp / "state.json", json.dumps(full_state, indent=1, sort_keys=True))
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest.json", json.dumps({"step": step, "dir": final.name}))
    for old in list_checkpoints(root)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, optimizer tensors, state) of one checkpoint dir; checks the weights digest."""
    d = Path(ckpt_dir)
    spath = d / "state.json"
    try:
        state = json.loads(spath.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{spath}: cannot read checkpoint state: {e}") from e
    if state.get("format") != FORMAT or int(state.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(f"{spath}: unsupported checkpoint format {state.get('format')!r} v{state.get('format_version')}")
    wpath = d / "model.safetensors"
    if file_sha256(wpath) != state.get("weights_sha256"):
        raise CheckpointError(f"{wpath}: SHA-256 does not match state.json (corrupted checkpoint)")
    model_sd, _ = read_safetensors(wpath)
    optim, _ = read_safetensors(d / "optimizer.safetensors")
    return model_sd, optim, state


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def export_model(src: str | Path, out_dir: str | Path, encoder_only: bool = False) -> Path:
    """Plain safetensors (config embedded) + ``MODEL_CARD.md`` + ``config.json`` in ``out_dir``.

    ``src`` is a checkpoint step dir or a run dir (its latest checkpoint). The card lists the
    config, the training data manifests' digests and the training figures from the state.
    """
    src = Path(src)
    ckpt = src if (src / "state.json").is_file() else find_latest(src / "checkpoints") or find_latest(src)
    if ckpt is None:
        raise CheckpointError(f"{src}: no checkpoint to export")
    model_sd, _, state = load_checkpoint(ckpt)
    model_cfg = ModelConfig.model_validate(state["config"]["model"])
    if encoder_only:
        model_sd = {k: v for k, v in model_sd.items() if not _is_decoder_key(k)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "encoder.safetensors" if encoder_only else "model.safetensors"
    extra = {"step": str(state["step"]), "encoder_only": str(encoder_only).lower(),
             "data_manifests": json.dumps(state.get("data_manifests", []))}
    digest = save_weights(out / name, model_sd, model_cfg, extra)
    atomic_write_text(out / "config.json", json.dumps(state["config"], indent=1, sort_keys=True))
    atomic_write_text(out / "MODEL_CARD.md", model_card(state, name, digest))
    return out / name


def model_card(state: dict[str, Any], weights_name: str, digest: str) -> str:
    cfg = state["config"]
    m = cfg["model"]
    figs = state.get("figures", {})
    manifests = state.get("data_manifests", []) or []
    lines = [
        "# g3n-mae encoder: model card", "",
        "3D masked autoencoder (ViT encoder + ViT decoder) pretrained on atlas-space brain MRI volumes",
        "(BrainG3N phase 1). Use the unmasked encoder's token grid (or its mean) as features.", "",
        "## Weights", "",
        f"- file: `{weights_name}` (plain safetensors; the model config is embedded in its metadata)",
        f"- sha256: `{digest}`",
        "- load: `g3n_mae.checkpoint.load_model(path)`; strict; pos-embeds interpolate to other geometries", "",
        "## Geometry and architecture", "",
        f"- volume {tuple(m['img_size'])}, patches {tuple(m['patch_size'])}, tokens {_prod(m['img_size'], m['patch_size'])}",
        f"- encoder: {m['depth']} layers, hidden {m['embed_dim']}, {m['num_heads']} heads, MLP {m['mlp_dim']}",
        f"- decoder: {m['decoder_depth']} layers, hidden {m['decoder_embed_dim']}, {m['decoder_num_heads']} heads, "
        f"MLP {m['decoder_mlp_dim']}",
        f"- mask ratio {m['mask_ratio']}, normalised-patch target: {m['norm_pix_loss']}",
        "- input: per-volume z-scored over brain voxels (> 0), background 0", "",
        "## Training", "",
        f"- steps: {state['step']}, volumes seen: {state.get('samples_seen')}, processes: {state.get('world_size')}, "
        f"engine: {state.get('engine')}",
        f"- optimiser: AdamW lr {cfg['train']['lr']} (warm-up {cfg['train']['warmup_steps']} steps, cosine to "
        f"{cfg['train']['min_lr']}), weight decay {cfg['train']['weight_decay']}, clip {cfg['train']['grad_clip']}",
        f"- final figures: {json.dumps(figs, sort_keys=True)}",
        *([f"- warm start (--init): `{state['init']['path']}` (sha256 `{state['init']['sha256']}`)"] if state.get("init") else []),
        "",
        "## Training data (manifest digests)", "",
    ]
    lines += [f"- `{d}`" for d in manifests] or ["- (in-memory data; no shard manifest)"]
    lines += ["", "## Full config", "", "```json", json.dumps(cfg, indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)


def _prod(img, patch) -> int:
    n = 1
    for s, p in zip(img, patch):
        n *= s // p
    return n
