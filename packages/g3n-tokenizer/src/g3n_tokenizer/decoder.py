"""The 3D CNN decoder of the MAE-CNN tokenizer: projected token grid -> voxels.

Shape of an LDM/VQGAN-style decoder made 3D (GroupNorm + SiLU + Conv3d ResBlocks), because a
convolutional decoder is what turns a coarse grid of semantic tokens back into sharp local
intensity, which the frozen ViT encoder deliberately does not model:

    conv_in (c -> ch[0]) at the token grid (10 x 12 x 10 at the paper geometry)
    mid: ResBlock, self-attention over all grid positions, ResBlock(s)  (global context is cheap here:
         1200 positions)
    per level i: nearest x2 upsampling + Conv3d (ch[i] -> ch[i+1]), then ``num_res_blocks`` ResBlocks
    GroupNorm, SiLU, conv_out (ch[-1] -> 1)

``len(channels) - 1`` upsamplings: 4 for 16^3 patches (paper), 3 for 8^3 patches (tiny/test).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig


class ResBlock3D(nn.Module):
    """Pre-activation residual block; a 1x1x1 conv matches widths on the skip path."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # without autograd (decoding) nothing is kept for a backward pass, so the activations and
        # the residual sum may overwrite their inputs: about 7 % faster on CPU, the same numbers
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return h.add_(self.skip(x)) if inplace else self.skip(x) + h


class AttnBlock3D(nn.Module):
    """Multi-head self-attention over every voxel of a (small) 3D grid, residual."""

    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, gx, gy, gz = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # B, L, C
        qkv = self.qkv(h).reshape(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        h = self.proj(h.transpose(1, 2).reshape(b, -1, c))
        return x + h.transpose(1, 2).reshape(b, c, gx, gy, gz)


def fold_nearest_upsample(weight: torch.Tensor) -> torch.Tensor:
    """The 3x3x3 kernel ``weight`` (cout, cin, 3, 3, 3) applied after a nearest x2 upsampling, as
    the 4x4x4 kernel (cin, cout, 4, 4, 4) of one stride-2 transposed convolution (padding 1).

    Along one axis an even output voxel 2i sees the inputs i-1, i, i and an odd one 2i+1 sees i,
    i, i+1, so each output is a 2-tap filter of the input with two of the three taps summed:
    even ``(w0, w1 + w2)``, odd ``(w0 + w1, w2)``. A transposed convolution's kernel interleaves
    those per axis as ``(w2, w1 + w2, w0 + w1, w0)``. The result is the same up to float
    rounding, at 8 of the 27 multiply-adds per output voxel.
    """

    def axis(w: torch.Tensor, dim: int) -> torch.Tensor:
        a, b, c = (w.narrow(dim, i, 1) for i in range(3))
        return torch.cat([c, b + c, a + b, a], dim)

    return axis(axis(axis(weight, 2), 3), 4).transpose(0, 1)


class Upsample3D(nn.Module):
    """Nearest x2 then a 3x3x3 conv (no checkerboard artefacts of a learned transposed conv).

    Computed as one stride-2 transposed conv with the kernel folded from the 3x3x3 one
    (`fold_nearest_upsample`): the same function and the same weights, about 3 times faster on
    CPU for decoding and 2-3 times for a training step (tools/bench/decoder_layout.py, which turns
    ``folded`` off to compare).
    """

    folded: bool = True

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.folded:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return F.conv_transpose3d(x, fold_nearest_upsample(self.conv.weight), self.conv.bias, stride=2, padding=1)


class CnnDecoder3D(nn.Module):
    """(B, c, gx, gy, gz) -> (B, 1, gx*f, gy*f, gz*f) with f = 2^(len(channels) - 1)."""

    def __init__(self, in_channels: int, cfg: DecoderConfig, out_channels: int = 1):
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.conv_in = nn.Conv3d(in_channels, ch[0], 3, padding=1)
        mid: list[nn.Module] = []
        if cfg.mid_res_blocks > 0:
            mid.append(ResBlock3D(ch[0], ch[0], g))
        mid.append(AttnBlock3D(ch[0], cfg.attention_heads, g))
        mid += [ResBlock3D(ch[0], ch[0], g) for _ in range(cfg.mid_res_blocks - 1)]
        self.mid = nn.Sequential(*mid)
        levels: list[nn.Module] = []
        for i in range(len(ch) - 1):
            blocks: list[nn.Module] = [Upsample3D(ch[i], ch[i + 1])]
            blocks += [ResBlock3D(ch[i + 1], ch[i + 1], g) for _ in range(cfg.num_res_blocks)]
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv3d(ch[-1], out_channels, 3, padding=1)

    #: on CPU, run on channels-last activations (the weights stay as they are): oneDNN's 3D
    #: convolutions are faster on them, about 40 % with AMX and 20-30 % for AVX2-only training steps
    #: (tools/bench/decoder_layout.py, which turns this off to compare)
    cpu_channels_last: bool = True

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.cpu_channels_last and z.device.type == "cpu":
            z = z.contiguous(memory_format=torch.channels_last_3d)
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
