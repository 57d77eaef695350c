"""Prediction, retrieval and evaluation with a fitted model (synthetic tissue; her2st when marked slow)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _shared import one_section

import sigmma_sc as sg
from sigmma_sc._constants import Keys
from sigmma_sc.tl import _metrics as m


def _he_only(sdata):
    """The same slide with every gene removed from the table (an H&E-only query)."""
    from spatialdata import SpatialData

    table = sdata.tables[Keys.TABLE]
    bare = table[:, []].copy()
    del bare.layers[Keys.COUNTS_LAYER]
    for key in list(bare.obsm):
        if key.startswith(Keys.X_SIGMMA):
            del bare.obsm[key]
    return SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables={Keys.TABLE: bare})


@pytest.fixture(scope="module")
def split():
    from sigmma_sc.datasets._synthetic import synthetic

    sg.settings.progress_bar = False
    full = synthetic(800, n_genes=60, n_sections=2, seed=0)
    train, test = one_section(full, "S0"), one_section(full, "S1")
    model = sg.tl.fit(train, max_epochs=2, n_genes=40, seed=0, batch_size=8)
    return model, train, test


def test_predict_expression_he_only_equals_with_counts(split):
    model, _, test = split
    with_counts = sg.tl.predict_expression(model, test, method="knn", k=10, temperature=0.1)
    he_only = sg.tl.predict_expression(model, _he_only(test), method="knn", k=10, temperature=0.1)
    np.testing.assert_allclose(he_only.X, with_counts.X, rtol=1e-5, atol=1e-6)
    # The image embedding does not depend on the expression being embedded alongside (no leak in evaluate).
    from sigmma_sc.tl._readout import weighted_average

    emb = model.get_embeddings(test)
    ref = model.reference
    both = weighted_average(emb["img"], ref.obsm[Keys.X_SIGMMA_EXPR], np.asarray(ref.X), k=10)
    np.testing.assert_allclose(both, he_only.X, rtol=1e-5, atol=1e-6)
    table = test.tables[Keys.TABLE]
    assert with_counts.shape == (table.n_obs, len(model.genes))
    assert list(with_counts.var_names) == list(model.genes)
    assert list(with_counts.obs_names) == list(table.obs_names)
    assert (with_counts.obs[Keys.SECTION] == table.obs[Keys.SECTION]).all()
    np.testing.assert_array_equal(with_counts.obsm[Keys.SPATIAL], table.obsm[Keys.SPATIAL])
    assert with_counts.uns[Keys.DATASET][Keys.LOG_NORMALIZED]
    # A weighted average of reference profiles stays inside the reference's range, gene by gene.
    ref = np.asarray(model.reference.X)
    assert (with_counts.X >= ref.min(axis=0) - 1e-5).all() and (with_counts.X <= ref.max(axis=0) + 1e-5).all()


def test_predict_reference_forms_agree(split):
    model, train, test = split
    default = sg.tl.predict_expression(model, test, k=5)
    explicit = sg.tl.predict_expression(model, test, k=5, reference=model.reference)
    np.testing.assert_allclose(explicit.X, default.X, rtol=1e-6)
    # The training table written by tl.fit holds raw counts and the same expression embeddings.
    from_table = sg.tl.predict_expression(model, test, k=5, reference=train.tables[Keys.TABLE])
    np.testing.assert_allclose(from_table.X, default.X, rtol=1e-4, atol=1e-5)
    # k=1 with a huge temperature or not: the single nearest profile, copied.
    one = sg.tl.predict_expression(model, test, k=1)
    idx, _ = sg.tl.retrieve(model, test, k=1, gallery=model.reference)
    np.testing.assert_allclose(one.X, np.asarray(model.reference.X)[idx[:, 0]], rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        sg.tl.predict_expression(model, test, temperature=0)


def test_retrieve_shapes_order_and_errors(split):
    model, _, test = split
    n = test.tables[Keys.TABLE].n_obs
    idx, scores = sg.tl.retrieve(model, test, direction="img2expr", k=7)
    assert idx.shape == scores.shape == (n, 7)
    assert (np.diff(scores, axis=1) <= 1e-7).all()
    assert idx.min() >= 0 and idx.max() < n
    idx2, _ = sg.tl.retrieve(model, test, direction="expr2img", k=3)
    assert idx2.shape == (n, 3)
    # The scores are the cosine similarities of the model's embeddings.
    emb = model.get_embeddings(test)
    sim = m.cosine_similarity(emb["img"], emb["expr"])
    np.testing.assert_allclose(scores[:, 0], sim.max(axis=1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expr2img|expression"):
        sg.tl.retrieve(model, _he_only(test), direction="expr2img")
    with pytest.raises(ValueError, match="direction"):
        sg.tl.retrieve(model, test, direction="both")
    ref_idx, _ = sg.tl.retrieve(model, _he_only(test), k=4, gallery=model.reference)
    assert ref_idx.max() < model.reference.n_obs


def test_evaluate_table_and_protocol(split):
    model, train, test = split
    df = sg.tl.evaluate(model, test, train_sdata=train, baselines=("ridge", "ridge_cv"), n_genes=20, seed=0)
    assert list(df.index) == ["sigmma", "ridge", "ridge_cv"]
    n = test.tables[Keys.TABLE].n_obs
    for col in ("pcc_hvg20", "pcc_heg20", "pcc_hvg20_per_slide", "r5_img2expr", "r10_expr2img", "median_rank_img2expr"):
        assert col in df.columns
    assert df["chance_r5"].iloc[0] == pytest.approx(5 / min(n, 1000))
    assert df[["r1_img2expr", "r10_expr2img"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (df["r10_img2expr"] >= df["r1_img2expr"]).all()
    proto = df.attrs["protocol"]
    assert len(proto["genes_hvg"]) == 20 and set(proto["genes_hvg"]) <= set(model.genes)
    assert proto["test_sections"] == ["S1"] and proto["train_sections"] == ["S0"]
    # HEST alpha with d = 256 PCA components (400 training cells) and 20 targets.
    assert proto["ridge_alphas"]["ridge"]["hvg"] == pytest.approx(100 / (256 * 20))
    assert "numpy" in proto["versions"]
    # Synthetic H&E carries the niche: every method predicts better than chance on average.
    assert (df["pcc_hvg20"] > 0).all()
    # Without the training data the baselines are skipped, SIGMMA's row is unchanged.
    alone = sg.tl.evaluate(model, test, n_genes=20, seed=0)
    assert list(alone.index) == ["sigmma"]
    with pytest.raises(ValueError, match="Unknown baseline"):
        sg.tl.evaluate(model, test, baselines=("knn",))
    # Ridges on per-section z-scores (SIGMMA's own input scaling): SIGMMA's row is untouched.
    per_sec = sg.tl.evaluate(
        model, test, train_sdata=train, baselines=("ridge_cv",), n_genes=20, seed=0, baseline_feature_norm="model"
    )
    assert per_sec.attrs["protocol"]["baseline_feature_norm"] == model.params["feature_norm"] == "section"
    assert df.attrs["protocol"]["baseline_feature_norm"] == "global"
    pd.testing.assert_series_equal(per_sec.loc["sigmma"], df.loc["sigmma"])
    assert per_sec.loc["ridge_cv", "pcc_hvg20"] != df.loc["ridge_cv", "pcc_hvg20"]
    with pytest.raises(ValueError, match="baseline_feature_norm must be one of"):
        sg.tl.evaluate(model, test, train_sdata=train, baseline_feature_norm="per_slide")


@pytest.mark.slow
def test_her2st_short_fit_beats_shuffled_control():
    from sigmma_sc.datasets._her2st import her2st

    sg.settings.progress_bar = False
    train, test = her2st(sections=["C3"]), her2st(sections=["C2"])
    model = sg.tl.fit(train, max_epochs=10, seed=0)
    assert model.params["max_context_cells"] == model.params["max_cells"] == 16  # "auto" on spots: every sampled cell
    pred = sg.tl.predict_expression(model, test)
    from sigmma_sc.model import select_genes

    genes = select_genes(np.asarray(model.reference.X), model.genes, n_genes=50, log_normalized=True)
    observed = sg.io.validate(test).expression(genes)
    predicted = pred[:, genes].X
    r = m.mean_pearson(observed, predicted)
    shuffled = m.mean_pearson(observed, predicted[np.random.default_rng(0).permutation(len(predicted))])
    assert r > 0.15
    assert r > shuffled + 0.1
    df = sg.tl.evaluate(model, test, baselines=())
    assert df.loc["sigmma", "pcc_hvg50"] == pytest.approx(r, abs=1e-6)
    assert isinstance(df, pd.DataFrame)


def test_min_detected_picks_the_modelled_genes(split, caplog, monkeypatch):
    from sigmma_sc._logging import logger
    from sigmma_sc.model import select_genes
    from sigmma_sc.tl._baselines import fit_single_scale

    _, train, _ = split
    counts = train[Keys.TABLE].X
    detected = np.asarray((counts > 0).mean(axis=0)).ravel()
    # A threshold that about half of the genes pass: fewer than n_genes, so the fit warns.
    threshold = float(np.median(detected))
    expected = select_genes(counts, train[Keys.TABLE].var_names, n_genes=40, min_detected=threshold)
    assert 0 < len(expected) < 40
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level("WARNING", logger="sigmma_sc"):
        strict = sg.tl.fit(train, max_epochs=1, n_genes=40, min_detected=threshold, seed=0, batch_size=8)
    assert strict.genes == expected
    assert all(detected[train[Keys.TABLE].var_names.get_loc(g)] >= threshold for g in strict.genes)
    assert strict.params["min_detected"] == threshold
    assert any("min_detected" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    # The single-scale baseline models the same genes under the same rule.
    base = fit_single_scale(strict, train, seed=0, max_epochs=1, batch_size=8)
    assert base.genes == strict.genes


def test_default_detection_rule_follows_the_units_sparsity(split):
    from sigmma_sc.model import default_min_detected, select_genes

    _, train, _ = split
    table = train[Keys.TABLE]
    counts = table.layers[Keys.COUNTS_LAYER] if Keys.COUNTS_LAYER in table.layers else table.X
    model = sg.tl.fit(train, max_epochs=1, n_genes=40, seed=0, batch_size=8)
    # The rule is read from the counts: the 40 genes asked for are detected in >= 10% of these cells.
    detected = np.asarray((counts != 0).mean(axis=0)).ravel()
    assert (detected >= 0.1).sum() >= 40
    assert model.params["min_detected"] == default_min_detected(counts, n_genes=40) == 0.1
    assert model.genes == select_genes(counts, table.var_names, n_genes=40, min_detected=0.1)
    # Spot-like counts keep 10%; bin-like counts get the share at which the 500th gene is detected.
    rng = np.random.default_rng(0)
    assert default_min_detected(rng.poisson(3.0, size=(300, 800))) == 0.1
    bins = rng.poisson(np.linspace(0.005, 0.2, 800), size=(4000, 800))
    share = default_min_detected(bins)
    detected = (bins > 0).mean(axis=0)
    assert 0.01 < share < 0.1 and (detected >= share).sum() >= 500 > (detected > share).sum()
    assert default_min_detected(rng.poisson(0.001, size=(2000, 800))) == 0.01
