"""The one MSE / PSNR / 3D SSIM, against formulas written out independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from g3n_shards import recon_metrics as rm


def _ssim_brute(x, y, L, sigma=1.5, taps=11):
    """SSIM by the definition: a full 3D Gaussian window (outer product) at every valid position."""
    t = np.arange(taps) - taps // 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]
    w /= w.sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    n = [s - taps + 1 for s in x.shape]
    out = np.empty(n)
    for i in range(n[0]):
        for j in range(n[1]):
            for k in range(n[2]):
                a, b = x[i:i + taps, j:j + taps, k:k + taps], y[i:i + taps, j:j + taps, k:k + taps]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cab = (w * (a - ma) * (b - mb)).sum()
                out[i, j, k] = (2 * ma * mb + c1) * (2 * cab + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return out


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (13, 14, 12)).cumsum(0)  # smooth-ish structure, range well above 1
    return x, x + rng.normal(0, 0.3, x.shape)


def test_ssim_map_is_the_windowed_definition(pair):
    x, y = pair
    L = float(x.max() - x.min())
    smap, border = rm.ssim_map(x, y)
    assert border == 5 and smap.shape == (3, 4, 2)
    np.testing.assert_allclose(smap, _ssim_brute(x, y, L), rtol=1e-10, atol=1e-12)
    assert rm.ssim3d(x, y) == pytest.approx(smap.mean(), rel=1e-12)
    assert rm.ssim3d(x, x) == pytest.approx(1.0, abs=1e-12)


def test_window_shrinks_to_the_smallest_side():
    rng = np.random.default_rng(1)
    x, y = rng.random((7, 9, 8)), rng.random((7, 9, 8))
    smap, border = rm.ssim_map(x, y, data_range=1.0)
    assert border == 3  # 7 taps
    np.testing.assert_allclose(smap, _ssim_brute(x, y, 1.0, taps=7), rtol=1e-10)


def test_masked_ssim_averages_inside_the_valid_region(pair):
    x, y = pair
    smap, b = rm.ssim_map(x, y)
    mask = np.zeros(x.shape, bool)
    mask[6:9, 5:8, 5:7] = True
    assert rm.ssim3d(x, y, mask) == pytest.approx(smap[mask[b:-b, b:-b, b:-b]].mean())
    with pytest.raises(ValueError, match="valid region"):
        rm.ssim3d(x, y, np.pad(np.zeros((3, 4, 2), bool), 5, constant_values=True))


def test_mse_psnr_and_the_data_range(pair):
    x, y = pair
    assert rm.mse(x, y) == pytest.approx(((x - y) ** 2).mean())
    L = float(x.max() - x.min())
    assert rm.psnr(x, y) == pytest.approx(10 * math.log10(L * L / ((x - y) ** 2).mean()))
    assert rm.psnr(x, y, data_range=2.0) == pytest.approx(10 * math.log10(4 / ((x - y) ** 2).mean()))
    assert math.isinf(rm.psnr(x, x.copy()))
    m = x > np.median(x)
    assert rm.mse(x, y, m) == pytest.approx(((x - y)[m] ** 2).mean())
    # a constant reference has no peak: L = 1, not a tiny epsilon that would give PSNR ~ 160 dB
    c = np.full((12, 12, 12), 3.0)
    assert rm.data_range_of(c) == 1.0
    assert rm.psnr(c, c + 0.1) == pytest.approx(20.0)


def test_bad_inputs():
    v = np.zeros((12, 12, 12))
    with pytest.raises(ValueError, match="shape mismatch"):
        rm.mse(v, v[:-1])
    with pytest.raises(ValueError, match="3D"):
        rm.mse(v[0], v[0])
    bad = v.copy()
    bad[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="test: volume contains NaN or Inf"):
        rm.psnr(v, bad)
    with pytest.raises(ValueError, match="empty"):
        rm.mse(v, v, np.zeros(v.shape, bool))
