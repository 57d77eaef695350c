"""pp.bins_to_cells on synthetic 2 µm bins, whose cells (and their counts) are known."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree

import sigmma_sc as sg
from sigmma_sc._constants import Keys


def synthetic_bins(n_cells: int = 300, *, bin_um: float = 2.0, cell_radius_um: float = 5.0, seed: int = 0):
    """A grid of bins over ``datasets.synthetic`` cells; each cell's counts split at random over the bins within
    ``cell_radius_um`` of its centre (nearest cell first). Returns (bins SpatialData, cells SpatialData)."""
    cells = sg.datasets.synthetic(n_cells, n_genes=60, seed=seed)
    slide = sg.io.validate(cells, require_counts=True)
    img = slide.images[slide.sections[0]]
    rgb = img.read(0, img.shape[0], 0, img.shape[1])
    xy = slide.xy_um
    lo, hi = xy.min(0) - cell_radius_um, xy.max(0) + cell_radius_um
    gx, gy = np.meshgrid(np.arange(lo[0], hi[0], bin_um) + bin_um / 2, np.arange(lo[1], hi[1], bin_um) + bin_um / 2)
    centres = np.stack([gx.ravel(), gy.ravel()], 1)
    dist, owner = cKDTree(xy).query(centres)
    owner[dist > cell_radius_um] = -1
    counts = slide.counts().toarray()
    rng = np.random.default_rng(seed)
    out = np.zeros((len(centres), counts.shape[1]), np.int64)
    for c in range(len(xy)):
        mine = np.flatnonzero(owner == c)
        for g in np.flatnonzero(counts[c]) if len(mine) else ():
            out[mine, g] += rng.multinomial(counts[c, g], np.full(len(mine), 1 / len(mine)))
    keep = out.sum(1) > 0
    arrays = sg.io.SectionArrays(
        section="S0",
        image=rgb,
        mpp=img.um_per_px,
        xy_um=centres[keep],
        counts=sp.csr_matrix(out[keep]),
        genes=list(slide.table.var_names),
        shape="square",
        diameter_um=bin_um,
        unit="bin",
    )
    bins = sg.io.build_sdata([arrays], technology="visium_hd", unit_kind="cell", unit_diameter_um=bin_um)
    return bins, cells


@pytest.fixture(scope="module")
def bins_and_cells():
    return synthetic_bins()


def test_bins_to_cells_recovers_the_cells_and_their_counts(bins_and_cells):
    bins, cells = bins_and_cells
    truth = cells[Keys.TABLE]
    n_bin_counts = int(bins[Keys.TABLE].layers[Keys.COUNTS_LAYER].sum())
    sg.pp.bins_to_cells(bins)
    out = bins["cells"]
    assert "S0_cells" in bins.shapes and out.uns[Keys.DATASET][Keys.UNIT_KIND] == "cell"
    assert out.uns[Keys.DATASET][Keys.TECHNOLOGY] == "visium_hd_cells"
    # About one cell per true cell: most true cells have a found cell within 3 um, none found twice over.
    assert 0.85 * truth.n_obs <= out.n_obs <= 1.05 * truth.n_obs
    dist, _ = cKDTree(out.obsm[Keys.SPATIAL]).query(truth.obsm[Keys.SPATIAL])
    assert (dist < 3.0).mean() >= 0.85
    # A found cell's counts are its true cell's: the bins it gathered came from that cell.
    dist, match = cKDTree(truth.obsm[Keys.SPATIAL]).query(out.obsm[Keys.SPATIAL])
    a = out.layers[Keys.COUNTS_LAYER].toarray().astype(float)
    b = truth.layers[Keys.COUNTS_LAYER].toarray().astype(float)[match]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.median(cosine) > 0.95
    # Counts are moved, never made: the cells hold at most the bins' counts, and most of them.
    assert 0.8 * n_bin_counts <= int(a.sum()) <= n_bin_counts
    assert (out.obs["n_bins"] >= 1).all() and out.obs_names.is_unique
    # The cells are a table tl.fit trains on.
    model = sg.tl.fit(bins, table_key="cells", max_epochs=1, seed=0, batch_size=8)
    assert bins["cells"].obsm[Keys.X_SIGMMA].shape[0] == out.n_obs and model.genes
    # ... as cells, not as bins: their own embedding (no niche blocks) read out with the ridge.
    assert model.params["technology"] == "visium_hd_cells" and model.params["context_weight"] == 0.0
    pred = sg.tl.predict_expression(model, bins, table_key="cells")
    assert pred.uns[Keys.UNS][Keys.PARAMS]["method"] == "ridge"


def test_bins_to_cells_refuses_before_writing():
    fresh, _ = synthetic_bins(120, seed=1)
    before_tables, before_shapes = set(fresh.tables), set(fresh.shapes)
    with pytest.raises(ValueError, match="expand_um"):
        sg.pp.bins_to_cells(fresh, expand_um=-1)
    with pytest.raises(ValueError, match="key_added"):
        sg.pp.bins_to_cells(fresh, key_added="table")
    # A segmenter that finds nothing: refused, and nothing was added.
    with pytest.raises(ValueError, match="no nucleus"):
        sg.pp.bins_to_cells(fresh, segmenter=lambda tile: np.zeros(tile.shape[:2], np.int32))
    with pytest.raises(ValueError, match="integer label image"):
        sg.pp.bins_to_cells(fresh, segmenter=lambda tile: np.zeros(tile.shape[:2], np.float32))
    assert set(fresh.tables) == before_tables and set(fresh.shapes) == before_shapes


def test_bins_embed_with_their_niche_at_the_bins_context_weight():
    from sigmma_sc._constants import Defaults

    bins, _ = synthetic_bins(150, bin_um=8.0, seed=2)
    model = sg.tl.fit(bins, max_epochs=1, seed=0, batch_size=8, embed_dim=16, hidden_dim=32)
    weight = model.params["context_weight"]
    assert weight == Defaults.CONTEXT_WEIGHT_BINS > 0
    emb = model.get_embeddings(bins)
    # The bin's own block at weight 1, its niche's (meso) and region's (macro) at the bins' weight.
    for side in ("img", "expr"):
        blocks = np.concatenate([emb[f"micro_{side}"], weight * emb[f"meso_{side}"], weight * emb[f"macro_{side}"]], 1)
        expected = blocks / np.linalg.norm(blocks, axis=1, keepdims=True)
        np.testing.assert_allclose(emb[side], expected, atol=1e-5)
    np.testing.assert_allclose(bins[Keys.TABLE].obsm[Keys.X_SIGMMA_IMG], emb["img"], atol=1e-5)
    # Bins embedded with their niche read out with the blend by default (cells: the ridge).
    assert model.params["technology"] == "visium_hd"
    pred = sg.tl.predict_expression(model, bins)
    assert pred.uns[Keys.UNS][Keys.PARAMS]["method"] == Defaults.READOUT_BINS == "blend"
    # An explicit weight wins and is recorded as given.
    again = sg.tl.fit(bins, max_epochs=1, seed=0, batch_size=8, embed_dim=16, hidden_dim=32, context_weight=0.0)
    assert again.params["context_weight"] == 0.0
    np.testing.assert_allclose(again.get_embeddings(bins)["img"][:, 16:], 0.0, atol=1e-6)
