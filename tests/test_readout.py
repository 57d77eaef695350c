"""The readout of predictions: chosen on held-out reference units, recorded, and trusted per gene and unit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _shared import one_section

import sigmma_sc as sg
from sigmma_sc._constants import Keys
from sigmma_sc.tl._readout import choose_readout, heldout_groups, weighted_average


def test_choose_readout_picks_the_readout_that_predicts_held_out_units():
    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1, 2], 200)
    # Expression linear in the embedding: a ridge head is right, retrieval only approximates it.
    z = rng.normal(size=(600, 16))
    linear = z[:, :4] @ rng.normal(size=(4, 30)) + 0.05 * rng.normal(size=(600, 30))
    r = choose_readout(z, z, linear, groups)
    assert r.method == "ridge" and r.heldout_r > 0.9 and r.coef.shape == (17, 30)
    # Expression a function of a discrete state shared across groups: retrieval of the same state wins.
    state = rng.integers(0, 8, 600)
    centres = rng.normal(size=(8, 16)) * 3
    emb = centres[state] + 0.3 * rng.normal(size=(600, 16))
    profiles = rng.normal(size=(8, 30)) ** 2
    step = profiles[state] + 0.1 * rng.normal(size=(600, 30))
    xor = np.sign(emb[:, :1] * emb[:, 1:2])  # not linear in the embedding
    step = step * (1.5 + xor)
    r = choose_readout(emb, emb, step, groups)
    assert r.method == "knn" and r.k >= 10
    # The choice is the best candidate, and the candidates are ranked.
    assert r.heldout_r == pytest.approx(r.candidates["heldout_r"].max())
    assert r.candidates["heldout_r"].is_monotonic_decreasing
    # Fixed k / temperature restrict the retrieval candidates; one group leaves nothing to hold out.
    fixed = choose_readout(emb, emb, step, groups, method="knn", k=7, temperature=0.2)
    assert (fixed.k, fixed.temperature) == (7, 0.2)
    single = choose_readout(emb, emb, step, np.zeros(600, int))
    assert (single.method, single.k, single.temperature) == ("knn", 50, 0.1) and np.isnan(single.heldout_r)


def test_blend_is_the_mean_of_the_best_retrieval_and_the_best_ridge():
    rng = np.random.default_rng(2)
    groups = np.repeat([0, 1, 2], 150)
    emb = rng.normal(size=(450, 12))
    state = (emb[:, 0] > 0).astype(int) + 2 * (emb[:, 1] * emb[:, 2] > 0)
    expr = (
        emb[:, 3:6] @ rng.normal(size=(3, 20))
        + 2.0 * rng.normal(size=(4, 20))[state]
        + 0.3 * rng.normal(size=(450, 20))
    )
    knn = choose_readout(emb, emb, expr, groups, method="knn")
    ridge = choose_readout(emb, emb, expr, groups, method="ridge")
    both = choose_readout(emb, emb, expr, groups, method="blend")
    assert both.method == "blend"
    assert (both.k, both.temperature, both.alpha) == (knn.k, knn.temperature, ridge.alpha)
    # Every candidate of both kinds is scored, and the blend too (the last, unranked choice).
    kinds = both.candidates["method"].value_counts()
    assert kinds["knn"] == len(knn.candidates) and kinds["ridge"] == len(ridge.candidates) and kinds["blend"] == 1
    q = rng.normal(size=(5, 12))
    np.testing.assert_allclose(
        both.predict(q, emb, expr),
        0.5 * (knn.predict(q, emb, expr) + ridge.predict(q, emb, expr)),
        rtol=1e-5,
        atol=1e-5,
    )
    # Here neither kind captures both the linear and the discrete part: their mean beats each held out.
    assert both.heldout_r > max(knn.heldout_r, ridge.heldout_r)
    assert choose_readout(emb, emb, expr, groups).method == "blend"  # auto picks it
    assert both.describe().startswith("blend of knn k=")
    single = choose_readout(emb, emb, expr, np.zeros(450, int), method="blend")
    assert single.method == "blend" and single.coef.shape == (13, 20) and single.k == 50


def test_held_out_units_are_never_their_own_neighbours():
    # Each group's units are identical copies of one profile: predicting a unit from its own group
    # would be perfect; from the other groups it is impossible (every gene constant per group).
    rng = np.random.default_rng(1)
    groups = np.repeat([0, 1], 100)
    emb = rng.normal(size=(200, 8))
    expr = np.where(groups[:, None] == 0, 1.0, 5.0) + 0.01 * rng.normal(size=(200, 10))
    r = choose_readout(emb, emb, expr, groups, method="knn", k=5, temperature=0.1)
    assert r.heldout_r < 0.5


def test_heldout_groups_split_one_section_into_quadrants():
    xy = np.random.default_rng(0).uniform(0, 100, (400, 2))
    g = heldout_groups(np.array(["S0"] * 400), xy)
    assert sorted(np.unique(g)) == [0, 1, 2, 3] and np.bincount(g).min() > 60
    assert (heldout_groups(np.array(["a", "b"] * 200), xy) == np.tile([0, 1], 200)).all()


@pytest.fixture(scope="module")
def fitted():
    # 4,500 cells a section: about 45 niches, enough for training to hold some out for validation.
    full = sg.datasets.synthetic(9000, n_genes=60, n_sections=2, seed=0)
    train, test = one_section(full, "S0"), one_section(full, "S1")
    model = sg.tl.fit(train, max_epochs=2, n_genes=40, seed=0)
    return model, train, test


def test_reference_marks_the_units_training_held_out(fitted):
    model, train, _ = fitted
    val = model.reference.obs[Keys.VALIDATION].to_numpy()
    assert val.dtype == bool and 0.03 < val.mean() < 0.25
    # Written by tl.fit too? No: the reference is the model's (saved with it), the table keeps its obs.
    assert Keys.VALIDATION not in train[Keys.TABLE].obs


def test_predict_expression_records_the_readout_and_how_far_to_trust_it(fitted, tmp_path):
    model, _, test = fitted
    # inplace=True caches the test section's features for the calls below (and the other tests).
    pred = sg.tl.predict_expression(model, test, inplace=True)
    params = pred.uns[Keys.UNS][Keys.PARAMS]
    assert params["method"] == "ridge" and params["heldout_units"] == "validation"  # the default for cells
    assert params["heldout_r"] == pytest.approx(max(params["candidates"]["heldout_r"]))
    gene_r = pred.var[Keys.HELDOUT_R].to_numpy()
    assert np.nanmean(gene_r) == pytest.approx(params["heldout_r"], abs=1e-6)
    conf = pred.obs[Keys.CONFIDENCE].to_numpy()
    assert conf.shape == (pred.n_obs,) and np.isfinite(conf).all() and (conf <= 1.0001).all()
    # The result writes to disk as it is.
    pred.write_h5ad(tmp_path / "pred.h5ad")
    # Each readout kind on its own; the ridge head predicts other values than retrieval.
    ridge = sg.tl.predict_expression(model, test, method="ridge")
    knn = sg.tl.predict_expression(model, test, method="knn", k=20, temperature=0.1)
    assert ridge.uns[Keys.UNS][Keys.PARAMS]["method"] == "ridge" and "alpha" in ridge.uns[Keys.UNS][Keys.PARAMS]
    assert knn.uns[Keys.UNS][Keys.PARAMS]["k"] == 20
    assert not np.allclose(ridge.X, knn.X)
    # The blend (the spots' default) records both parts and is scored on the same held-out units.
    both = sg.tl.predict_expression(model, test, method="blend")
    bp = both.uns[Keys.UNS][Keys.PARAMS]
    assert bp["method"] == "blend" and {"k", "temperature", "alpha"} <= set(bp)
    names = list(bp["candidates"]["name"])
    assert bp["heldout_r"] == pytest.approx(
        bp["candidates"]["heldout_r"][[n.startswith("blend") for n in names].index(True)]
    )
    ref = model.reference
    emb = model.get_embeddings(test)["img"]
    expected = weighted_average(emb, ref.obsm[Keys.X_SIGMMA_EXPR], np.asarray(ref.X), k=20, temperature=0.1)
    np.testing.assert_allclose(knn.X, expected, rtol=1e-5, atol=1e-6)


def test_reference_without_image_embeddings(fitted):
    model, _, test = fitted
    bare = model.reference.copy()
    del bare.obsm[Keys.X_SIGMMA_IMG]
    with pytest.raises(ValueError, match="X_sigmma_img"):
        sg.tl.predict_expression(model, test, reference=bare, method="ridge")
    pred = sg.tl.predict_expression(model, test, reference=bare)
    params = pred.uns[Keys.UNS][Keys.PARAMS]
    assert (params["method"], params["k"], params["heldout_units"]) == ("knn", 50, "none")
    assert pred.var[Keys.HELDOUT_R].isna().all()


def test_evaluate_adds_readout_rows_and_the_sparse_gene_set(fitted):
    model, train, test = fitted
    df = sg.tl.evaluate(
        model,
        test,
        baselines=(),
        readouts={"sigmma_knn50": {"method": "knn", "k": 50, "temperature": 0.1}, "sigmma_ridge": {"method": "ridge"}},
    )
    assert df.index.tolist() == ["sigmma", "sigmma_knn50", "sigmma_ridge"]
    assert {"pcc_hvg50_det1", "pcc_hvg50_det1_per_slide"} <= set(df.columns)
    protocol = df.attrs["protocol"]
    assert protocol["readouts"]["sigmma_knn50"]["k"] == 50 and protocol["readouts"]["sigmma_ridge"]["method"] == "ridge"
    assert len(protocol["genes_hvg_det1"]) == len(protocol["genes_hvg"])
    assert np.isfinite(protocol["confidence_spearman"]["sigmma"])
    # The retrieval rows share the embeddings: their retrieval scores are the same.
    pd.testing.assert_series_equal(
        df.loc["sigmma_knn50", ["r5_img2expr", "r10_expr2img"]],
        df.loc["sigmma_ridge", ["r5_img2expr", "r10_expr2img"]],
        check_names=False,
    )
    for bad in ({"sigmma": {"method": "knn"}}, {"x": {"k": 0}}, {"x": {"alpha": 1.0}}, {"x": {"method": "mlp"}}):
        with pytest.raises(ValueError):
            sg.tl.evaluate(model, test, baselines=(), readouts=bad)
