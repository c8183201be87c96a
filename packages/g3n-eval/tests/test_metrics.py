import math

import numpy as np
import pytest
from g3n_eval import metrics as M
from g3n_shards.testing import brain_like


@pytest.fixture
def vol():
    return brain_like(np.random.default_rng(0), (16, 20, 16))


def test_identical_volumes(vol):
    s = M.score_volume(vol, vol.copy())
    assert s.mse == 0 and s.mse_brain == 0
    assert math.isinf(s.psnr) and math.isinf(s.psnr_brain)
    assert s.ssim == pytest.approx(1.0, abs=1e-12)
    assert s.ssim_brain == pytest.approx(1.0, abs=1e-12)
    assert s.brain_voxels == int((vol != 0).sum())


def test_known_mse_and_psnr(vol):
    noisy = vol + 2.0
    assert M.mse(vol, noisy) == pytest.approx(4.0)
    L = float(vol.max() - vol.min())
    assert M.psnr(vol, noisy) == pytest.approx(10 * math.log10(L * L / 4.0))
    assert M.psnr(vol, noisy, data_range=10.0) == pytest.approx(10 * math.log10(100 / 4.0))
    # masked MSE only sees the brain: an error outside the brain does not count there
    bg_err = vol.copy()
    bg_err[vol == 0] = 5.0
    assert M.mse(vol, bg_err, vol != 0) == 0.0
    assert M.mse(vol, bg_err) > 0


def test_ssim_orders_degradation(vol):
    rng = np.random.default_rng(1)
    small = vol + rng.normal(0, 5, vol.shape)
    big = vol + rng.normal(0, 100, vol.shape)
    s_small, s_big = M.ssim3d(vol, small), M.ssim3d(vol, big)
    assert 1.0 > s_small > s_big
    # a constant shift of mean lowers luminance term only slightly; an inversion is very dissimilar
    assert M.ssim3d(vol, vol.max() - vol) < 0.5


def test_ssim_matches_direct_formula_for_global_window():
    # window covering the whole (3x3x3) volume with huge sigma = global SSIM with uniform weights
    rng = np.random.default_rng(2)
    x, y = rng.random((3, 3, 3)), rng.random((3, 3, 3))
    s = M.ssim3d(x, y, data_range=1.0, sigma=1e6, taps=3)
    c1, c2 = (0.01) ** 2, (0.03) ** 2
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(), y.var()
    cxy = ((x - mx) * (y - my)).mean()
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert s == pytest.approx(expected, rel=1e-6)


def test_bad_inputs(vol):
    with pytest.raises(ValueError, match="shape mismatch"):
        M.mse(vol, vol[:-1])
    bad = vol.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.mse(vol, bad)
    with pytest.raises(ValueError, match="empty"):
        M.mse(vol, vol, np.zeros(vol.shape, bool))


def test_zscore_pair_keeps_background_and_scale(vol):
    a, b = M.zscore_pair(vol, vol)
    assert np.allclose(a, b)
    m = vol != 0
    assert a[m].mean() == pytest.approx(0, abs=1e-9) and a[m].std() == pytest.approx(1, abs=1e-9)
    assert (a[~m] == 0).all()


def test_summarise_counts_infinite():
    s = M.summarise([1.0, 3.0, math.inf])
    assert s["n"] == 3 and s["n_infinite"] == 1 and s["mean"] == 2.0


def test_score_volume_consistent_with_parts(vol):
    rng = np.random.default_rng(5)
    test = vol + rng.normal(0, 20, vol.shape)
    s = M.score_volume(vol, test)
    m = vol != 0
    assert s.ssim == pytest.approx(M.ssim3d(vol, test))
    assert s.ssim_brain == pytest.approx(M.ssim3d(vol, test, m))
    assert s.mse_brain == pytest.approx(M.mse(vol, test, m))


def test_real_atlas_degradation_orders_metrics():
    """On a real brain (the SRI24 T1 atlas that g3n-data ships, 2 mm, downsampled), more blur gives
    worse MSE, PSNR and SSIM. The file is in this repository: the test never skips."""
    from pathlib import Path

    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    atlas = Path(__file__).resolve().parents[2] / "g3n-data" / "src" / "g3n_data" / "atlases" / "sri24" / "t1_brain_2mm.nii.gz"
    v = np.squeeze(np.asarray(nib.load(str(atlas)).dataobj, dtype=np.float32))[::2, ::2, ::2]
    v = np.clip(v, 0, None)
    scores = [M.score_volume(v, np.where(v > 0, gaussian_filter(v, s), 0)) for s in (0.5, 1.5)]
    assert scores[0].mse_brain < scores[1].mse_brain
    assert scores[0].psnr_brain > scores[1].psnr_brain
    assert scores[0].ssim_brain > scores[1].ssim_brain


def _noisy_pair(vol, seed=3):
    from g3n_shards.intensity import zscore_brain

    z = zscore_brain(vol)[0].astype(np.float64)
    rng = np.random.default_rng(seed)
    return z, z + (vol > 0) * rng.normal(0, 0.3, vol.shape)


def test_metrics_agree_with_monai(vol):
    """MSE, PSNR and 3D SSIM against MONAI's (an independent implementation) on the same arrays:
    same window (Gaussian, 11 taps, sigma 1.5), constants and data range. MONAI computes in float32."""
    import torch
    from monai.metrics import MSEMetric, PSNRMetric, SSIMMetric

    ref, test = _noisy_pair(vol)
    L = M.data_range_of(ref)
    t_ref, t_test = (torch.from_numpy(a)[None, None] for a in (ref, test))
    ssim = SSIMMetric(spatial_dims=3, data_range=L, kernel_type="gaussian", win_size=11, kernel_sigma=1.5,
                      k1=M.K1, k2=M.K2)(t_test, t_ref)
    assert M.ssim3d(ref, test) == pytest.approx(float(ssim), abs=2e-5)
    assert M.psnr(ref, test) == pytest.approx(float(PSNRMetric(max_val=L)(t_test, t_ref)), abs=1e-4)
    assert M.mse(ref, test) == pytest.approx(float(MSEMetric()(t_test, t_ref)), rel=1e-5)
    # and the SSIM map itself, voxel by voxel, against MONAI's valid-convolution map
    from monai.metrics.regression import compute_ssim_and_cs

    monai_map, _ = compute_ssim_and_cs(t_test, t_ref, 3, [11, 11, 11], [1.5, 1.5, 1.5], L, "gaussian", M.K1, M.K2)
    np.testing.assert_allclose(M.ssim_map(ref, test)[0], monai_map[0, 0].double().numpy(), atol=5e-5)


def test_tokenizer_sweep_and_recon_score_alike(vol):
    """The tokenizer sweep's per-volume metrics are the recon command's: one implementation, so a
    constant target gets data range 1.0 in both (it got 1e-8 in the sweep before)."""
    import torch
    from g3n_tokenizer.metrics import reconstruction_metrics

    ref, test = _noisy_pair(vol)
    const = np.full(vol.shape, 0.5)
    got = reconstruction_metrics(torch.from_numpy(np.stack([test, const + 0.1])), torch.from_numpy(np.stack([ref, const])))
    for j, (r, t) in enumerate(((ref, test), (const, const + 0.1))):
        s = M.score_volume(r, t, mask=np.ones(r.shape, bool))
        assert got["mse"][j] == pytest.approx(s.mse, rel=1e-6)
        assert got["psnr"][j] == pytest.approx(s.psnr, rel=1e-6)
        assert got["ssim"][j] == pytest.approx(s.ssim, rel=1e-6)
    assert got["psnr"][1] == pytest.approx(20.0, rel=1e-6)  # L = 1, MSE 0.01
