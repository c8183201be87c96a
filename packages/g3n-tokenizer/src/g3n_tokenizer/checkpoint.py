"""Tokenizer checkpoints: one self-describing safetensors file per tokenizer. No pickle.

The file holds every weight the tokenizer needs (for MAE-CNN: the frozen encoder, the
projection and the decoder), and its safetensors metadata holds ``format``, the registry name and
the JSON config, so ``from_checkpoint(path)`` needs nothing else and the SHA-256 of that one file
identifies the tokenizer in a ``latents`` manifest. Training state (optimizer moments, epoch,
early-stopping counters, RNG states as JSON) lives beside it in ``train_state.safetensors`` +
``train_state.json``.
Writes are atomic (temp file + ``os.replace``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from g3n_train import save_tensors as atomic_save_safetensors  # one atomic safetensors writer for the project
from safetensors import safe_open
from g3n_shards import atomic_write_text, file_sha256  # noqa: F401 - re-exported: one writer, one file digest for the project

from .errors import CheckpointError

FORMAT = "g3n-tokenizer-weights"
FORMAT_VERSION = "1"


def same_digest(a: str | None, b: str | None) -> bool:
    """Digests compare equal with or without a ``sha256:`` prefix."""
    strip = lambda d: (d or "").removeprefix("sha256:").lower()  # noqa: E731
    return strip(a) == strip(b)


def save_tokenizer(path: str | Path, state_dict: dict[str, torch.Tensor], name: str, config: dict[str, Any],
                   extra: dict[str, str] | None = None) -> str:
    """Write a tokenizer checkpoint (fp32 weights + name + config); returns its SHA-256 (hex)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "tokenizer": name,
            "config": json.dumps(config, sort_keys=True)}
    meta.update(extra or {})
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    atomic_save_safetensors(tensors, path, meta)
    return file_sha256(path)


def read_header(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata (``tokenizer``, ``config`` parsed), without reading the weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such tokenizer checkpoint")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a g3n-tokenizer checkpoint (metadata format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format version {meta.get('format_version')!r} "
                              f"(this reader supports {FORMAT_VERSION})")
    try:
        meta["config"] = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: embedded config is not JSON ({e})") from None
    return meta


def read_tokenizer(path: str | Path, expect_name: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, header) of a tokenizer checkpoint; refuses another tokenizer's file."""
    header = read_header(path)
    if expect_name is not None and header.get("tokenizer") != expect_name:
        raise CheckpointError(f"{path}: checkpoint of tokenizer {header.get('tokenizer')!r}, not {expect_name!r}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read weights ({e})") from None
    return tensors, header


def check_weights(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str, what: str = "weights") -> None:
    """Refuse missing/unexpected keys and shape mismatches between a model's ``own`` state and ``tensors``."""
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{where}: {what} do not match the model: missing {missing[:6]}, unexpected {unexpected[:6]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")


def config_differences(theirs: Any, ours: Any, skip: Sequence[str] = (), where: str = "") -> list[str]:
    """``"path: A in the init, B in this run"`` for every differing leaf of two JSON configs
    (dotted paths), except the paths in ``skip``; for refusing a warm start with a clear message."""
    if where in skip:
        return []
    if isinstance(theirs, dict) and isinstance(ours, dict):
        out: list[str] = []
        for k in sorted(set(theirs) | set(ours)):
            out += config_differences(theirs.get(k), ours.get(k), skip, f"{where}.{k}" if where else k)
        return out
    return [] if theirs == ours else [f"{where}: {theirs!r} in the init, {ours!r} in this run"]


def load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load every weight, refuse missing/unexpected keys and shape mismatches (no silent partial load)."""
    check_weights(module.state_dict(), tensors, where)
    module.load_state_dict(tensors, strict=True)
