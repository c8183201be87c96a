"""The DiT: adaLN-Zero identity at init, shapes, positions, conditions."""

from __future__ import annotations

import pytest
import torch

from dit_testutil import perturb, tiny_model_config, toy_conditions
from g3n_dit.conditions import encode
from g3n_dit.config import DiTConfig, MODEL_PRESETS
from g3n_dit.model import Attention, DiT, DiTBlock, count_parameters, sincos_3d


def _cond(conds, n):
    return encode(conds, [{"disease": "AD", "sex": "M", "modality": "T1", "age": 70.0}] * n)


def test_cpu_attention_is_scaled_dot_product_attention(monkeypatch):
    """Under bf16 autocast on CPU, short sequences go through plain matmuls (faster there than
    torch's fused kernel); it is the same function."""
    torch.manual_seed(0)
    att = Attention(64, 4)
    x = torch.randn(3, 50, 64)
    b, n, d = x.shape
    q, k, v = att.qkv(x).reshape(b, n, 3, 4, d // 4).permute(2, 0, 3, 1, 4)
    ref = att.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
    assert torch.allclose(att(x), ref, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.allclose(att(x).float(), ref, atol=5e-2)
    # and that is the path taken: short bf16 sequences never reach the fused kernel, long ones do
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape[-2]) or fused(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        att(x)
        att(torch.randn(1, 300, 64))
    att(x)
    assert calls == [300, 50]


def test_adaln_zero_blocks_start_as_identity():
    torch.manual_seed(0)
    blk = DiTBlock(64, 4, 4.0)
    x, c = torch.randn(3, 64, 64), torch.randn(3, 64)
    assert torch.equal(blk(x, c), x)
    # and it stops being the identity once the modulation is non-zero (the test can fail)
    perturb(blk)
    assert not torch.allclose(blk(x, c), x)


def test_model_starts_at_zero_velocity_and_every_block_is_identity():
    conds = toy_conditions()
    m = DiT(tiny_model_config(), conds)
    x = torch.randn(2, 64, 4)
    v = m(x, torch.rand(2), _cond(conds, 2))
    assert v.shape == (2, 64, 4)
    assert torch.count_nonzero(v) == 0
    h, c = torch.randn(2, 64, 64), torch.randn(2, 64)
    for blk in m.blocks:
        assert torch.equal(blk(h, c), h)


def test_shape_mismatch_is_a_clear_error():
    conds = toy_conditions()
    m = DiT(tiny_model_config(), conds)
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 63, 4), torch.rand(1), _cond(conds, 1))


def test_conditions_change_the_velocity_and_missing_uses_null():
    conds = toy_conditions()
    m = perturb(DiT(tiny_model_config(), conds))
    x, t = torch.randn(2, 64, 4), torch.full((2,), 0.3)
    a = encode(conds, [{"disease": "AD", "sex": "M", "modality": "T1", "age": 70.0}] * 2)
    b = encode(conds, [{"disease": "HC", "sex": "M", "modality": "T1", "age": 70.0}] * 2)
    missing = encode(conds, [{"disease": None, "sex": "M", "modality": "T1", "age": 70.0}] * 2)
    dropped = {k: (v, p.clone()) for k, (v, p) in a.items()}
    dropped["disease"] = (dropped["disease"][0], torch.zeros(2, dtype=torch.bool))
    assert not torch.allclose(m(x, t, a), m(x, t, b))
    # a missing label and a dropped label are the same null embedding
    assert torch.allclose(m(x, t, missing), m(x, t, dropped))
    # missing age uses the age null vector, not some value
    no_age = encode(conds, [{"disease": "AD", "sex": "M", "modality": "T1", "age": None}] * 2)
    assert not torch.allclose(m(x, t, no_age), m(x, t, a))


def test_positions_are_distinct_and_cover_width():
    pe = sincos_3d(1024, (10, 12, 10))
    assert pe.shape == (1200, 1024)
    assert len({tuple(r.round(5)) for r in pe}) == 1200


def test_paper_preset_size():
    cfg = DiTConfig(**MODEL_PRESETS["paper"])
    assert (cfg.depth, cfg.hidden, cfg.heads, cfg.num_tokens, cfg.channels) == (12, 1024, 16, 1200, 32)
    with torch.device("meta"):
        m = DiT(cfg, toy_conditions())
    n = count_parameters(m)
    # per block: attention 4h^2 + MLP 8h^2 + adaLN 6h^2 = 18h^2 (plus biases) -> ~226M for 12 x 1024
    assert 12 * 18 * 1024**2 < n < 12 * 18 * 1024**2 + 8e6


def test_latent_patch_merges_blocks_of_tokens_and_round_trips():
    """patch p: each p x p x p block of the token grid is one transformer token (DiT's latent patch
    size); unpatchify inverts it exactly, and the model still starts at zero velocity."""
    conds = toy_conditions()
    cfg = tiny_model_config().model_copy(update={"grid": (4, 6, 2), "patch": 2})
    cfg = DiTConfig.model_validate(cfg.model_dump())
    m = DiT(cfg, conds)
    assert m.pos_embed.shape[1] == 2 * 3 * 1 and cfg.patch_grid == (2, 3, 1)
    x = torch.randn(2, 48, 4)
    p = m.patchify(x)
    assert p.shape == (2, 6, 32)
    grid = x.reshape(2, 4, 6, 2, 4)
    # transformer token 0 holds latent tokens (0..1, 0..1, 0..1); token 1 the next block along z... y
    torch.testing.assert_close(p[:, 0].reshape(2, 2, 2, 2, 4), grid[:, 0:2, 0:2, 0:2])
    torch.testing.assert_close(p[:, 1].reshape(2, 2, 2, 2, 4), grid[:, 0:2, 2:4, 0:2])
    assert torch.equal(m.unpatchify(p), x)
    v = m(x, torch.rand(2), _cond(conds, 2))
    assert v.shape == x.shape and torch.count_nonzero(v) == 0
    perturb(m.final)
    assert torch.count_nonzero(m(x, torch.rand(2), _cond(conds, 2))) > 0
    with pytest.raises(ValueError, match="not divisible by patch"):
        DiTConfig.model_validate({**cfg.model_dump(), "grid": (4, 5, 2)})
    small = DiTConfig.model_validate(MODEL_PRESETS["small"])
    assert small.patch_grid == (5, 6, 5)
