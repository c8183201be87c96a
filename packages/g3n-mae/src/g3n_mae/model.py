"""3D masked autoencoder (MAE) with a ViT encoder and a separate ViT decoder.

Follows facebookresearch/mae ``models_mae.py`` with the 2D parts made 3D:

* ``PatchEmbed3D`` is a Conv3d with kernel = stride = patch size; its output is flattened in
  (gx, gy, gz) C-order, i.e. token index ``(i * gy + j) * gz + k``.  ``patchify`` produces
  reconstruction targets in exactly that token order (tested), with the within-patch order
  (px, py, pz, C).
* Fixed 3D sin-cos positional embeddings over the token grid (one third of the width per axis),
  stored as persistent buffers so a strict load checks them, and interpolated trilinearly when a
  checkpoint is loaded for another geometry (``interpolate_pos_embed``).
* No class token: the encoder's output for an unmasked volume is the 1200 x hidden token grid the
  downstream stages consume, and the probes use its mean.
* Attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (flash/efficient
  kernels on GPU).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .masking import random_masking

# ---------------------------------------------------------------------------------------------
# positional embedding
# ---------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim) [sin | cos] with MAE's frequencies (dim even)."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_3d(dim: int, grid: tuple[int, int, int]) -> np.ndarray:
    """(gx*gy*gz, dim) fixed embedding in token order; each axis gets an even share of the width.

    When ``dim`` is not a multiple of 6 (e.g. the decoder's 512) the few leftover channels are
    zero, which keeps every size configurable.
    """
    per_axis = (dim // 6) * 2
    if per_axis == 0:
        raise ValueError(f"embedding width {dim} too small for a 3D sin-cos embedding (need >= 6)")
    gx, gy, gz = grid
    ii, jj, kk = np.meshgrid(np.arange(gx), np.arange(gy), np.arange(gz), indexing="ij")
    emb = np.concatenate([_sincos_1d(per_axis, a) for a in (ii, jj, kk)], axis=1)
    if emb.shape[1] < dim:
        emb = np.concatenate([emb, np.zeros((emb.shape[0], dim - emb.shape[1]))], axis=1)
    return emb.astype(np.float32)


def interpolate_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int, int], new_grid: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resampling of a (1, L_old, D) grid embedding to (1, L_new, D)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(1, *old_grid, d).permute(0, 4, 1, 2, 3).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="trilinear", align_corners=False)
    return grid.permute(0, 2, 3, 4, 1).reshape(1, -1, d).to(pos.dtype)


# ---------------------------------------------------------------------------------------------
# patches
# ---------------------------------------------------------------------------------------------


def patchify(imgs: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(N, C, X, Y, Z) -> (N, L, px*py*pz*C) in the patch embedding's token order."""
    n, c, x, y, z = imgs.shape
    px, py, pz = patch_size
    if x % px or y % py or z % pz:
        raise ValueError(f"volume {(x, y, z)} not divisible by patch size {patch_size}")
    gx, gy, gz = x // px, y // py, z // pz
    t = imgs.reshape(n, c, gx, px, gy, py, gz, pz)
    t = t.permute(0, 2, 4, 6, 3, 5, 7, 1)  # n, gx, gy, gz, px, py, pz, c
    return t.reshape(n, gx * gy * gz, px * py * pz * c)


def unpatchify(patches: torch.Tensor, patch_size: tuple[int, int, int], grid: tuple[int, int, int], in_chans: int = 1) -> torch.Tensor:
    """Inverse of :func:`patchify`: (N, L, px*py*pz*C) -> (N, C, X, Y, Z)."""
    n, length, _ = patches.shape
    px, py, pz = patch_size
    gx, gy, gz = grid
    if length != gx * gy * gz:
        raise ValueError(f"{length} patches do not fill grid {grid}")
    t = patches.reshape(n, gx, gy, gz, px, py, pz, in_chans)
    t = t.permute(0, 7, 1, 4, 2, 5, 3, 6)  # n, c, gx, px, gy, py, gz, pz
    return t.reshape(n, in_chans, gx * px, gy * py, gz * pz)


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches -> tokens; the parameters are those of a Conv3d (kernel = stride = patch).

    ``forward`` computes exactly the Conv3d as ``patchify`` + one matmul: the same numbers, but a
    plain GEMM instead of a 16^3-kernel 3D convolution, which is faster on GPUs and CPUs.
    ``forward_conv`` is the literal convolution (tests check both agree).
    """

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight  # (D, C, px, py, pz) -> (D, px*py*pz*C), patchify's within-patch order
        w = w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)
        return F.linear(patchify(x.to(w.dtype), self.patch_size), w, self.proj.bias)  # N, L, D

    def forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x.to(self.proj.weight.dtype))  # N, D, gx, gy, gz
        return x.flatten(2).transpose(1, 2)  # N, L, D (C-order over the grid)


# ---------------------------------------------------------------------------------------------
# transformer
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm ViT block: x + Attn(LN(x)); x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


# ---------------------------------------------------------------------------------------------
# the MAE
# ---------------------------------------------------------------------------------------------


class MAE3D(nn.Module):
    """Masked autoencoder over 3D volumes (N, C, X, Y, Z)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, dd = cfg.embed_dim, cfg.decoder_embed_dim
        # encoder
        self.patch_embed = PatchEmbed3D(cfg.patch_size, cfg.in_chans, d)
        self.register_buffer("pos_embed", torch.zeros(1, cfg.num_patches, d), persistent=True)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_dim, cfg.layer_norm_eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        # decoder
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos_embed", torch.zeros(1, cfg.num_patches, dd), persistent=True)
        self.decoder_blocks = nn.ModuleList(
            Block(dd, cfg.decoder_num_heads, cfg.decoder_mlp_dim, cfg.layer_norm_eps) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=cfg.layer_norm_eps)
        self.decoder_pred = nn.Linear(dd, cfg.patch_dim)
        self.initialize_weights()

    # -- init ----------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """MAE init: fixed sin-cos pos-embeds, xavier-uniform linears (and the conv as a linear)."""
        if self.pos_embed.is_meta:  # parameter counting on the meta device: nothing to fill
            return
        g = self.cfg.grid_size
        self.pos_embed.copy_(torch.from_numpy(sincos_pos_embed_3d(self.cfg.embed_dim, g)).unsqueeze(0))
        self.decoder_pos_embed.copy_(torch.from_numpy(sincos_pos_embed_3d(self.cfg.decoder_embed_dim, g)).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- helpers -------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.cfg.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, self.cfg.patch_size, self.cfg.grid_size, self.cfg.in_chans)

    def _check_input(self, imgs: torch.Tensor) -> None:
        want = (self.cfg.in_chans, *self.cfg.img_size)
        if imgs.ndim != 5 or tuple(imgs.shape[1:]) != want:
            raise ValueError(f"expected input (N, {', '.join(map(str, want))}), got {tuple(imgs.shape)}")

    # -- encoder -------------------------------------------------------------------------------
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed, mask, then run the encoder on the visible tokens only.

        Returns latent (N, len_keep, D), mask (N, L; 1 = masked), ids_restore (N, L).
        """
        self._check_input(imgs)
        x = self.patch_embed(imgs) + self.pos_embed.to(self.patch_embed.proj.weight.dtype)
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        len_keep = max(1, int(round(x.shape[1] * (1.0 - ratio), 6) // 1))
        x, mask, ids_restore, _ = random_masking(x, len_keep, noise)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder output (N, L, D) in grid order: the features downstream stages use."""
        self._check_input(imgs)
        x = self.patch_embed(imgs) + self.pos_embed.to(self.patch_embed.proj.weight.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    # -- decoder -------------------------------------------------------------------------------
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Visible latents + mask tokens, restored to grid order -> per-patch predictions (N, L, P)."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, length - x.shape[1], -1)
        x = torch.cat([x, mask_tokens], dim=1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = x + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    # -- loss ----------------------------------------------------------------------------------
    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE (visible patches carry no loss)."""
        target = self.patchify(imgs.float())
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


# ---------------------------------------------------------------------------------------------
# size and cost formulas (used by tests and the benchmark)
# ---------------------------------------------------------------------------------------------


def _vit_params(dim: int, mlp: int, depth: int) -> int:
    block = 2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * mlp + mlp) + (mlp * dim + dim)
    return depth * block + 2 * dim  # + final LayerNorm


def param_count_formula(cfg: ModelConfig) -> dict[str, int]:
    """Trainable parameters by closed form (buffers such as pos-embeds are not parameters)."""
    p3c = cfg.patch_dim
    d, dd = cfg.embed_dim, cfg.decoder_embed_dim
    encoder = (p3c * d + d) + _vit_params(d, cfg.mlp_dim, cfg.depth)
    decoder = (d * dd + dd) + dd + _vit_params(dd, cfg.decoder_mlp_dim, cfg.decoder_depth) + (dd * p3c + p3c)
    return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MAE3D", "PatchEmbed3D", "patchify", "unpatchify", "sincos_pos_embed_3d", "interpolate_pos_embed",
    "param_count_formula", "count_parameters",
]
