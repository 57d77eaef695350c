"""A query slide that lacks some of the model's genes: embedding, prediction, retrieval and evaluation.

A section loaded on its own drops the genes without counts in it, so a model trained on other
sections usually has a few genes the query table does not hold. The image side never needs genes;
the expression side reads a few missing genes as zeros (with a warning) and refuses a larger share.
"""

from __future__ import annotations

import numpy as np
import pytest
from _shared import TINY_ENCODER, one_section, tiny_patch_registered

import sigmma_sc as sg
from sigmma_sc._constants import Defaults, Keys

ENCODER = TINY_ENCODER


FAST = dict(encoder=ENCODER, max_epochs=1, seed=0, batch_size=16, embed_dim=16, hidden_dim=32)


def _with_table(sdata, table):
    from spatialdata import SpatialData

    return SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables={Keys.TABLE: table})


def _drop_genes(sdata, genes):
    table = sdata.tables[Keys.TABLE]
    return _with_table(sdata, table[:, ~table.var_names.isin(list(genes))].copy())


def _zero_genes(sdata, genes):
    """The same table with these genes' counts set to zero (what a loader drops as 'without counts')."""
    from scipy import sparse

    table = sdata.tables[Keys.TABLE].copy()
    keep = sparse.diags((~table.var_names.isin(list(genes))).astype(np.float32))
    table.X = sparse.csr_matrix(table.X @ keep)
    table.layers[Keys.COUNTS_LAYER] = sparse.csr_matrix(table.layers[Keys.COUNTS_LAYER] @ keep)
    return _with_table(sdata, table)


@pytest.fixture(autouse=True, scope="module")
def _tiny_encoder():
    with tiny_patch_registered():
        yield


@pytest.fixture(autouse=True)
def _warnings_visible(monkeypatch):
    from sigmma_sc._logging import logger

    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(sg.settings, "progress_bar", False)


@pytest.fixture(scope="module")
def synthetic_split():
    sg.settings.progress_bar = False
    full = sg.datasets.synthetic(600, n_genes=50, n_sections=2, seed=0)
    train, test = one_section(full, "S0"), one_section(full, "S1")
    model = sg.tl.fit(train, n_genes=40, **FAST)
    # Hierarchy and features of the query cached once; the copies below inherit them.
    model.get_embeddings(test, expression=False)
    return model, train, test


def _warned(caplog, *words) -> bool:
    return any(all(w in r.getMessage() for w in words) for r in caplog.records if r.levelname == "WARNING")


# ----------------------------------------------------------------------------- synthetic: genes dropped
def test_missing_genes_embed_as_zero_counts(synthetic_split, caplog):
    model, _, test = synthetic_split
    gone = model.genes[:3]  # 7.5% of the 40 model genes
    dropped, zeroed = _drop_genes(test, gone), _zero_genes(test, gone)
    with caplog.at_level("WARNING", logger="sigmma_sc"):
        emb = model.get_embeddings(dropped)
    assert _warned(caplog, "lacks 3 of the model's 40 genes", "7.5%", "zero")
    # A gene the table lacks is a gene without counts: the same embedding as the table holding it at zero.
    ref = model.get_embeddings(zeroed)
    for key in ("expr", "joint", "img"):
        np.testing.assert_allclose(emb[key], ref[key], atol=1e-6)
    # The image side never depends on the genes.
    np.testing.assert_allclose(emb["img"], model.get_embeddings(test, expression=False)["img"], atol=1e-6)


def test_too_many_missing_genes_is_a_clear_error(synthetic_split):
    model, _, test = synthetic_split
    half = _drop_genes(test, model.genes[:20])
    with pytest.raises(ValueError, match=r"lacks 20 of the model's 40 genes \(50.0%.*max_missing_genes=10.0%"):
        model.get_embeddings(half)
    with pytest.raises(ValueError, match="expression=False"):
        model.get_embeddings(half, expression=True)
    assert Defaults.MAX_MISSING_GENES == 0.1
    # The share is configurable, and the image side alone needs no genes.
    assert model.get_embeddings(half, max_missing_genes=0.5)["expr"] is not None
    assert model.get_embeddings(half, expression=False)["expr"] is None
    with pytest.raises(ValueError, match="between 0 and 1"):
        model.get_embeddings(half, max_missing_genes=1.5)
    # Image queries against another gallery need no genes either.
    idx, _ = sg.tl.retrieve(model, half, direction="img2expr", k=3, gallery=model.reference)
    assert idx.shape == (half.tables[Keys.TABLE].n_obs, 3)
    with pytest.raises(ValueError, match="max_missing_genes"):
        sg.tl.retrieve(model, half, direction="expr2img", k=3)


def test_predict_and_retrieve_with_missing_genes(synthetic_split, caplog):
    model, train, test = synthetic_split
    gone = model.genes[5:8]
    dropped = _drop_genes(test, gone)
    # Prediction reads the query's image only: no genes, no warning, the same result.
    pred = sg.tl.predict_expression(model, dropped, k=5)
    np.testing.assert_allclose(pred.X, sg.tl.predict_expression(model, test, k=5).X, rtol=1e-5, atol=1e-6)
    assert list(pred.var_names) == list(model.genes)
    # Expression queries of a table lacking a few genes are embedded (zeros for the missing ones).
    idx, scores = sg.tl.retrieve(model, dropped, direction="expr2img", k=4)
    assert idx.shape == (dropped.tables[Keys.TABLE].n_obs, 4) and np.isfinite(scores).all()
    # A reference lacking genes predicts zero for them, with a warning.
    ref = _drop_genes(train, gone)
    with caplog.at_level("WARNING", logger="sigmma_sc"):
        from_ref = sg.tl.predict_expression(model, test, k=5, reference=ref)
    assert _warned(caplog, "lacks 3 of the model's 40 genes")
    assert (from_ref[:, gone].X == 0).all()
    keep = [g for g in model.genes if g not in gone]
    assert from_ref[:, keep].X.std() > 0


def test_evaluate_scores_the_shared_genes(synthetic_split, caplog):
    model, train, test = synthetic_split
    gone = model.genes[:2]
    dropped = _drop_genes(test, gone)
    with caplog.at_level("WARNING", logger="sigmma_sc"):
        df = sg.tl.evaluate(model, dropped, train_sdata=train, baselines=("ridge",), n_genes=10, seed=0)
    assert _warned(caplog, "evaluate", "lacks 2 of the model's 40 genes", "scoring the 38 genes")
    proto = df.attrs["protocol"]
    assert proto["n_genes_missing"] == 2 and proto["genes_missing"] == list(gone)
    assert proto["n_model_genes"] == 40 and proto["n_genes_scored"] == 38
    assert proto["max_missing_genes"] == Defaults.MAX_MISSING_GENES
    assert not set(gone) & set(proto["genes_hvg"] + proto["genes_heg"])
    assert list(df.index) == ["sigmma", "ridge"]
    assert np.isfinite(df[["pcc_hvg10", "pcc_heg10", "r5_img2expr", "r5_expr2img"]].to_numpy()).all()
    # Without the training data, the same genes are scored from model.reference.
    alone = sg.tl.evaluate(model, dropped, baselines=(), n_genes=10, seed=0)
    assert alone.attrs["protocol"]["genes_hvg"] == proto["genes_hvg"]
    assert alone.loc["sigmma", "pcc_hvg10"] == pytest.approx(df.loc["sigmma", "pcc_hvg10"], abs=1e-6)
    # A complete query reports nothing missing.
    full = sg.tl.evaluate(model, test, baselines=(), n_genes=10, seed=0)
    assert full.attrs["protocol"]["n_genes_missing"] == 0 and full.attrs["protocol"]["genes_missing"] == []
    with pytest.raises(ValueError, match="max_missing_genes"):
        sg.tl.evaluate(model, _drop_genes(test, model.genes[:20]), baselines=(), n_genes=10)


# ----------------------------------------------------------------------------- her2st: a section on its own
@pytest.fixture(scope="module")
def her2st_split(her2st_dir):
    sg.settings.progress_bar = False
    # Each section loaded on its own, as a user would: each table drops the genes without counts in it.
    train = sg.datasets.her2st(her2st_dir, sections=["C5"])
    test = sg.datasets.her2st(her2st_dir, sections=["C3"])
    # Genes detected in >= 1% of C5's spots include one that C3 never measured.
    model = sg.tl.fit(
        train,
        levels=("meso", "macro"),
        n_genes=1000,
        min_detected=0.01,
        feature_method="crop",
        hierarchy_kwargs={"nuclei": False},
        **FAST,
    )
    return model, train, test


def test_her2st_section_loaded_on_its_own(her2st_split, caplog):
    model, train, test = her2st_split
    var = test.tables[Keys.TABLE].var_names
    missing = [g for g in model.genes if g not in var]
    assert 1 <= len(missing) <= Defaults.MAX_MISSING_GENES * len(model.genes)
    with caplog.at_level("WARNING", logger="sigmma_sc"):
        df = sg.tl.evaluate(model, test, train_sdata=train, baselines=(), seed=0)
    proto = df.attrs["protocol"]
    assert proto["n_genes_missing"] == len(missing) and proto["genes_missing"] == missing
    assert proto["test_sections"] == ["C3"] and proto["train_sections"] == ["C5"]
    assert proto["n_genes_scored"] == len(model.genes) - len(missing)
    assert _warned(caplog, "evaluate", f"lacks {len(missing)} of the model's {len(model.genes)} genes")
    assert np.isfinite(df.loc["sigmma", ["pcc_hvg50", "r5_img2expr", "r5_expr2img"]].to_numpy(float)).all()
    pred = sg.tl.predict_expression(model, test, k=10)
    assert pred.shape == (test.tables[Keys.TABLE].n_obs, len(model.genes))
    idx, _ = sg.tl.retrieve(model, test, direction="expr2img", k=5)
    assert idx.shape == (test.tables[Keys.TABLE].n_obs, 5)
