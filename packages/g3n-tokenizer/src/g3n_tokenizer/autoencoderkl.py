"""The AutoencoderKL baseline (MONAI ``monai.networks.nets.AutoencoderKL``) behind the same interface.

Trained on the same data with a voxel reconstruction loss plus ``kl_weight`` x KL(q(z|x) || N(0, I)).
``encode`` is deterministic (the posterior mean ``z_mu``), as latent-diffusion pipelines use it.
Its convolutional latent ``(C, gx, gy, gz)`` (8 x 40 x 48 x 40 = 614,400 values at the paper
geometry) is exposed in the interface's token layout ``(N, C)`` with N = gx * gy * gz in C-order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL
from torch import nn

import g3n_shards as gs

from .base import TorchTokenizer, voxel_loss
from .checkpoint import load_strict, read_tokenizer
from .config import AutoencoderKLConfig
from .errors import CheckpointError
from .interface import from_grid, to_grid


def build_autoencoderkl(cfg: AutoencoderKLConfig) -> AutoencoderKL:
    return AutoencoderKL(
        spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=cfg.num_res_blocks, channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels), latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups, with_encoder_nonlocal_attn=cfg.with_encoder_nonlocal_attn,
        with_decoder_nonlocal_attn=cfg.with_decoder_nonlocal_attn,
    )


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent values, averaged over the batch."""
    mu, sigma = z_mu.float(), z_sigma.float()
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(1).mean()


class AutoencoderKLTrainModule(nn.Module):
    """``forward(volumes, target) -> (loss, recon)`` with reparameterised sampling during training."""

    def __init__(self, ae: AutoencoderKL, cfg: AutoencoderKLConfig):
        super().__init__()
        self.ae, self.loss_kind, self.kl_weight = ae, cfg.loss, cfg.kl_weight

    def forward(self, volumes: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        recon, z_mu, z_sigma = self.ae(volumes)
        loss = voxel_loss(self.loss_kind, recon, target) + self.kl_weight * kl_divergence(z_mu, z_sigma)
        return loss, recon


class AutoencoderKLTokenizer(TorchTokenizer):
    """Baseline tokenizer; registered as ``autoencoderkl`` in ``g3n.tokenizers``."""

    name = "autoencoderkl"
    entry_point = "g3n_tokenizer.autoencoderkl:AutoencoderKLTokenizer"
    train_prefix = ""  # the train module holds the whole autoencoder under "ae.", as weights() does
    init_may_differ = ("volume_geometry", "tokenizer.loss", "tokenizer.kl_weight")

    def __init__(self, cfg: AutoencoderKLConfig, volume_geometry: dict[str, Any] | None = None):
        super().__init__()
        self.cfg = cfg
        self.ae = build_autoencoderkl(cfg)
        self._train_module = AutoencoderKLTrainModule(self.ae, cfg)
        self.volume_geometry = dict(volume_geometry or {})

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "AutoencoderKLTokenizer":
        tensors, header = read_tokenizer(path, expect_name=cls.name)
        conf = header["config"]
        try:
            cfg = AutoencoderKLConfig.model_validate(conf["tokenizer"])
        except Exception as e:  # noqa: BLE001 - re-raised naming the file
            raise CheckpointError(f"{path}: invalid embedded config ({e})") from None
        tok = cls(cfg, conf.get("volume_geometry"))
        bad = sorted(k for k in tensors if not k.startswith("ae."))
        if bad:
            raise CheckpointError(f"{path}: unexpected tensors {bad[:6]}")
        load_strict(tok.ae, {k.removeprefix("ae."): v for k, v in tensors.items()}, str(path))
        tok._mark_loaded(path)
        return tok.to(map_location)

    @property
    def geometry(self) -> gs.Geometry:
        f = self.cfg.downsample_factor
        return gs.Geometry(shape=self.cfg.img_size, patch_size=(f, f, f), channels=self.cfg.latent_channels,
                           **self.volume_geometry)

    def config_dict(self) -> dict[str, Any]:
        return {"tokenizer": self.cfg.model_dump(mode="json"), "volume_geometry": self.volume_geometry}

    def weights(self) -> dict[str, torch.Tensor]:
        return {f"ae.{k}": v for k, v in self.ae.state_dict().items()}

    def _encode(self, volumes: torch.Tensor) -> torch.Tensor:
        z_mu, _ = self.ae.encode(volumes)
        return from_grid(z_mu)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.ae.decode(to_grid(latents, self.cfg.latent_grid))

    @property
    def train_module(self) -> nn.Module:
        return self._train_module
