"""Model tests: masking, patch order, loss on masked patches only, sizes, pos-embed interpolation."""

from __future__ import annotations

import pytest
import torch

from g3n_mae.config import ConfigError, ModelConfig, preset
from g3n_mae.masking import random_masking, sample_noise
from g3n_mae.flops import train_flops_per_volume
from g3n_mae.model import (
    MAE3D, count_parameters, interpolate_pos_embed, param_count_formula, patchify, sincos_pos_embed_3d, unpatchify,
)


@pytest.fixture
def cfg() -> ModelConfig:
    return preset("test").model


def _model(cfg: ModelConfig, seed: int = 0) -> MAE3D:
    torch.manual_seed(seed)
    return MAE3D(cfg).eval()


def test_presets_geometry():
    paper, tiny = preset("paper").model, preset("tiny").model
    assert paper.img_size == (160, 192, 160) and paper.patch_size == (16, 16, 16)
    assert paper.grid_size == (10, 12, 10) and paper.num_patches == 1200 and paper.num_visible == 360
    assert (paper.embed_dim, paper.depth, paper.num_heads, paper.mlp_dim) == (1152, 12, 16, 4608)
    assert (paper.decoder_embed_dim, paper.decoder_depth, paper.decoder_num_heads) == (512, 8, 16)
    assert tiny.img_size == (80, 96, 80) and tiny.patch_size == (8, 8, 8) and tiny.num_patches == 1200
    assert tiny.num_visible == 360


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ModelConfig(img_size=(30, 32, 32), patch_size=(8, 8, 8))
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")


def test_masking_counts_and_restore():
    x = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    vis, mask, ids_restore, ids_keep = random_masking(x, 4, torch.rand(2, 10, generator=torch.Generator().manual_seed(0)))
    assert vis.shape == (2, 4, 3)
    assert mask.sum(1).tolist() == [6.0, 6.0]
    for b in range(2):
        # visible tokens are exactly the unmasked grid positions, in keep order
        assert sorted(ids_keep[b].tolist()) == sorted(torch.nonzero(mask[b] == 0).flatten().tolist())
        assert torch.equal(vis[b], x[b, ids_keep[b]])
    # ids_restore inverts the shuffle
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(10).expand(2, 10))


def test_paper_mask_counts():
    paper = preset("paper").model
    x = torch.zeros(3, paper.num_patches, 6)
    _, mask, _, _ = random_masking(x, paper.num_visible)
    assert mask.sum(1).tolist() == [840.0] * 3


def test_sample_noise_is_deterministic_and_keyed():
    a, b = sample_noise(0, 1, "k1", 64), sample_noise(0, 1, "k1", 64)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_noise(0, 2, "k1", 64))
    assert not torch.equal(a, sample_noise(0, 1, "k2", 64))


def test_encoder_sees_only_visible_tokens(cfg):
    model = _model(cfg)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    x = torch.randn(2, 1, *cfg.img_size)
    noise = torch.rand(2, cfg.num_patches, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(x, noise=noise)
    assert seen[0] == (2, cfg.num_visible, cfg.embed_dim)
    assert latent.shape == (2, cfg.num_visible, cfg.embed_dim)
    # changing the voxels of masked patches cannot change the encoder output
    patches = patchify(x, cfg.patch_size)
    changed = patches + 5.0 * mask.unsqueeze(-1) * torch.randn_like(patches)
    with torch.no_grad():
        latent2, _, _ = model.forward_encoder(unpatchify(changed, cfg.patch_size, cfg.grid_size), noise=noise)
    assert torch.allclose(latent, latent2, atol=1e-6)
    # ... while changing a visible patch does
    vis = torch.nonzero(mask[0] == 0)[0, 0]
    changed[0, vis] += 1.0
    with torch.no_grad():
        latent3, _, _ = model.forward_encoder(unpatchify(changed, cfg.patch_size, cfg.grid_size), noise=noise)
    assert not torch.allclose(latent, latent3, atol=1e-4)


def test_patchify_roundtrip_and_order_matches_conv():
    x = torch.randn(2, 1, 16, 24, 8)
    p = (8, 4, 8)
    patches = patchify(x, p)
    assert patches.shape == (2, 2 * 6 * 1, 8 * 4 * 8)
    assert torch.equal(unpatchify(patches, p, (2, 6, 1)), x)
    # a Conv3d with one-hot kernels copies each patch's voxels into the channels: its token order
    # (flatten of the output grid) must equal patchify's patch order
    conv = torch.nn.Conv3d(1, 8 * 4 * 8, kernel_size=p, stride=p, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(8 * 4 * 8).reshape(8 * 4 * 8, 1, *p))
        tokens = conv(x).flatten(2).transpose(1, 2)
    assert torch.allclose(tokens, patches)


def test_patch_order_with_channels():
    x = torch.randn(1, 2, 8, 8, 8)
    assert torch.equal(unpatchify(patchify(x, (4, 4, 4)), (4, 4, 4), (2, 2, 2), in_chans=2), x)


def test_loss_only_on_masked_patches(cfg):
    model = _model(cfg)
    x = torch.randn(2, 1, *cfg.img_size)
    noise = torch.rand(2, cfg.num_patches, generator=torch.Generator().manual_seed(2))
    loss, pred, mask = model(x, noise=noise)
    pred = pred.detach().requires_grad_(True)
    loss = model.forward_loss(x, pred, mask)
    loss.backward()
    vis = mask == 0
    assert torch.all(pred.grad[vis] == 0)
    assert torch.all(pred.grad[~vis].abs().sum(-1) > 0)
    # per-patch MSE averaged over masked patches, by hand
    target = patchify(x, cfg.patch_size)
    per = ((pred.detach() - target) ** 2).mean(-1)
    assert torch.allclose(loss, per[~vis].mean(), rtol=1e-5)
    # perfect prediction on masked patches gives zero loss whatever the visible ones are
    perfect = torch.where(vis.unsqueeze(-1), torch.randn_like(target), target)
    assert model.forward_loss(x, perfect, mask).item() == 0.0


def test_norm_pix_target(cfg):
    model = _model(cfg.model_copy(update={"norm_pix_loss": True}))
    x = 3.0 + 2.0 * torch.randn(1, 1, *cfg.img_size)
    target = patchify(x, cfg.patch_size)
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.ones(1, cfg.num_patches)
    assert model.forward_loss(x, t, mask).item() < 1e-10


def test_encode_is_unmasked_token_grid(cfg):
    model = _model(cfg)
    with torch.no_grad():
        tokens = model.encode(torch.randn(2, 1, *cfg.img_size))
    assert tokens.shape == (2, cfg.num_patches, cfg.embed_dim)


def test_wrong_input_shape_is_refused(cfg):
    with pytest.raises(ValueError, match="expected input"):
        _model(cfg)(torch.randn(1, 1, 16, 16, 16))


def test_param_count_matches_formula():
    for name in ("test", "tiny"):
        c = preset(name).model
        assert count_parameters(MAE3D(c)) == param_count_formula(c)["total"]
    paper = preset("paper").model
    with torch.device("meta"):
        model = MAE3D(paper)
    f = param_count_formula(paper)
    assert count_parameters(model) == f["total"]
    # closed form for the encoder: patch embed + 12 x (12 d^2 + 13 d) with MLP 4d + final norm
    d = 1152
    assert f["encoder"] == (4096 * d + d) + 12 * (12 * d * d + 13 * d) + 2 * d == 196_004_736
    enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder_", "mask_token")))
    assert enc == f["encoder"]
    assert train_flops_per_volume(paper) > 0


def test_sincos_embedding_and_interpolation():
    emb = sincos_pos_embed_3d(512, (10, 12, 10))  # 512 is not a multiple of 6: zero-padded
    assert emb.shape == (1200, 512) and (emb[:, 510:] == 0).all()
    assert len({tuple(r) for r in emb[:, :504].round(6).tolist()}) == 1200  # every position distinct
    pos = torch.from_numpy(sincos_pos_embed_3d(48, (4, 4, 4))).unsqueeze(0)
    assert torch.equal(interpolate_pos_embed(pos, (4, 4, 4), (4, 4, 4)), pos)
    up = interpolate_pos_embed(pos, (4, 4, 4), (5, 4, 4))
    assert up.shape == (1, 80, 48)


def test_patch_embedding_equals_conv3d():
    from g3n_mae.model import PatchEmbed3D

    torch.manual_seed(0)
    for chans in (1, 2):
        pe = PatchEmbed3D((4, 2, 4), chans, 12)
        x = torch.randn(2, chans, 8, 6, 12)
        assert torch.allclose(pe(x), pe.forward_conv(x), atol=1e-5)


def test_yaml_config_roundtrip_and_errors(tmp_path):
    import yaml

    from g3n_mae.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"preset": "paper", "train": {"batch_size": 2}}))
    cfg = load_config(p)
    assert cfg.model == preset("paper").model and cfg.train.batch_size == 2
    full = tmp_path / "full.yaml"
    full.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(full) == cfg
    p.write_text("preset: paper\nmodel:\n  embed_dimm: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*embed_dimm"):
        load_config(p)
