"""Probe fitting: closed-form ridge + GCV and the grouped inner CV match scikit-learn and brute force;
pooling is a mean."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from g3n_probe.ridge import GramStats, grouped_ridge_alpha, ridge_by_fold_cv, ridge_from_stats
from g3n_probe.slices import build_view

ALPHAS = [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]


def _data(seed=0, n=300, p=10):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)) * rng.uniform(0.5, 5, p) + rng.uniform(-10, 10, p)
    X[:, 3] = 2.5  # a constant column must not break standardisation
    y = 2 * X[:, 0] - X[:, 1] + rng.normal(size=n) * 3
    return X, y


def test_ridge_from_stats_matches_sklearn_and_brute_force_gcv():
    X, y = _data()
    n = len(y)
    st = GramStats.of(X[:100], y[:100]) + GramStats.of(X[100:], y[100:])  # parts add up
    probe, rep, gcv = ridge_from_stats(st, ALPHAS)
    sc = StandardScaler().fit(X)
    Z = sc.transform(X)
    ref = Ridge(alpha=rep.alpha).fit(Z, y)
    np.testing.assert_allclose(probe.predict_scores(X), ref.predict(Z), atol=1e-9)
    np.testing.assert_allclose(probe.scale, sc.scale_, rtol=1e-10)
    Zc = Z - Z.mean(axis=0)
    for a, g in zip(ALPHAS, gcv):
        H = Zc @ np.linalg.solve(Zc.T @ Zc + a * np.eye(Z.shape[1]), Zc.T) + 1.0 / n
        r = y - H @ y
        assert np.isclose(g, n * (r @ r) / (n - np.trace(H)) ** 2, rtol=1e-8)
    assert rep.alpha == ALPHAS[int(np.argmin(gcv))]


def test_grouped_inner_cv_prefers_strong_shrinkage_on_noise():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 30))
    y = rng.normal(size=200)
    groups = np.repeat(np.arange(50), 4)
    alpha, mse = grouped_ridge_alpha(X, y, groups, ALPHAS, 5)
    assert alpha >= 100 and mse.shape == (len(ALPHAS),)


def test_grouped_inner_cv_is_sklearns_cross_validation_of_the_standardise_ridge_pipeline():
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline

    X, y = _data(3, n=120)
    groups = np.repeat(np.arange(40), 3)
    alpha, mse = grouped_ridge_alpha(X, y, groups, ALPHAS, 4)
    ref = [-cross_val_score(make_pipeline(StandardScaler(), Ridge(alpha=a)), X, y, groups=groups, cv=GroupKFold(4),
                            scoring="neg_mean_squared_error").mean() for a in ALPHAS]
    np.testing.assert_allclose(mse, ref, rtol=1e-8)  # equal-sized parts: mean of fold MSEs = pooled MSE
    assert alpha == ALPHAS[int(np.argmin(ref))]


def test_nested_fold_cv_from_statistics_equals_fitting_each_part_with_fold_groups():
    """ridge_by_fold_cv (sums of fold statistics, 16 eigendecompositions for 5 folds) chooses the same
    alpha and fits the same probe as fit_regressor on each training part with its fold labels as groups."""
    from g3n_probe import fit_regressor, protocol_preset

    X, y = _data(4, n=250)
    ufold = np.random.default_rng(4).integers(0, 5, len(y))
    cfg = protocol_preset("paper").model_copy(update={"ridge_alphas": ALPHAS, "dtype": "float64"})
    stats = {k: GramStats.of(X[ufold == k], y[ufold == k]) for k in range(5)}
    rows = {k: (X[ufold == k], y[ufold == k]) for k in range(5)}
    fits = ridge_by_fold_cv(stats, rows, [0, 1, 2, 3, 4, "final"], ALPHAS, "float64")
    for k, (probe, rep) in fits.items():
        m = np.ones(len(y), bool) if k == "final" else ufold != k
        ref, ref_rep = fit_regressor(X[m], y[m], cfg, groups=ufold[m])
        assert rep.alpha == ref_rep.alpha
        np.testing.assert_allclose(probe.predict_scores(X), ref.predict_scores(X), rtol=1e-7, atol=1e-7)


def test_grouped_inner_cv_does_not_fit_the_subject_where_gcv_does():
    """Why 'folds' is the default: with several visits per subject, a target that is each subject's own
    (not predictable across subjects) is learnt by GCV through subject-identifying features, with little
    shrinkage; CV that holds subjects out sees no gain and shrinks hard."""
    from g3n_probe import fit_regressor, protocol_preset

    rng = np.random.default_rng(6)
    n_sub, visits, p = 60, 4, 80
    subject_x = rng.normal(size=(n_sub, p))
    subject_y = rng.normal(size=n_sub) * 10
    X = np.repeat(subject_x, visits, axis=0) + rng.normal(size=(n_sub * visits, p)) * 0.1
    y = np.repeat(subject_y, visits) + rng.normal(size=n_sub * visits)
    groups = np.repeat(np.arange(n_sub), visits)
    cfg = protocol_preset("paper").model_copy(update={"ridge_alphas": ALPHAS})
    _, gcv = fit_regressor(X, y, cfg.model_copy(update={"ridge_inner_cv": "gcv"}), groups=groups)
    _, folds = fit_regressor(X, y, cfg, groups=groups)
    assert gcv.alpha <= 1.0 and folds.alpha >= 100.0


def test_pooled_view_is_session_mean():
    rng = np.random.default_rng(2)
    recs, rows = [], []
    for s in range(4):
        for ses in range(2):
            for m in ("T1", "T2", "FLAIR")[: 1 + (s + ses) % 3]:
                recs.append({"key": f"k{s}{ses}{m}", "subject": f"s{s}", "session": f"ses-{ses}", "cohort": "C", "modality": m})
                rows.append(rng.normal(size=3))
    X = np.asarray(rows)
    v = build_view("pooled", X, recs, np.arange(len(recs)))
    assert len(v.unit_keys) == 8 and v.n_volumes == len(recs)
    for key, members, x in zip(v.unit_keys, v.members, v.X):
        assert len({f"{recs[i]['subject']}/{recs[i]['session']}" for i in members}) == 1
        np.testing.assert_allclose(x, X[members].mean(axis=0))
    only_two = build_view("pooled", X, recs, np.arange(len(recs)), min_modalities=2)
    assert all(len(m) >= 2 for m in only_two.members) and len(only_two.members) < 8
    t2 = build_view("T2", X, recs, np.arange(len(recs)))
    assert all(recs[m[0]]["modality"] == "T2" for m in t2.members)


def test_fit_classifier_leaves_callers_features_alone():
    from g3n_probe import fit_classifier, protocol_preset

    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 4)).astype(np.float32) + 5
    before = X.copy()
    y = np.where(X[:, 0] > 5, "a", "b")
    probe, rep = fit_classifier(X, y, protocol_preset("paper"))
    assert np.array_equal(X, before) and rep.converged
    np.testing.assert_allclose(probe.mean, before.mean(axis=0), rtol=1e-5)


def test_wide_features_use_the_kernel_form_with_the_same_fit():
    """More columns than rows (flattened latents): the n x n kernel form gives the Gram form's
    probe and GCV curve, and fit_regressor takes it, so a 38,400-d set never builds a p x p matrix."""
    from g3n_probe import fit_regressor, protocol_preset
    from g3n_probe.ridge import ridge_dual, wide

    rng = np.random.default_rng(4)
    X = rng.normal(size=(40, 120)) * rng.uniform(0.5, 3, 120) + 3
    X[:, 7] = 1.0
    y = X[:, 0] - 2 * X[:, 5] + rng.normal(size=40)
    ref, ref_rep, ref_gcv = ridge_from_stats(GramStats.of(X, y), ALPHAS)
    probe, rep, gcv = ridge_dual(X, y, ALPHAS)
    np.testing.assert_allclose(gcv, ref_gcv, rtol=1e-5)
    assert rep.alpha == ref_rep.alpha
    np.testing.assert_allclose(probe.predict_scores(X), ref.predict_scores(X), atol=1e-8)
    np.testing.assert_allclose(probe.coef, ref.coef, atol=1e-9)
    assert wide(40, 120) and not wide(120, 40)
    fitted, frep = fit_regressor(X, y, protocol_preset("paper"))
    assert frep.alpha == rep.alpha
    np.testing.assert_allclose(fitted.predict_scores(X), probe.predict_scores(X), rtol=1e-5, atol=1e-4)


def test_grouped_inner_cv_on_wide_features_matches_the_gram_form():
    from g3n_probe import fit_regressor, protocol_preset

    rng = np.random.default_rng(5)
    X = rng.normal(size=(48, 90))
    y = X[:, 0] + rng.normal(size=48) * 0.5
    groups = np.repeat(np.arange(16), 3)
    Z = (X - X.mean(axis=0)) / X.std(axis=0)
    alpha, mse = grouped_ridge_alpha(Z, y, groups, ALPHAS, 4)
    # the Gram form on the same data (p = 90 is small enough to build it): same curve
    import g3n_probe.ridge as ridge

    orig = ridge.wide
    try:
        ridge.wide = lambda n, p: False
        alpha_g, mse_g = grouped_ridge_alpha(Z, y, groups, ALPHAS, 4)
        cfg = protocol_preset("paper").model_copy(update={"ridge_inner_cv": 4})
        ref, _ = fit_regressor(X, y, cfg, groups=groups)
    finally:
        ridge.wide = orig
    np.testing.assert_allclose(mse, mse_g, rtol=1e-6)
    assert alpha == alpha_g
    got, _ = fit_regressor(X, y, cfg, groups=groups)
    np.testing.assert_allclose(got.predict_scores(X), ref.predict_scores(X), rtol=1e-4, atol=1e-5)


def test_pca_probe_matches_a_sklearn_pipeline_fitted_on_the_training_part_only():
    """--pca K: standardise, PCA fitted on the training rows, then the usual probe, composed into one
    linear probe on the original features; its predictions on held-out rows equal sklearn's
    StandardScaler -> PCA -> StandardScaler -> LogisticRegression (or Ridge) fitted the same way."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from g3n_probe.config import ProtocolConfig
    from g3n_probe.linear import fit_classifier, fit_on_components
    from g3n_probe.ridge import fit_regressor

    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 300)) * rng.uniform(0.5, 3, size=300) + rng.normal(size=300)
    y = np.where(X[:, :5].sum(1) + rng.normal(size=90) > 0, "a", "b")
    train, test = np.arange(90) < 70, np.arange(90) >= 70
    cfg = ProtocolConfig(dtype="float64", logreg_tol=1e-8)
    probe, _ = fit_on_components(X[train], 10, lambda U: fit_classifier(U, y[train], cfg))
    assert probe.n_features == 300 and probe.info["pca_components"] == 10
    ref = make_pipeline(StandardScaler(), PCA(10, svd_solver="full"), StandardScaler(),
                        LogisticRegression(C=cfg.logreg_C, tol=1e-8, max_iter=5000)).fit(X[train], y[train])
    np.testing.assert_allclose(probe.predict_scores(X[test]), ref.predict_proba(X[test]), atol=1e-4)
    # regression: the composed ridge predicts what a ridge on the training part's components predicts
    t = X[:, 0] * 2 + rng.normal(size=90)
    cfg1 = ProtocolConfig(dtype="float64", ridge_alphas=[3.0])
    probe, _ = fit_on_components(X[train], 10, lambda U: fit_regressor(U, t[train], cfg1))
    ref = make_pipeline(StandardScaler(), PCA(10, svd_solver="full"), StandardScaler(), Ridge(alpha=3.0))
    np.testing.assert_allclose(probe.predict_scores(X[test]), ref.fit(X[train], t[train]).predict(X[test]), atol=1e-6)
    # K beyond the training rows is capped (n - 1 components carry all the centred data)
    assert fit_on_components(X[:8], 50, lambda U: fit_classifier(U, y[:8], cfg))[0].info["pca_components"] == 7


def test_logistic_fit_is_sklearns_at_the_optimum():
    """Two classes (binomial) and several (multinomial): the same optimum as scikit-learn's
    LogisticRegression (both solved tightly), from zeros or from a warm start; and a capped fit
    says it did not converge."""
    from sklearn.linear_model import LogisticRegression

    from g3n_probe.logistic import fit_logistic

    rng = np.random.default_rng(4)
    for k in (2, 3, 8):
        X = rng.normal(size=(150, 12))
        y = rng.integers(0, k, 150)
        X[:, :3] += y[:, None] * 0.4
        ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(X, y)
        fit = fit_logistic(X, y, k, C=0.5, tol=1e-10, max_iter=10_000)
        assert fit.converged and fit.coef.shape == ref.coef_.shape and fit.intercept.shape == ref.intercept_.shape
        np.testing.assert_allclose(fit.coef, ref.coef_, atol=1e-6)
        np.testing.assert_allclose(fit.intercept, ref.intercept_, atol=1e-6)
        warm = fit_logistic(X, y, k, C=0.5, tol=1e-10, max_iter=10_000, init=(fit.coef * 0.5, fit.intercept))
        np.testing.assert_allclose(warm.coef, fit.coef, atol=1e-6)
        capped = fit_logistic(X, y, k, C=0.5, max_iter=2)
        assert not capped.converged and capped.n_iter == 2
