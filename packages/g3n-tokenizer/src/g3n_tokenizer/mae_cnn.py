"""MAE-CNN tokenizer (docs/method.md §3): frozen g3n-mae encoder -> Linear(hidden, c) -> 3D CNN decoder.

The encoder is loaded from its g3n-mae checkpoint (``g3n_mae.checkpoint.load_model``, strict) and
frozen: ``requires_grad=False``, always in eval mode, run under ``no_grad``, and kept out of the
trainable module, so no optimizer or DeepSpeed engine ever sees (or casts) its weights. The paper
trains projection and decoder only; training encoder and decoder jointly on the reconstruction
loss drifts the encoder toward local intensity and costs clinical content.

Latents are the projected tokens ``(N, c)`` in the encoder's token order (C-order over the grid);
with ``c = None`` there is no projection and the latent is the raw ``(N, hidden)`` token grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import g3n_shards as gs
from g3n_mae.checkpoint import OBJECTIVE_FIELDS as MAE_OBJECTIVE_FIELDS
from g3n_mae.config import ModelConfig as MaeModelConfig
from g3n_mae.model import MAE3D

from .base import TorchTokenizer, voxel_loss
from .checkpoint import check_weights, load_strict, read_tokenizer
from .config import MaeCnnConfig, check_patch_factor
from .decoder import CnnDecoder3D
from .errors import CheckpointError
from .interface import to_grid


def is_mae_decoder_key(key: str) -> bool:
    """Keys of the MAE's own (pretraining) decoder, which the tokenizer neither needs nor stores."""
    return key.startswith(("decoder_", "mask_token"))


class FrozenMaeEncoder(nn.Module):
    """The g3n-mae encoder, frozen: unmasked ``MAE3D.encode`` -> (B, N, hidden)."""

    def __init__(self, mae: MAE3D):
        super().__init__()
        self.mae = mae
        for p in self.mae.parameters():
            p.requires_grad_(False)
        self.mae.eval()

    @property
    def cfg(self) -> MaeModelConfig:
        return self.mae.cfg

    def train(self, mode: bool = True) -> "FrozenMaeEncoder":
        """Always eval: a frozen encoder must not change behaviour with the caller's mode."""
        return super().train(False)

    def encoder_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.mae.state_dict().items() if not is_mae_decoder_key(k)}

    def load_encoder_state(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Strict on the encoder: every encoder weight present with its shape, nothing unknown."""
        check_weights(self.encoder_state(), tensors, where, "encoder weights")
        result = self.mae.load_state_dict(tensors, strict=False)
        assert not result.unexpected_keys and all(is_mae_decoder_key(k) for k in result.missing_keys)

    @torch.no_grad()
    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.mae.encode(volumes)


class MaeCnnHead(nn.Module):
    """The trainable part: per-token projection + CNN decoder. ``forward(tokens, target) -> (loss, recon)``."""

    def __init__(self, hidden: int, grid: tuple[int, int, int], cfg: MaeCnnConfig):
        super().__init__()
        self.grid, self.loss_kind = tuple(grid), cfg.loss
        self.proj: nn.Module = nn.Linear(hidden, cfg.c) if cfg.c is not None else nn.Identity()
        self.decoder = CnnDecoder3D(cfg.c if cfg.c is not None else hidden, cfg.decoder)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)

    def reconstruct(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(to_grid(latents, self.grid))  # type: ignore[arg-type]

    def forward(self, tokens: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        recon = self.reconstruct(self.project(tokens))
        return voxel_loss(self.loss_kind, recon, target), recon


class MaeCnnTokenizer(TorchTokenizer):
    """Phase-2 tokenizer of BrainG3N; registered as ``mae-cnn`` in ``g3n.tokenizers``."""

    name = "mae-cnn"
    entry_point = "g3n_tokenizer.mae_cnn:MaeCnnTokenizer"
    train_prefix = "head."
    # the encoder may come from another (e.g. briefly fine-tuned) MAE of the same architecture
    init_may_differ = ("volume_geometry", "mae_checkpoint_digest", "tokenizer.loss",
                       *(f"mae.{k}" for k in MAE_OBJECTIVE_FIELDS))

    def __init__(self, mae: MAE3D, cfg: MaeCnnConfig, volume_geometry: dict[str, Any] | None = None,
                 mae_digest: str | None = None):
        super().__init__()
        mcfg = mae.cfg
        check_patch_factor(cfg.decoder, mcfg.patch_size, "mae-cnn: ")
        if mcfg.in_chans != 1:
            raise ValueError(f"mae-cnn: the encoder takes {mcfg.in_chans} channels; tokenizers work on single-channel volumes")
        self.cfg = cfg
        self.encoder = FrozenMaeEncoder(mae)
        self.head = MaeCnnHead(mcfg.embed_dim, mcfg.grid_size, cfg)
        self.volume_geometry = dict(volume_geometry or {})
        self.mae_digest = mae_digest

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_mae(cls, mae_checkpoint: str | Path, cfg: MaeCnnConfig, volume_geometry: dict[str, Any] | None = None,
                 map_location: str | torch.device = "cpu") -> "MaeCnnTokenizer":
        """A fresh tokenizer (untrained head) around the encoder of a g3n-mae checkpoint/export."""
        from g3n_mae.checkpoint import load_model

        mae, _, digest = load_model(mae_checkpoint, encoder_only=True)
        return cls(mae, cfg, volume_geometry, mae_digest=digest).to(map_location)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "MaeCnnTokenizer":
        tensors, header = read_tokenizer(path, expect_name=cls.name)
        conf = header["config"]
        try:
            mae_cfg = MaeModelConfig.model_validate(conf["mae"])
            cfg = MaeCnnConfig.model_validate(conf["tokenizer"])
        except Exception as e:  # noqa: BLE001 - re-raised naming the file
            raise CheckpointError(f"{path}: invalid embedded config ({e})") from None
        with torch.device("cpu"):
            tok = cls(MAE3D(mae_cfg), cfg, conf.get("volume_geometry"), conf.get("mae_checkpoint_digest"))
        enc = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
        head = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
        other = sorted(k for k in tensors if not k.startswith(("encoder.", "head.")))
        if other:
            raise CheckpointError(f"{path}: unexpected tensors {other[:6]}")
        tok.encoder.load_encoder_state(enc, str(path))
        load_strict(tok.head, head, str(path))
        tok._mark_loaded(path)
        return tok.to(map_location)

    # ---- description --------------------------------------------------------------------
    @property
    def mae_cfg(self) -> MaeModelConfig:
        return self.encoder.cfg

    @property
    def geometry(self) -> gs.Geometry:
        m = self.mae_cfg
        return gs.Geometry(shape=m.img_size, patch_size=m.patch_size, channels=self.cfg.c or m.embed_dim,
                           **self.volume_geometry)

    def config_dict(self) -> dict[str, Any]:
        return {"mae": self.mae_cfg.model_dump(mode="json"), "tokenizer": self.cfg.model_dump(mode="json"),
                "volume_geometry": self.volume_geometry, "mae_checkpoint_digest": self.mae_digest}

    def weights(self) -> dict[str, torch.Tensor]:
        out = {f"encoder.{k}": v for k, v in self.encoder.encoder_state().items()}
        out.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return out

    # ---- model --------------------------------------------------------------------------
    def _encode(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.head.project(self.encoder(volumes))

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.head.reconstruct(latents)

    @property
    def train_module(self) -> nn.Module:
        return self.head

    @torch.no_grad()
    def train_inputs(self, volumes: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.encoder(volumes).float()

    @torch.no_grad()
    def tokens(self, volumes: torch.Tensor) -> torch.Tensor:
        """Unprojected encoder tokens (B, N, hidden), e.g. for probing the no-projection arm."""
        return self.train_inputs(volumes.to(self.device))
