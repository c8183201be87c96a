"""Reaching other stages' models through their public APIs only.

* Tokenizers: only through ``g3n_tokenizer.registry.load_tokenizer`` (a registry name or the
  ModelRef a ``latents`` manifest records) and the ``Tokenizer`` interface (encode/decode on
  brain-z-scored volumes).
* The MAE encoder: ``g3n_mae.checkpoint.load_model(..., encoder_only=True)`` and ``encode``;
  features are the mean over tokens, exactly as ``g3n-mae encode`` stores them for the probes.

Intensity spaces. Tokenizers and the encoder work in *brain z-space* (brain voxels z-scored,
background 0). What a volumes set holds is read from its manifest
(:func:`g3n_shards.intensity.intensity_of`, via :func:`g3n_eval.data.volume_space`), never guessed
from the values, and :func:`g3n_shards.intensity.to_zspace` brings it into z-space exactly once
(:mod:`g3n_eval.sources`); the classes here take z-space volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from g3n_shards.intensity import zscore_brain as _zscore_brain

from .data import InputError


def zscore_brain(volume: np.ndarray, key: str = "?") -> np.ndarray:
    """Brain z-score as the loaders do it (:func:`g3n_shards.intensity.zscore_brain`; voxels > 0,
    background 0); raises a ValueError naming ``key`` for NaN/Inf or no brain voxel."""
    return _zscore_brain(volume, key)[0]


class TokenizerHandle:
    """A registry tokenizer with batching and the provenance the metrics record."""

    def __init__(self, name_or_ref: Any, checkpoint: str | Path | None = None, device: str = "cpu") -> None:
        from g3n_tokenizer.registry import load_tokenizer

        self.tok = load_tokenizer(name_or_ref, checkpoint, map_location=device)
        self.device = device
        ref = self.tok.model_ref()
        self.ref = ref.model_dump(mode="json") if hasattr(ref, "model_dump") else dict(ref)
        use_bf16 = getattr(self.tok, "use_bf16", None)
        #: what the tokenizer computes in (bf16 autocast on CUDA by default): it changes the figures
        self.precision = "bf16" if callable(use_bf16) and use_bf16() else "fp32"
        self.ref["precision"] = self.precision
        self.ref["device"] = str(device)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.tok.geometry.shape)  # type: ignore[return-value]

    @torch.no_grad()
    def decode(self, latents: Sequence[np.ndarray], batch_size: int = 4) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for s in range(0, len(latents), batch_size):
            x = torch.as_tensor(np.stack(latents[s : s + batch_size]), dtype=torch.float32, device=self.device)
            out.extend(v[0] for v in self.tok.decode(x).float().cpu().numpy())
        return out

    @torch.no_grad()
    def reconstruct(self, volumes_z: Sequence[np.ndarray], batch_size: int = 4) -> list[np.ndarray]:
        """z-space volumes -> encode -> decode -> z-space reconstructions."""
        out: list[np.ndarray] = []
        for s in range(0, len(volumes_z), batch_size):
            x = torch.as_tensor(np.stack(volumes_z[s : s + batch_size])[:, None], dtype=torch.float32, device=self.device)
            out.extend(v[0] for v in self.tok.decode(self.tok.encode(x)).float().cpu().numpy())
        return out


    @torch.no_grad()
    def latent_means(self, volumes_z: Sequence[np.ndarray], batch_size: int = 4) -> np.ndarray:
        """z-space volumes -> the mean over tokens of each one's latents (Table 5's probe features)."""
        out = []
        for s in range(0, len(volumes_z), batch_size):
            x = torch.as_tensor(np.stack(volumes_z[s : s + batch_size])[:, None], dtype=torch.float32, device=self.device)
            out.append(self.tok.encode(x).float().mean(dim=1).cpu().numpy())
        return np.concatenate(out)

    @property
    def values_per_volume(self) -> int:
        from g3n_tokenizer.interface import values_per_volume

        return values_per_volume(self.tok)


class MAEFeatures:
    """Mean-over-tokens features of the frozen MAE encoder (the probes' feature space)."""

    def __init__(self, weights: str | Path, device: str = "cpu", img_size: tuple[int, int, int] | None = None) -> None:
        from g3n_mae.checkpoint import CheckpointError, load_model

        self.weights = str(weights)
        try:
            self.model, self.cfg, sha = load_model(weights, img_size=img_size, encoder_only=True)
        except CheckpointError as e:  # missing, unreadable or mismatched weights: the --encoder input
            raise InputError(str(e)) from None
        self.model.to(device).eval()
        self.device = device
        self.digest = sha if str(sha).startswith("sha256:") else f"sha256:{sha}"

    @property
    def img_size(self) -> tuple[int, int, int]:
        return tuple(self.cfg.img_size)  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        return int(self.cfg.embed_dim)

    @torch.no_grad()
    def __call__(self, volumes: Sequence[np.ndarray], batch_size: int = 4) -> np.ndarray:
        """Brain z-space volumes (the loaders' z-score, as :mod:`g3n_eval.sources` gives them) -> (n, hidden) features."""
        feats = []
        for s in range(0, len(volumes), batch_size):
            batch = np.stack([np.asarray(v, dtype=np.float32) for v in volumes[s : s + batch_size]])
            if tuple(batch.shape[1:]) != self.img_size:
                raise InputError(f"volumes of shape {batch.shape[1:]} do not fit the encoder's {self.img_size}")
            x = torch.as_tensor(batch[:, None], dtype=torch.float32, device=self.device)
            feats.append(self.model.encode(x).float().mean(dim=1).cpu().numpy())
        return np.concatenate(feats) if feats else np.zeros((0, self.dim), np.float32)
