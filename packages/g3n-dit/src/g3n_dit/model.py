"""The DiT: a transformer over a 3D token grid with adaLN-Zero conditioning.

In the spirit of facebookresearch/DiT ``models.py``, adapted to latent tokens that are already
patches: by default no patchify (``patch`` 1), a linear input projection, fixed 3D sin-cos positions of
the token grid; ``patch`` p > 1 merges p x p x p latent tokens into one transformer token, as DiT's
latent patch size does (DiT-XL/2), for 8x fewer tokens at p = 2.
The conditioning vector is the timestep embedding plus the *sum* of every condition's embedding
(docs/method.md §5). Each block's SiLU+Linear produces shift/scale/gate for attention and MLP; the
LayerNorms have no affine parameters; that Linear and the final layer are zero-initialised, so
every block starts as the identity and the network starts by predicting zero velocity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .conditions import CondBatch, Condition, ConditionEmbedder, sinusoid
from .config import DiTConfig


def zero_(layer: nn.Linear) -> None:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(len(pos), dim) sin-cos features of positions (dim even)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_3d(hidden: int, grid: Sequence[int]) -> np.ndarray:
    """(prod(grid), hidden) fixed positions of a 3D grid in C order (x slowest, z fastest).

    Each axis gets the same even share of the width; the few leftover dimensions (hidden not a
    multiple of 6, e.g. 1024) are zero.
    """
    per_axis = 2 * (hidden // 6)
    gx, gy, gz = grid
    ii, jj, kk = np.meshgrid(np.arange(gx), np.arange(gy), np.arange(gz), indexing="ij")
    parts = [sincos_1d(per_axis, a.reshape(-1)) for a in (ii, jj, kk)]
    emb = np.concatenate(parts, axis=1)
    pad = hidden - emb.shape[1]
    if pad:
        emb = np.concatenate([emb, np.zeros((emb.shape[0], pad))], axis=1)
    return emb.astype(np.float32)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (scaled by ``time_scale``) -> sinusoid -> MLP, as in DiT."""

    def __init__(self, hidden: int, freq_dim: int, time_scale: float):
        super().__init__()
        self.freq_dim, self.time_scale = freq_dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoid(t * self.time_scale, self.freq_dim).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if n <= 256 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # torch's fused CPU kernel is slow under bf16 for short sequences: attention forward +
            # backward at 150 tokens took 17 ms against 5 ms as plain (AMX) matmuls; from about 300
            # tokens, and in fp32, the fused kernel is faster (1200 tokens: 99 against 639 ms)
            a = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            y = a.float().softmax(dim=-1).to(v.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + gate * f(modulate(norm(x), shift, scale)) for attention and MLP."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        zero_(self.adaLN_modulation[-1])  # adaLN-Zero: gates start at 0, so the block is the identity

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + g_a[:, None] * self.attn(modulate(self.norm1(x), sh_a, sc_a))
        x = x + g_m[:, None] * self.mlp(modulate(self.norm2(x), sh_m, sc_m))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        zero_(self.adaLN_modulation[-1])
        zero_(self.linear)  # the network starts by predicting zero velocity

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Velocity network v(x_t, t, conditions[, context]) over (B, N, channels) latent tokens."""

    def __init__(self, cfg: DiTConfig, conditions: Sequence[Condition]):
        super().__init__()
        self.cfg = cfg
        self.conditions = list(conditions)
        p3 = cfg.patch**3
        self.x_embed = nn.Linear(p3 * (cfg.channels + cfg.context_channels), cfg.hidden)
        self.register_buffer("pos_embed", torch.from_numpy(sincos_3d(cfg.hidden, cfg.patch_grid))[None], persistent=False)
        self.t_embed = TimestepEmbedder(cfg.hidden, cfg.freq_dim, cfg.time_scale)
        self.c_embed = ConditionEmbedder(self.conditions, cfg.hidden)
        self.blocks = nn.ModuleList([DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final = FinalLayer(cfg.hidden, p3 * cfg.channels)
        self.initialize_weights()

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) latent tokens in C order -> (B, N / p^3, p^3 C): each p x p x p block of the
        grid becomes one transformer token (identity for p = 1)."""
        p = self.cfg.patch
        if p == 1:
            return x
        (gx, gy, gz), (b, _, ch) = self.cfg.grid, x.shape
        x = x.reshape(b, gx // p, p, gy // p, p, gz // p, p, ch).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(b, (gx // p) * (gy // p) * (gz // p), p**3 * ch)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`patchify`."""
        p = self.cfg.patch
        if p == 1:
            return x
        (gx, gy, gz), b = self.cfg.grid, x.shape[0]
        ch = x.shape[-1] // p**3
        x = x.reshape(b, gx // p, gy // p, gz // p, p, p, p, ch).permute(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(b, gx * gy * gz, ch)

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier Linears, N(0, 0.02) timestep MLP, zero adaLN and output."""

        def _basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        # condition embedders keep their own init (tables N(0, .02), null vectors); the rest as DiT
        for name, mod in self.named_modules():
            if not name.startswith("c_embed"):
                _basic(mod)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            zero_(blk.adaLN_modulation[-1])
        zero_(self.final.adaLN_modulation[-1])
        zero_(self.final.linear)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: CondBatch, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, N, channels); t: (B,) in [0, 1]; cond: per condition (values, present);
        context: (B, N, context_channels) or None. Returns the velocity, (B, N, channels)."""
        b, n, ch = x.shape
        if n != self.cfg.num_tokens or ch != self.cfg.channels:
            raise ValueError(
                f"latent shape {(n, ch)} does not match the model's grid {self.cfg.grid} "
                f"({self.cfg.num_tokens} tokens) x {self.cfg.channels} channels"
            )
        if self.cfg.context_channels:
            if context is None or context.shape != (b, n, self.cfg.context_channels):
                raise ValueError(f"this model needs a context of shape {(b, n, self.cfg.context_channels)}")
            x = torch.cat([x, context.to(x.dtype)], dim=-1)
        h = self.x_embed(self.patchify(x)) + self.pos_embed.to(x.dtype)
        c = self.t_embed(t.to(x.device).expand(b) if t.dim() == 0 else t.to(x.device))
        c = c + self.c_embed(cond, b, c)
        for blk in self.blocks:
            h = blk(h, c)
        return self.unpatchify(self.final(h, c))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
