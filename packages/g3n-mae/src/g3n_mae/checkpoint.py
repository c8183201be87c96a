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
* Step folders are written, rotated and found by ``g3n_train.CheckpointStore`` (atomic: a crash
  at any moment leaves the previous checkpoint intact and discoverable; the newest ``keep_last``
  are kept); ``state.json`` records each tensor file's SHA-256 (``files``; format version 1
  recorded only the weights' as ``weights_sha256``, and still loads).
* RNG states are stored as JSON (python, numpy) and base64 bytes (torch), never pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from g3n_shards import atomic_write_text, file_sha256  # noqa: F401 - re-exported: one writer, one file digest for the project
from g3n_train import CheckpointError, CheckpointStore, read_files, read_state, rng_state, save_tensors, set_rng_state  # noqa: F401
from g3n_train import read_tensors as read_safetensors  # noqa: F401 - the name this package's users know

from . import __version__
from .config import ModelConfig, config_to_json, model_config_from_json
from .model import MAE3D, interpolate_pos_embed

FORMAT = "g3n-mae-checkpoint"
FORMAT_VERSION = 2  # 2: SHA-256 of every tensor file in state.json "files"; 1: "weights_sha256" only
WEIGHTS_FORMAT = "g3n-mae-weights"
STEP_PREFIX = "step_"


#: one atomic safetensors writer for the project (g3n_train's, over g3n_shards.atomic_write_bytes)
atomic_save_safetensors = save_tensors


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------


def weights_metadata(model_cfg: ModelConfig, extra: dict[str, str] | None = None) -> dict[str, str]:
    meta = {"format": WEIGHTS_FORMAT, "g3n_mae_version": __version__, "model_config": config_to_json(model_cfg)}
    meta.update(extra or {})
    return meta


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, extra: dict[str, str] | None = None) -> str:
    """Atomically write full fp32 weights with the config embedded; returns the file's SHA-256."""
    return save_tensors({k: v.float() for k, v in state_dict.items()}, path, weights_metadata(model_cfg, extra))


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


def _store(ckpt_root: Path) -> CheckpointStore:
    return CheckpointStore(Path(ckpt_root), prefix=STEP_PREFIX)


def step_dir_name(step: int) -> str:
    return _store(Path(".")).dir_for(step).name


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (state.json present), oldest first."""
    return _store(ckpt_root).list()


def find_latest(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint: ``latest.json`` if valid, else the highest step dir."""
    return _store(ckpt_root).latest()


def save_checkpoint(
    ckpt_root: Path, step: int, model_cfg: ModelConfig, model_sd: dict[str, torch.Tensor],
    optim_tensors: dict[str, torch.Tensor], state: dict[str, Any], keep_last: int,
) -> Path:
    """Write one checkpoint atomically, point ``latest.json`` at it, prune old ones."""
    files = {
        "model.safetensors": ({k: v.float() for k, v in model_sd.items()}, weights_metadata(model_cfg, {"step": str(step)})),
        "optimizer.safetensors": (optim_tensors, {"format": "g3n-mae-optimizer"}),
    }
    return _store(ckpt_root).save(step, files, {"g3n_mae_version": __version__, **state}, keep_last, FORMAT, FORMAT_VERSION)


def load_checkpoint(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, optimizer tensors, state) of one checkpoint dir; checks the files' digests."""
    d = Path(ckpt_dir)
    state = read_state(d)
    if state.get("format") != FORMAT or int(state.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(f"{d / 'state.json'}: unsupported checkpoint format {state.get('format')!r} "
                              f"v{state.get('format_version')}")
    if "files" in state:
        files = read_files(d, state["files"], ["model.safetensors", "optimizer.safetensors"])
    else:  # format version 1 recorded the weights' digest only
        files = read_files(d, {"model.safetensors": state.get("weights_sha256")})
        files["optimizer.safetensors"] = read_safetensors(d / "optimizer.safetensors")[0]
    return files["model.safetensors"], files["optimizer.safetensors"], state


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
