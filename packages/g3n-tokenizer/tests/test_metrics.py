import math

import torch

from g3n_tokenizer.metrics import mse, psnr, ssim


def test_identity_and_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 24, 24, 24, generator=g)
    assert torch.allclose(mse(x, x), torch.zeros(2))
    assert math.isinf(float(psnr(x, x)[0]))
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    small = x + 0.05 * torch.randn(x.shape, generator=g)
    big = x + 0.5 * torch.randn(x.shape, generator=g)
    assert (ssim(small, x) > ssim(big, x)).all() and (ssim(big, x) < 0.9).all()
    assert (psnr(small, x) > psnr(big, x)).all()


def test_psnr_formula():
    x = torch.zeros(1, 1, 12, 12, 12)
    x[..., 0, 0, 0] = 4.0  # range 4
    y = x + 0.1
    expected = 10 * math.log10(16 / 0.01)
    assert abs(float(psnr(y, x)[0]) - expected) < 1e-3
