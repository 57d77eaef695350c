"""Metrics and ridge baselines on hand-made arrays (fast, no data)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from sigmma_sc.tl import _baselines as bl
from sigmma_sc.tl import _metrics as m


def test_pearson_perfect_anti_and_constant():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(30, 4))
    pred = np.column_stack([3 * y[:, 0] + 2, -y[:, 1], np.full(30, 1.5), y[:, 3]])
    y = y.copy()
    y[:, 3] = 7.0  # constant observed gene
    r = m.pearson_per_gene(y, pred)
    assert r[0] == pytest.approx(1.0)
    assert r[1] == pytest.approx(-1.0)
    assert np.isnan(r[2]) and np.isnan(r[3])
    # Constant genes are excluded from the mean, not counted as 0.
    assert m.mean_pearson(y, pred) == pytest.approx(0.0)
    assert m.mean_pearson(y[:, :1], pred[:, :1]) == pytest.approx(1.0)


def test_pearson_matches_numpy_and_all_constant_is_nan():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    expected = [np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(3)]
    np.testing.assert_allclose(m.pearson_per_gene(a, b), expected, rtol=1e-10)
    assert np.isnan(m.mean_pearson(np.ones((5, 2)), rng.normal(size=(5, 2))))
    with pytest.raises(ValueError, match="same shape"):
        m.pearson_per_gene(a, b[:, :2])


def test_mean_pearson_per_group_differs_from_pooled():
    # Within each slide the prediction is perfect up to a slide offset; pooled it is anti-correlated.
    t = np.linspace(0, 1, 10)
    y = np.concatenate([t, t + 10])[:, None]
    pred = np.concatenate([t + 10, t])[:, None]
    groups = np.repeat(["s1", "s2"], 10)
    assert m.mean_pearson(y, pred, groups=groups) == pytest.approx(1.0)
    assert m.mean_pearson(y, pred) < 0


def test_retrieval_ranks_ties_count_at_worst_rank():
    s = np.array(
        [
            [0.9, 0.1, 0.2],  # clear first
            [0.5, 0.5, 0.5],  # three-way tie: worst rank 3
            [0.0, 0.8, 0.8],  # tie with one other item: rank 2
        ]
    )
    ranks = m.retrieval_ranks(s)
    np.testing.assert_array_equal(ranks, [1, 3, 2])
    assert m.recall_at_k(ranks, 1) == pytest.approx(1 / 3)
    assert m.recall_at_k(ranks, 2) == pytest.approx(2 / 3)
    summary = m.retrieval_summary(s, ks=(1, 2))
    assert summary["median_rank"] == 2.0
    assert summary["chance_r1"] == pytest.approx(1 / 3)
    # NaN scores rank last; a NaN true score is last.
    s2 = np.array([[np.nan, 0.1], [0.3, np.nan]])
    np.testing.assert_array_equal(m.retrieval_ranks(s2), [2, 2])
    # A constant similarity (an uninformative model) never beats chance.
    assert m.recall_at_k(m.retrieval_ranks(np.zeros((50, 50))), 10) == 0.0


def test_retrieval_random_is_near_chance_and_identity_is_perfect():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    assert m.retrieval_summary(m.cosine_similarity(x, x))["r1"] == 1.0
    rand = m.retrieval_summary(rng.normal(size=(400, 400)), ks=(10,))
    assert abs(rand["r10"] - rand["chance_r10"]) < 0.04


def test_top_k_deterministic_ties_and_bounds():
    idx, sc = m.top_k(np.array([[0.2, 0.9, 0.9, np.nan], [1.0, 1.0, 1.0, 1.0]]), 3)
    np.testing.assert_array_equal(idx, [[1, 2, 0], [0, 1, 2]])
    np.testing.assert_allclose(sc[0], [0.9, 0.9, 0.2])
    with pytest.raises(ValueError, match="gallery size"):
        m.top_k(np.zeros((2, 3)), 4)


def test_subsample_fixed_and_seeded():
    a = m.subsample(5000, max_n=1000, seed=3)
    assert len(a) == 1000 and len(np.unique(a)) == 1000 and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(a, m.subsample(5000, max_n=1000, seed=3))
    assert not np.array_equal(a, m.subsample(5000, max_n=1000, seed=4))
    np.testing.assert_array_equal(m.subsample(7, max_n=1000), np.arange(7))


def test_top_expressed_genes_dense_and_sparse():
    x = np.array([[0.0, 1.0, 5.0, 2.0], [0.0, 3.0, 5.1, 2.0], [9.0, 2.0, 5.0, 2.0]])
    np.testing.assert_array_equal(m.top_expressed_genes(x, n=3), [2, 0, 1])
    np.testing.assert_array_equal(m.top_expressed_genes(sp.csr_matrix(x), n=3), [2, 0, 1])
    # Ties (genes 1 and 3, mean 2.0) go to the lower index.
    np.testing.assert_array_equal(m.top_expressed_genes(x, n=10), [2, 0, 1, 3])


def test_profile_similarity_invariant_to_gene_scale_and_offset():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(40, 30))
    pred = y * rng.uniform(0.1, 5, 30) - 4.0  # per-gene scale and a missing intercept
    s = m.profile_similarity(pred, y)
    np.testing.assert_array_equal(m.retrieval_ranks(s), np.ones(40, dtype=int))


def _linear_problem(seed=0, n=300, p=40, g=6, noise=0.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p))
    w = np.zeros((p, g))
    w[:5] = rng.normal(size=(5, g))
    y = x @ w + noise * rng.normal(size=(n, g)) + 3.0
    return x[:200], y[:200], x[200:], y[200:]


def test_ridge_probe_recovers_signal_and_matches_hest_alpha():
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge

    from sigmma_sc.model import standardize_features

    xtr, ytr, xte, yte = _linear_problem()
    pred, alpha = bl.ridge_probe(xtr, ytr, xte, n_components=20)
    assert alpha == pytest.approx(100 / (20 * 6))
    # With every component kept the probe recovers the signal; 20 of 40 isotropic components keep part of it.
    assert m.mean_pearson(yte, bl.ridge_probe(xtr, ytr, xte, n_components=40)[0]) > 0.8
    assert m.mean_pearson(yte, pred) > 0.3
    # Same numbers as the recipe written out by hand (alpha = 100 / (d * n_genes), no intercept).
    ztr, zte = standardize_features(xtr, xte)
    pca = PCA(20, random_state=0).fit(ztr)
    reg = Ridge(alpha=100 / (20 * 6), fit_intercept=False, solver="lsqr", random_state=0)
    reg.fit(pca.transform(ztr), ytr)
    np.testing.assert_allclose(pred, reg.predict(pca.transform(zte)), rtol=1e-4, atol=1e-5)
    # PCA dimension is capped by the training size.
    pred_small, alpha_small = bl.ridge_probe(xtr[:10], ytr[:10], xte, n_components=256)
    assert pred_small.shape == yte.shape and alpha_small == pytest.approx(100 / (10 * 6))
    with pytest.raises(ValueError, match="NaN"):
        bl.ridge_probe(np.full_like(xtr, np.nan), ytr, xte)


def test_ridge_probe_survives_near_constant_channels():
    # A channel constant up to 1e-9 on the training units but not on the test units (a dead ReLU
    # channel of a CNN that wakes up on a new slide) must not swamp the prediction.
    xtr, ytr, xte, yte = _linear_problem()
    xtr = np.column_stack([xtr, 1e-9 * np.random.default_rng(2).normal(size=len(xtr))])
    xte = np.column_stack([xte, np.random.default_rng(3).uniform(0, 1, size=len(xte))])
    pred, _ = bl.ridge_probe(xtr, ytr, xte, n_components=41)
    assert m.mean_pearson(yte, pred) > 0.8


def test_ridge_cv_chooses_alpha_by_noise():
    xtr, ytr, xte, yte = _linear_problem(noise=0.1)
    pred, alpha_clean = bl.ridge_cv(xtr, ytr, xte)
    assert m.mean_pearson(yte, pred) > 0.95
    rng = np.random.default_rng(1)
    _, alpha_noise = bl.ridge_cv(xtr, rng.normal(size=ytr.shape), xte)
    assert alpha_noise > alpha_clean
    assert alpha_clean in bl.RIDGE_CV_ALPHAS


def test_ridge_cv_with_more_units_than_features_matches_sklearn_default_gcv():
    from sklearn.linear_model import RidgeCV

    rng = np.random.default_rng(5)
    x = rng.normal(size=(600, 40))
    y = x[:, :4] @ rng.normal(size=(4, 6)) + 2 * rng.normal(size=(600, 6))
    pred, alpha = bl.ridge_cv(x[:500], y[:500], x[500:])
    ref = RidgeCV(alphas=bl.RIDGE_CV_ALPHAS, fit_intercept=True).fit(x[:500], y[:500])
    assert alpha == ref.alpha_
    np.testing.assert_allclose(pred, ref.predict(x[500:]), atol=1e-8)


def test_ridge_cv_sets_share_one_decomposition_and_match_sklearn_per_set():
    """Several gene sets, accumulated in chunks, collinear columns: each set as RidgeCV alone."""
    from sklearn.linear_model import RidgeCV

    rng = np.random.default_rng(6)
    x = rng.normal(size=(900, 60))
    x[:, 7] = 3 * x[:, 6]  # a rank-deficient design (neighbour-mean columns can be)
    signal = x[:, :5] @ rng.normal(size=(5, 8))
    y = signal + rng.normal(size=(900, 8)) * np.r_[0.2, 0.2, 0.2, 0.2, 20, 20, 20, 20]  # clean / noisy genes
    sets = {"clean": np.arange(4), "noisy": np.arange(4, 8), "all": np.arange(8)}
    out = bl.ridge_cv_sets(x[:800], y[:800], x[800:], sets, chunk=128)
    for name, cols in sets.items():
        ref = RidgeCV(alphas=bl.RIDGE_CV_ALPHAS, fit_intercept=True, gcv_mode="svd").fit(x[:800], y[:800, cols])
        assert out[name][1] == ref.alpha_, name
        np.testing.assert_allclose(out[name][0], ref.predict(x[800:]).reshape(100, -1), atol=1e-8)
    assert out["noisy"][1] > out["clean"][1]  # one penalty per set, not one for all
    # Fewer units than features: sklearn's kernel form, same answers.
    small = bl.ridge_cv_sets(x[:40], y[:40], x[800:], {"all": np.arange(8)})["all"]
    ref = RidgeCV(alphas=bl.RIDGE_CV_ALPHAS, fit_intercept=True).fit(x[:40], y[:40])
    np.testing.assert_allclose(small[0], ref.predict(x[800:]), atol=1e-8)
    with pytest.raises(ValueError, match="alphas"):
        bl.ridge_cv_sets(x[:800], y[:800], x[800:], sets, alphas=np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="x_test has 59 features"):
        bl.ridge_cv_sets(x[:800], y[:800], x[800:, :59], sets)


def test_neighbour_mean_isolated_unit_keeps_its_own_value():
    a = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]))
    v = np.array([[1.0], [2.0], [4.0], [8.0]])
    np.testing.assert_allclose(bl.neighbour_mean(v, a).ravel(), [2.0, 2.5, 2.0, 8.0])
    with pytest.raises(ValueError, match="expected"):
        bl.neighbour_mean(v[:3], a)


def test_neighbour_mean_of_some_rows_matches_the_full_computation():
    rng = np.random.default_rng(4)
    a = sp.random(60, 60, density=0.1, random_state=4, format="csr")
    a = a + a.T
    v = rng.normal(size=(60, 3)).astype(np.float32)
    rows = np.array([5, 0, 59, 17])
    part = bl.neighbour_mean(v, a, rows=rows)
    assert part.dtype == np.float32 and part.shape == (4, 3)
    np.testing.assert_allclose(part, bl.neighbour_mean(v, a)[rows], rtol=1e-6)


def test_top_k_matches_full_sort_on_random_and_tied_scores():
    rng = np.random.default_rng(0)
    s = np.round(rng.uniform(size=(50, 80)), 1)  # many ties
    s[3, 5] = np.nan
    idx, sc = m.top_k(s, 7)
    key = np.where(np.isnan(s), np.inf, -s)
    ref = np.argsort(key, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_array_equal(sc, np.take_along_axis(s, ref, axis=1))
