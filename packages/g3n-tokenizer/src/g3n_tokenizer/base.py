"""Shared machinery of our torch tokenizers: device/precision handling, batching, checkpoints.

Subclasses provide the model (``_encode``/``_decode`` on tensors already on the device), a
``train_module`` (the trainable part, which is all an optimizer or DeepSpeed ever sees) and
``train_inputs`` (what that module gets from a z-scored volume batch).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

import g3n_shards as gs

from .checkpoint import config_differences, file_sha256, load_strict, read_tokenizer, save_tokenizer
from .errors import CheckpointError
from .interface import check_latents, check_volumes, model_ref_for

#: Geometry fields a tokenizer copies from the volumes it was trained on (for NIfTI output).
VOLUME_GEOMETRY_FIELDS = ("spacing", "affine", "space")


class TorchTokenizer(nn.Module):
    """Base class: implements the public half of the :class:`~g3n_tokenizer.interface.Tokenizer` protocol."""

    name: str = ""
    entry_point: str = ""
    #: where ``train_module``'s tensors sit in ``weights()`` (their key prefix there)
    train_prefix: str = ""
    #: ``config_dict()`` entries a warm start (``load_init``) may change: the training objective
    #: and provenance, which change the loss or the record, not what a trainable weight means
    init_may_differ: tuple[str, ...] = ("volume_geometry",)

    def __init__(self) -> None:
        super().__init__()
        self.checkpoint_path: Path | None = None
        self.checkpoint_digest: str | None = None
        self.volume_geometry: dict[str, Any] = {}
        self.bf16: bool | None = None  # None: bf16 on CUDA, fp32 elsewhere

    # ---- to be provided -----------------------------------------------------------------
    def _encode(self, volumes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def weights(self) -> dict[str, torch.Tensor]:
        """Everything the checkpoint must hold to rebuild this tokenizer."""
        return dict(self.state_dict())

    @property
    def geometry(self) -> gs.Geometry:
        raise NotImplementedError

    # ---- the interface ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int]:
        g = self.geometry
        assert g.token_grid is not None and g.channels is not None
        return (g.num_tokens or 0, int(g.channels))

    def use_bf16(self) -> bool:
        return self.device.type == "cuda" if self.bf16 is None else self.bf16

    def autocast(self):
        dev = self.device.type
        return torch.autocast(dev, dtype=torch.bfloat16) if self.use_bf16() else nullcontext()

    @torch.no_grad()
    def encode(self, volumes: torch.Tensor) -> torch.Tensor:
        assert self.geometry.shape is not None
        x = check_volumes(volumes, self.geometry.shape).to(self.device)
        was = self.training
        self.eval()
        try:
            with self.autocast():
                z = self._encode(x)
        finally:
            self.train(was)
        return z.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = check_latents(latents, self.latent_shape).to(self.device).float()
        was = self.training
        self.eval()
        try:
            with self.autocast():
                x = self._decode(z)
        finally:
            self.train(was)
        return x.float()

    def model_ref(self) -> gs.ModelRef:
        return model_ref_for(self.name, self.entry_point, self.checkpoint_path, self.checkpoint_digest, self.config_dict())

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> str:
        """Write the self-describing checkpoint; afterwards ``model_ref()`` names this file and digest."""
        digest = save_tokenizer(path, self.weights(), self.name, self.config_dict(), extra)
        self.checkpoint_path, self.checkpoint_digest = Path(path), digest
        return digest

    def _mark_loaded(self, path: str | Path) -> None:
        self.checkpoint_path, self.checkpoint_digest = Path(path), file_sha256(path)

    def load_init(self, path: str | Path) -> dict[str, str]:
        """Warm start: load ``train_module`` strictly from a checkpoint of this tokenizer and config.

        Only the trainable part is taken. For MAE-CNN the frozen encoder stays the one this
        tokenizer was built with (its ``--mae-checkpoint``, e.g. a briefly fine-tuned MAE), so it
        may differ from the encoder the init was trained with; the head then adapts to it. Another
        tokenizer kind, or a config differing outside ``init_may_differ``, is an error naming the
        file and every differing field. Returns the init's provenance (path, SHA-256).
        """
        tensors, header = read_tokenizer(path, expect_name=self.name)
        diff = config_differences(header["config"], self.config_dict(), skip=self.init_may_differ)
        if diff:
            raise CheckpointError(f"{path}: --init tokenizer has another config than this run: " + "; ".join(diff))
        n = len(self.train_prefix)
        load_strict(self.train_module, {k[n:]: v for k, v in tensors.items() if k.startswith(self.train_prefix)}, str(path))
        return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}

    # ---- training hooks -----------------------------------------------------------------
    @property
    def train_module(self) -> nn.Module:
        """The trainable part; its forward is ``(inputs, target) -> (loss, recon)``."""
        raise NotImplementedError

    def train_inputs(self, volumes: torch.Tensor) -> torch.Tensor:
        """What ``train_module`` gets for z-scored volumes (B, 1, X, Y, Z) on the device."""
        return volumes


def volume_geometry_from(geometry: gs.Geometry | None) -> dict[str, Any]:
    """Spacing/affine/space of a volumes manifest, JSON-ready (kept for NIfTI output)."""
    if geometry is None:
        return {}
    d = geometry.model_dump(mode="json")
    return {k: d[k] for k in VOLUME_GEOMETRY_FIELDS if d.get(k) is not None}


def voxel_loss(kind: str, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    recon, target = recon.float(), target.float()
    if kind == "mse":
        return torch.mean((recon - target) ** 2)
    if kind == "l1":
        return torch.mean(torch.abs(recon - target))
    raise ValueError(f"unknown voxel loss {kind!r} (mse | l1)")
