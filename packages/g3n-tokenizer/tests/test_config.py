import pytest
import torch

from g3n_tokenizer.config import ConfigError, DecoderConfig, check_patch_factor, load_config, preset
from g3n_tokenizer.decoder import CnnDecoder3D, count_parameters


def test_presets_validate():
    for name in ("paper", "tiny", "test"):
        cfg = preset(name)
        assert cfg.preset == name
    assert preset("paper").mae_cnn.c == 32
    assert preset("paper").train.max_epochs == 80 and preset("paper").train.patience == 40


def test_paper_decoder_has_about_43_7m_parameters():
    cfg = preset("paper").mae_cnn
    with torch.device("meta"):
        dec = CnnDecoder3D(cfg.c, cfg.decoder)
        proj = torch.nn.Linear(1152, cfg.c)
    n = count_parameters(dec) + count_parameters(proj)
    assert abs(n - 43.7e6) / 43.7e6 < 0.01, n
    assert cfg.decoder.upsample_factor == 16  # 10x12x10 grid -> 160x192x160


def test_paper_decoder_shapes_meta():
    cfg = preset("paper").mae_cnn
    with torch.device("meta"):
        dec = CnnDecoder3D(32, cfg.decoder)
        out = dec(torch.empty(1, 32, 10, 12, 10))
    assert tuple(out.shape) == (1, 1, 160, 192, 160)


def test_decoding_without_autograd_gives_the_training_path_s_numbers():
    """Without autograd the decoder's activations and residual sums work in place: same output,
    its input untouched, and the autograd path still trains."""
    cfg = preset("test").mae_cnn
    torch.manual_seed(0)
    dec = CnnDecoder3D(cfg.c, cfg.decoder).eval()
    z = torch.randn(2, cfg.c, 4, 4, 4)
    z0 = z.clone()
    with torch.inference_mode():
        fast = dec(z)
    with torch.no_grad():
        assert torch.equal(dec(z), fast)
    slow = dec(z)
    assert torch.equal(slow.detach(), fast) and torch.equal(z, z0)
    slow.square().mean().backward()
    assert all(p.grad is not None for p in dec.parameters())


@pytest.mark.parametrize("grid", [(3, 4, 5), (1, 2, 1)])
def test_folded_upsampling_is_nearest_upsampling_then_the_conv(grid):
    """The decoder's upsampling runs as one transposed conv with a folded kernel; it must be the
    nearest x2 + 3x3x3 conv it stands for, in value and in both gradients, borders included."""
    from g3n_tokenizer.decoder import Upsample3D

    torch.manual_seed(0)
    up = Upsample3D(3, 5).double()
    x = torch.randn(2, 3, *grid, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for folded in (False, True):
        up.folded = folded
        y = up(x)
        (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        outs.append(y.detach())
        grads.append((x.grad.clone(), up.conv.weight.grad.clone(), up.conv.bias.grad.clone()))
        x.grad = None
        up.zero_grad()
    assert outs[1].shape == (2, 5, *(2 * g for g in grid))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_autoencoderkl_paper_latent():
    a = preset("paper").autoencoderkl
    assert a.latent_grid == (40, 48, 40) and a.latent_channels == 8
    assert a.latent_channels * 40 * 48 * 40 == 614_400


def test_decoder_must_match_patch():
    with pytest.raises(ConfigError, match="upsamples by 8"):
        check_patch_factor(preset("test").mae_cnn.decoder, (16, 16, 16))
    with pytest.raises(ValueError, match="norm_groups"):
        DecoderConfig(channels=(30, 16), norm_groups=4)


def test_overrides_and_yaml(tmp_path):
    assert preset("paper", mae_cnn={"c": 128}).mae_cnn.c == 128
    assert preset("paper", mae_cnn={"c": None}).mae_cnn.c is None
    p = tmp_path / "c.yaml"
    p.write_text("preset: test\nmae_cnn:\n  c: 16\ntrain:\n  max_epochs: 3\n")
    cfg = load_config(p)
    assert cfg.mae_cnn.c == 16 and cfg.train.max_epochs == 3 and cfg.train.lr == preset("test").train.lr
    p.write_text("preset: test\ntrain:\n  max_epoch: 3\n")
    with pytest.raises(ConfigError, match="max_epoch"):
        load_config(p)


def test_paper_shapes_through_the_tokenizers_meta():
    """Paper geometry end to end on the meta device (no memory, no compute)."""
    from g3n_mae.config import preset as mae_preset
    from g3n_mae.model import MAE3D

    from g3n_tokenizer.autoencoderkl import AutoencoderKLTokenizer
    from g3n_tokenizer.mae_cnn import MaeCnnTokenizer

    x = torch.empty(1, 1, 160, 192, 160, device="meta")
    with torch.device("meta"):
        ae = AutoencoderKLTokenizer(preset("paper").autoencoderkl)
        z_mu, _ = ae.ae.encode(x)
        assert tuple(z_mu.shape) == (1, 8, 40, 48, 40)
        assert ae.latent_shape == (76800, 8) and tuple(ae._decode(ae._encode(x)).shape) == (1, 1, 160, 192, 160)
        mae = MaeCnnTokenizer(MAE3D(mae_preset("paper").model), preset("paper").mae_cnn)
        assert mae.latent_shape == (1200, 32) and mae.geometry.token_grid == (10, 12, 10)
        z = mae.head.project(torch.empty(1, 1200, 1152))
        assert tuple(mae._decode(z).shape) == (1, 1, 160, 192, 160)
