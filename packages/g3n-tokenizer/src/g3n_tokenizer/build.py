"""A freshly initialised tokenizer to train, for ``g3n-tokenizer train`` and the Table-5 sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .base import TorchTokenizer
from .config import TokenizerConfig
from .train import _seed


def new_tokenizer(name: str, cfg: TokenizerConfig, volume_geometry: dict[str, Any],
                  mae_checkpoint: str | Path | None = None, img_size: Sequence[int] | None = None,
                  device: str | torch.device = "cpu") -> tuple[TorchTokenizer, str]:
    """(tokenizer, its voxel loss kind) for ``name`` (``mae-cnn`` or ``autoencoderkl``).

    The new layers are initialised from ``cfg.train.seed``, not from whatever the process's random
    streams hold, so a run (or a sweep arm) is repeated exactly by running it again. ``img_size``:
    the volumes' shape, which the AutoencoderKL is built for."""
    _seed(cfg.train.seed)
    if name == "mae-cnn":
        if mae_checkpoint is None:
            raise ValueError("the mae-cnn tokenizer needs an MAE checkpoint")
        from .mae_cnn import MaeCnnTokenizer

        return MaeCnnTokenizer.from_mae(mae_checkpoint, cfg.mae_cnn, volume_geometry, map_location=device), cfg.mae_cnn.loss
    if name == "autoencoderkl":
        from .autoencoderkl import AutoencoderKLTokenizer

        acfg = cfg.autoencoderkl
        if img_size is not None:  # re-validated: the new size must suit the network's downsampling
            acfg = type(acfg).model_validate({**acfg.model_dump(), "img_size": tuple(img_size)})
        return AutoencoderKLTokenizer(acfg, volume_geometry).to(device), acfg.loss
    raise ValueError(f"unknown tokenizer {name!r} (mae-cnn or autoencoderkl)")
