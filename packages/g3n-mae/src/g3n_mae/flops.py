"""Model FLOPs of the MAE (for throughput in TFLOP/s and MFU): matmuls only, 2 FLOPs per
multiply-add; norms, softmax and elementwise work are ignored, as is usual for MFU."""

from __future__ import annotations

from .config import ModelConfig


def _vit_flops(tokens: int, dim: int, mlp: int, depth: int) -> int:
    """Forward matmul FLOPs (2 per multiply-add) of ``depth`` blocks on ``tokens`` tokens."""
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * mlp)
    attn = 2 * 2 * tokens * tokens * dim  # QK^T and AV
    return depth * (linear + attn)


def train_flops_per_volume(cfg: ModelConfig) -> int:
    """Model FLOPs of one training step per volume (forward + backward = 3 x forward).

    Counts the matmuls (patch embedding of all patches, encoder on visible tokens, decoder on
    all tokens, prediction head); norms, softmax and elementwise work are ignored, as is usual
    for MFU.
    """
    n, v = cfg.num_patches, cfg.num_visible
    d, dd = cfg.embed_dim, cfg.decoder_embed_dim
    fwd = 2 * n * cfg.patch_dim * d
    fwd += _vit_flops(v, d, cfg.mlp_dim, cfg.depth)
    fwd += 2 * v * d * dd
    fwd += _vit_flops(n, dd, cfg.decoder_mlp_dim, cfg.decoder_depth)
    fwd += 2 * n * dd * cfg.patch_dim
    return 3 * fwd


def encode_flops_per_volume(cfg: ModelConfig) -> int:
    """Forward FLOPs of the unmasked encoder for one volume."""
    n, d = cfg.num_patches, cfg.embed_dim
    return 2 * n * cfg.patch_dim * d + _vit_flops(n, d, cfg.mlp_dim, cfg.depth)
