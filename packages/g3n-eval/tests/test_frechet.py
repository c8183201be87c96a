import numpy as np
import pytest
from g3n_eval.frechet import FrechetError, GaussianStats, frechet_between, frechet_distance


def test_isotropic_closed_form():
    d = 7
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = 2.0, 0.5  # standard deviations
    fd = frechet_distance(mu1, np.eye(d) * s1**2, mu2, np.eye(d) * s2**2)
    assert fd == pytest.approx(np.sum((mu1 - mu2) ** 2) + d * (s1 - s2) ** 2, rel=1e-9)


def test_general_closed_form_commuting_covariances():
    # diagonal covariances commute: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    fd = frechet_distance(np.ones(3), np.diag(a), np.zeros(3), np.diag(b))
    assert fd == pytest.approx(3 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-9)


def test_sampled_gaussians_approach_closed_form():
    rng = np.random.default_rng(0)
    d, n = 4, 20000
    x = rng.normal(0, 1, (n, d))
    y = rng.normal(1, 2, (n, d))
    assert frechet_between(x, y) == pytest.approx(d * 1 + d * 1, rel=0.05)
    assert frechet_between(x, x) == pytest.approx(0, abs=1e-8)


def test_singular_covariance_is_handled():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(3, 10)), rng.normal(size=(4, 10))  # rank-deficient
    fd = frechet_between(x, y)
    assert np.isfinite(fd) and fd > 0


def test_errors():
    with pytest.raises(FrechetError, match="at least 2"):
        GaussianStats.of(np.zeros((1, 3)))
    with pytest.raises(FrechetError, match="incompatible"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_low_rank_route_equals_sqrtm_route():
    from g3n_eval.frechet import frechet_from_features

    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 12))
    y = rng.normal(0.5, 1.5, size=(25, 12)) @ rng.normal(size=(12, 12))
    sx, sy = GaussianStats.of(x), GaussianStats.of(y)
    ref = frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma)
    assert frechet_from_features(x, y) == pytest.approx(ref, rel=1e-7)
    # wide, rank-deficient case (the FID regime): both routes agree too
    xw, yw = rng.normal(size=(6, 40)), rng.normal(1, 2, size=(5, 40))
    sx, sy = GaussianStats.of(xw), GaussianStats.of(yw)
    assert frechet_between(xw, yw) == pytest.approx(frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma), rel=1e-5)
