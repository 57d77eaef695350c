"""sigmma_sc.pl on real her2st data and the synthetic tissue: every plot writes a real image.

"Real image" = a PNG whose pixels vary (a blank or single-colour canvas fails), checked with
matplotlib's reader. Plots that need a fitted model get inputs built to the contract in
docs/architecture.md (obsm keys, history columns, the tl.evaluate table, a model exposing
``genes`` and ``get_embeddings``); tl.fit itself is exercised by the model tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import sigmma_sc as sg
from sigmma_sc._constants import Keys, Levels

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def colorbars(fig) -> list[tuple[str, tuple[float, float]]]:
    """(label, (vmin, vmax)) of each colour bar, in drawing order (a vertical bar's y range is its norm)."""
    bars = [a for a in fig.axes if not a.get_title() and a.get_ylabel()]
    return [(a.get_ylabel(), tuple(float(v) for v in np.round(a.get_ylim(), 10))) for a in bars]


def colorbar_limits(fig) -> dict[str, tuple[float, float]]:
    """Colour-bar label -> (vmin, vmax), for figures whose bars have distinct labels."""
    return dict(colorbars(fig))


def map_titles(fig) -> list[str]:
    return [a.get_title() for a in fig.axes if a.get_title()]


def assert_image(path: Path, *, min_std: float = 0.02) -> np.ndarray:
    """The PNG exists, is not tiny, and its pixels vary (not a blank canvas)."""
    assert path.exists(), f"{path} was not written"
    img = plt.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) > 100, img.shape
    std = float(img[..., :3].std())
    assert std > min_std, f"{path.name}: pixel std {std:.4f}, the figure looks blank"
    return img


# ---------------------------------------------------------------------------------------------
# objects built to the contract (no training in this file)
# ---------------------------------------------------------------------------------------------
def _pca(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=n, random_state=seed).fit_transform(x).astype(np.float32)


def _embedded_table(sdata, genes: list[str]) -> ad.AnnData:
    """A copy of the table with the obsm keys tl.fit writes (from PCA of expression + image-like noise)."""
    slide = sg.io.validate(sdata)
    expr = slide.expression(genes)
    rng = np.random.default_rng(0)
    table = sdata["table"].copy()
    z_expr = _pca(expr, 16)
    z_img = z_expr + rng.normal(0, 0.5 * z_expr.std(), z_expr.shape).astype(np.float32)
    table.obsm[Keys.X_SIGMMA_EXPR] = z_expr
    table.obsm[Keys.X_SIGMMA_IMG] = z_img
    table.obsm[Keys.X_SIGMMA] = np.concatenate([z_img, z_expr], axis=1)
    for lv in (Levels.MESO, Levels.MACRO):
        shift = 3.0 if lv == Levels.MACRO else 0.0
        table.obsm[Keys.level_embedding(lv, "img")] = z_img + shift
        table.obsm[Keys.level_embedding(lv, "expr")] = z_expr + shift
    return table


class ContractModel:
    """What tl.retrieve needs from a Sigmma: ``genes`` and ``get_embeddings`` (per table unit)."""

    def __init__(self, genes: list[str], noise: float = 0.5):
        self.genes = genes
        self.noise = noise

    def get_embeddings(self, sdata, *, table_key: str = Keys.TABLE, **kwargs) -> dict[str, np.ndarray]:
        # Sigmma.get_embeddings's options (expression=, max_missing_genes=) do not change this fake.
        slide = sg.io.validate(sdata, table_key=table_key)
        expr = slide.expression(self.genes)
        rng = np.random.default_rng(1)
        img = expr + rng.normal(0, self.noise * expr.std(), expr.shape)
        return {"img": img, "expr": expr, "joint": np.concatenate([img, expr], axis=1)}


def _history(levels=Levels.ALL, epochs: int = 12) -> pd.DataFrame:
    """One row per epoch, columns as the model writes them (train_loss, train_loss_{level}, val_..., temperature_...)."""
    e = np.arange(epochs + 1)
    rows = {"epoch": e}
    for split, off in (("train", 0.0), ("val", 0.15)):
        rows[f"{split}_loss"] = 4.0 * np.exp(-e / 4) + 1.0 + off
        for i, lv in enumerate(levels):
            rows[f"{split}_loss_{lv}"] = (1.5 + i) * np.exp(-e / (3 + i)) + 0.3 + off
        rows[f"{split}_loss_consistency"] = 0.2 * np.exp(-e / 5)
    for lv in levels:
        rows[f"temperature_{lv}"] = np.full(len(e), 0.07)
    return pd.DataFrame(rows)


def _scores() -> pd.DataFrame:
    """A table shaped like tl.evaluate's (METRICS columns, one row per method)."""
    from sigmma_sc.tl._evaluate import METRICS

    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        rng.uniform(0.05, 0.6, (3, len(METRICS))),
        columns=list(METRICS),
        index=pd.Index(["sigmma", "ridge", "single_scale"], name="method"),
    )
    for k in (1, 5, 10):
        df[f"chance_r{k}"] = k / 180
    df["median_rank_img2expr"] = [12.0, 30.0, 25.0]
    df["median_rank_expr2img"] = [10.0, 31.0, 22.0]
    return df


# ---------------------------------------------------------------------------------------------
# her2st (real)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def her2st_c2(her2st_dir):
    """Section C2 alone with its hierarchy (nuclei from the H&E): an object of our own, free to modify."""
    sdata = sg.datasets.her2st(her2st_dir, sections=["C2"])
    sg.pp.build_hierarchy(sdata)
    return sdata


def test_spatial_gene_and_categories_her2st(her2st_sdata, tmp_path):
    fig = sg.pl.spatial(her2st_sdata, color="ERBB2", sections=["C2", "C3"], save=tmp_path / "erbb2.png")
    assert isinstance(fig, plt.Figure)
    # Two map panels, each with a colour bar.
    assert len(fig.axes) == 4
    img = assert_image(tmp_path / "erbb2.png")
    # The H&E is drawn under the spots: the panel is not just white + spot colours (H&E is pink/purple).
    rgb = img[..., :3]
    pinkish = (rgb[..., 0] > rgb[..., 1] + 0.08) & (rgb[..., 2] > rgb[..., 1] + 0.05)
    assert pinkish.mean() > 0.05, "no H&E under the spots"
    ax = sg.pl.spatial(her2st_sdata, color=Keys.SECTION, sections="C4", save=tmp_path / "section.png")
    # Only the category drawn is listed (not all five sections).
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["C4"]
    assert_image(tmp_path / "section.png")


def test_spatial_units_sit_on_their_microns(her2st_sdata):
    """The spot discs are placed at obsm['spatial'] with the true 100 µm diameter."""
    ax = sg.pl.spatial(her2st_sdata, color="ERBB2", sections="C2")
    coll = ax.collections[0]
    table = her2st_sdata["table"]
    xy = np.asarray(table.obsm[Keys.SPATIAL])[table.obs[Keys.SECTION].to_numpy() == "C2"]
    offsets = coll.get_offsets()
    assert len(offsets) == len(xy)
    np.testing.assert_allclose(np.sort(offsets[:, 0]), np.sort(xy[:, 0]))
    np.testing.assert_allclose(coll._widths * 2, 100.0)  # matplotlib stores half-widths
    # y grows downwards, as in the image.
    y0, y1 = ax.get_ylim()
    assert y0 > y1


def test_spatial_prediction_from_adata(her2st_sdata, tmp_path):
    table = her2st_sdata["table"]
    c3 = table.obs_names[table.obs[Keys.SECTION] == "C3"]
    pred = ad.AnnData(
        np.random.default_rng(0).gamma(2.0, 1.0, (len(c3), 2)).astype(np.float32),
        obs=pd.DataFrame(index=c3),
        var=pd.DataFrame(index=["ERBB2", "GRB7"]),
    )
    ax = sg.pl.spatial(her2st_sdata, color="GRB7", adata=pred, sections="C3", save=tmp_path / "pred.png")
    assert len(ax.collections[0].get_offsets()) == len(c3)
    assert_image(tmp_path / "pred.png")
    with pytest.raises(KeyError, match="neither an obs column nor a gene"):
        sg.pl.spatial(her2st_sdata, color="NOT_A_GENE", sections="C2")


def test_predicted_vs_observed_her2st(her2st_sdata, tmp_path):
    slide = sg.io.validate(her2st_sdata)
    genes = ["ERBB2", "KRT19"]
    keep = slide.section_units("C2")
    observed = slide.expression(genes)[keep]
    rng = np.random.default_rng(0)
    pred = ad.AnnData(
        (0.6 * observed + rng.normal(0, 0.4, observed.shape)).astype(np.float32),
        obs=pd.DataFrame(index=her2st_sdata["table"].obs_names[keep]),
        var=pd.DataFrame(index=genes),
    )
    fig = sg.pl.predicted_vs_observed(pred, her2st_sdata, genes=genes, save=tmp_path / "pvo.png")
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    from sigmma_sc.tl import pearson_per_gene

    r = pearson_per_gene(observed, pred.X)
    assert f"ERBB2 predicted, r = {r[0]:.2f}" in titles
    assert f"KRT19 predicted, r = {r[1]:.2f}" in titles
    assert_image(tmp_path / "pvo.png")
    # One colour scale per gene by default: observed and predicted maps, vmax = p99 of both together.
    lims = colorbar_limits(fig)
    assert lims["ERBB2 (log1p)"] == lims["ERBB2 predicted (log1p)"]
    assert lims["KRT19 (log1p)"] == lims["KRT19 predicted (log1p)"]
    both = np.concatenate([observed[:, 0], np.asarray(pred.X)[:, 0]])
    np.testing.assert_allclose(lims["ERBB2 (log1p)"], (both.min(), np.percentile(both, 99)))
    # share_scale=False: each map its own (the noisy prediction spans other values than the counts).
    fig = sg.pl.predicted_vs_observed(pred, her2st_sdata, genes="ERBB2", library_id="C2", share_scale=False)
    lims = colorbar_limits(fig)
    assert lims["ERBB2 (log1p)"] != lims["ERBB2 predicted (log1p)"]


def test_embedding_her2st(her2st_sdata, tmp_path):
    genes = list(her2st_sdata["table"].var_names[:300])
    table = _embedded_table(her2st_sdata, genes)
    # A 2-D basis is drawn as is; the UMAP itself is tested (slow) below.
    table.obsm["X_sigmma_umap"] = _pca(table.obsm[Keys.X_SIGMMA], 2)
    before = set(table.obsm)
    fig = sg.pl.embedding(table, color=[Keys.SECTION, "ERBB2"], save=tmp_path / "emb.png")
    assert set(table.obsm) == before, "embedding must not write into the user's AnnData"
    # Raw counts are shown log1p-normalised (as in the spatial maps), and labelled so.
    cbar = fig.axes[-1]
    assert cbar.get_ylabel() == "ERBB2 (log1p)" and cbar.get_ylim()[1] < 10
    assert isinstance(fig, plt.Figure)
    pts = fig.axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(np.sort(pts[:, 0]), np.sort(table.obsm["X_sigmma_umap"][:, 0]))
    assert_image(tmp_path / "emb.png")


def test_levels_her2st(her2st_c2, tmp_path):
    hier = sg.pp.get_hierarchy(her2st_c2)
    unit = str(her2st_c2["table"].obs_names[40])
    ax = sg.pl.levels(her2st_c2, region=unit, save=tmp_path / "levels.png")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(lab.startswith("micro: nuclei of the centre") for lab in labels)
    assert f"macro view ({hier.levels[Levels.MACRO].fov_um:g} µm)" in labels
    # The view is the macro field of view around the region (plus a margin).
    x0, x1 = ax.get_xlim()
    assert hier.levels[Levels.MACRO].fov_um < x1 - x0 < 1.5 * hier.levels[Levels.MACRO].fov_um
    assert_image(tmp_path / "levels.png")
    with pytest.raises(IndexError, match="out of range"):
        sg.pl.levels(her2st_c2, region=10**6)


def test_retrieval_her2st(her2st_c2, tmp_path):
    genes = list(her2st_c2["table"].var_names[:200])
    model = ContractModel(genes, noise=0.05)
    q = str(her2st_c2["table"].obs_names[7])
    fig = sg.pl.retrieval(model, her2st_c2, query=q, k=4, n_genes=12, save=tmp_path / "retrieval.png")
    titles = [a.get_title() for a in fig.axes]
    # Little noise: the query's own spot is the best match and is marked as the correct answer.
    assert titles[1].startswith(f"#1 {q} ✓")
    heat = fig.axes[-2]  # heatmap (the last axes is its colour bar)
    assert len(heat.get_yticklabels()) == 5 and len(heat.get_xticklabels()) == 12
    assert_image(tmp_path / "retrieval.png")


# ---------------------------------------------------------------------------------------------
# synthetic (cells)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_hier(synthetic_sdata):
    """A copy of the synthetic tissue's table in a new SpatialData (shared elements untouched), with its hierarchy."""
    from spatialdata import SpatialData

    sdata = SpatialData(
        images=dict(synthetic_sdata.images),
        shapes=dict(synthetic_sdata.shapes),
        tables={Keys.TABLE: synthetic_sdata[Keys.TABLE].copy()},
    )
    sg.pp.build_hierarchy(sdata)
    return sdata


def test_spatial_synthetic(synthetic_sdata, tmp_path):
    fig = sg.pl.spatial(synthetic_sdata, color=Keys.CELL_TYPE, ncols=1, save=tmp_path / "ct.pdf")
    assert (tmp_path / "ct.pdf").stat().st_size > 10_000
    assert len(fig.axes) == 2
    ax = sg.pl.spatial(
        synthetic_sdata, color=Keys.CELL_TYPE, sections="S0", groups=["type0"], save=tmp_path / "groups.png"
    )
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["type0"]
    assert_image(tmp_path / "groups.png")
    gene = synthetic_sdata["table"].var_names[0]
    fig, axs = plt.subplots(1, 2)
    out = sg.pl.spatial(synthetic_sdata, color=gene, sections="S1", ax=axs[1], vmax=1.0)
    assert out is axs[1]
    mappable = out.collections[0]
    assert mappable.get_facecolors().shape[0] == int((synthetic_sdata["table"].obs[Keys.SECTION] == "S1").sum())
    with pytest.raises(ValueError, match="one section"):
        sg.pl.spatial(synthetic_sdata, color=gene, ax=axs[0])


def test_spatial_color_list_one_panel_per_key(synthetic_sdata, tmp_path):
    """scanpy semantics: color=[...] draws one panel per key (and section), wrapped by ncols."""
    gene = str(synthetic_sdata["table"].var_names[0])
    fig = sg.pl.spatial(
        synthetic_sdata, color=[Keys.CELL_TYPE, gene], ncols=2, wspace=0.5, hspace=0.3, save=tmp_path / "keys.png"
    )
    assert isinstance(fig, plt.Figure)
    assert map_titles(fig) == [f"{Keys.CELL_TYPE} – S0", f"{Keys.CELL_TYPE} – S1", f"{gene} – S0", f"{gene} – S1"]
    maps = [a for a in fig.axes if a.get_title()]
    grid = maps[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == (2, 2) and grid.wspace == 0.5 and grid.hspace == 0.3
    # One legend for the categorical key (beside its last panel), a colour bar per gene panel.
    assert [a.get_legend() is not None for a in maps] == [False, True, False, False]
    assert [label for label, _ in colorbars(fig)] == [f"{gene} (log1p)"] * 2
    assert_image(tmp_path / "keys.png")
    # One section, two keys: the keys are the titles; the same call as scanpy's.
    fig = sg.pl.spatial(synthetic_sdata, color=[Keys.CELL_TYPE, gene], library_id="S1")
    assert map_titles(fig) == [Keys.CELL_TYPE, gene]
    with pytest.raises(ValueError, match="one section"):
        sg.pl.spatial(synthetic_sdata, color=[Keys.CELL_TYPE, gene], library_id="S1", ax=plt.subplots()[1])


def test_spatial_library_id_and_return_fig(synthetic_sdata):
    table = synthetic_sdata["table"]
    n_s1 = int((table.obs[Keys.SECTION] == "S1").sum())
    ax = sg.pl.spatial(synthetic_sdata, color=Keys.CELL_TYPE, library_id="S1")
    assert ax.get_title() == "S1" and len(ax.collections[0].get_offsets()) == n_s1
    fig = sg.pl.spatial(synthetic_sdata, color=Keys.CELL_TYPE, library_id=["S1"], return_fig=True)
    assert isinstance(fig, plt.Figure) and map_titles(fig) == ["S1"]
    assert len(fig.axes[0].collections[0].get_offsets()) == n_s1
    # sections= is the same argument under this package's name; both at once is ambiguous.
    assert map_titles(sg.pl.spatial(synthetic_sdata, sections="S0", return_fig=True)) == ["S0"]
    with pytest.raises(ValueError, match="same argument"):
        sg.pl.spatial(synthetic_sdata, library_id="S0", sections="S1")
    with pytest.raises(KeyError, match="not in the data"):
        sg.pl.spatial(synthetic_sdata, library_id="S9")
    # A bare AnnData with obsm["spatial"] in microns: the same maps without H&E.
    ax = sg.pl.spatial(table, color=Keys.CELL_TYPE, library_id="S1")
    assert len(ax.collections[0].get_offsets()) == n_s1 and not ax.images
    # return_fig with the user's ax returns that ax's figure.
    fig, ax = plt.subplots()
    assert sg.pl.spatial(synthetic_sdata, library_id="S0", ax=ax, return_fig=True) is fig


def test_spatial_sections_share_one_colour_scale(synthetic_sdata):
    """Several sections of one continuous key: one norm over all drawn units unless share_scale=False."""
    table = synthetic_sdata["table"]
    gene = str(table.var_names[0])
    values = sg.io.validate(synthetic_sdata).expression([gene])[:, 0]
    sec = table.obs[Keys.SECTION].to_numpy()
    v0, v1 = np.sort(values[sec == "S0"]), np.sort(values[sec == "S1"])
    shared = np.intersect1d(v0[v0 > v0.min()], v1)
    probe = shared[len(shared) // 2]  # a value both sections hold, inside the colour range

    def probe_colors(fig):
        # Panels draw units by increasing value (hot spots on top): the i-th colour is the i-th smallest value.
        maps = [a for a in fig.axes if a.get_title()]
        return [a.collections[0].get_facecolors()[np.searchsorted(v, probe)] for a, v in zip(maps, (v0, v1))]

    fig = sg.pl.spatial(synthetic_sdata, color=gene)
    (_, lim0), (_, lim1) = colorbars(fig)
    assert lim0 == lim1
    np.testing.assert_allclose(lim0, (values.min(), np.percentile(values, 99)))
    c0, c1 = probe_colors(fig)
    np.testing.assert_allclose(c0, c1)  # the same value, the same colour in both sections
    # Each section its own scale on request (the two sections' p99 differ, so the colours do too).
    fig = sg.pl.spatial(synthetic_sdata, color=gene, share_scale=False)
    lims = [lim for _, lim in colorbars(fig)]
    np.testing.assert_allclose(lims, [(v.min(), np.percentile(v, 99)) for v in (v0, v1)])
    assert lims[0] != lims[1]
    c0, c1 = probe_colors(fig)
    assert not np.allclose(c0, c1)


def test_spatial_img_key_levels_and_elements(synthetic_sdata):
    """img_key picks the pyramid level (int, "scaleN", "hires" / "lowres") or the image element."""
    img = sg.io.validate(synthetic_sdata).images["S0"]
    assert img.n_levels >= 2

    def drawn(**kw):
        ax = sg.pl.spatial(synthetic_sdata, library_id="S0", **kw)
        return ax.images[0].get_array().shape[:2]

    full, coarse = drawn(img_key=0), drawn(img_key="lowres")
    assert drawn(img_key="hires") == full and drawn(img_key=f"scale{img.n_levels - 1}") == coarse
    ratio = img.level_factors[-1] / img.level_factors[0]
    assert abs(full[0] / coarse[0] - ratio) < 0.1 * ratio
    assert drawn(img_key={"S0": "S0_he"}) == drawn()
    with pytest.raises(KeyError, match="pyramid level"):
        sg.pl.spatial(synthetic_sdata, library_id="S0", img_key="nope")
    with pytest.raises(ValueError, match="not a pyramid level"):
        sg.pl.spatial(synthetic_sdata, library_id="S0", img_key=img.n_levels)


def test_embedding_stacked_levels_synthetic(synthetic_sdata, tmp_path):
    table = _embedded_table(synthetic_sdata, list(synthetic_sdata["table"].var_names))
    bases = [Keys.level_embedding(lv, m) for lv in (Levels.MESO, Levels.MACRO) for m in ("img", "expr")]
    # 2-D stand-ins keep this test free of UMAP's compile time; the stacking logic is what is checked.
    for b in bases:
        table.obsm[b] = table.obsm[b][:, :2]
    fig = sg.pl.embedding(table, basis=bases[:1], color="level", legend_loc="none", return_fig=True)
    assert isinstance(fig, plt.Figure) and len(fig.axes[0].collections[0].get_offsets()) == table.n_obs
    with pytest.raises(ValueError, match="key_added"):
        sg.pl.embedding(table, basis=bases, color="level", key_added="X_umap_levels")
    with pytest.raises(KeyError, match="Run sg.tl.fit"):
        sg.pl.embedding(table, basis="X_missing")


@pytest.mark.slow
def test_embedding_umap_synthetic(synthetic_sdata, tmp_path):
    table = _embedded_table(synthetic_sdata, list(synthetic_sdata["table"].var_names))
    bases = [Keys.level_embedding(lv, m) for lv in (Levels.MESO, Levels.MACRO) for m in ("img", "expr")]
    fig = sg.pl.embedding(table, basis=bases, color=["level", "modality", Keys.CELL_TYPE], save=tmp_path / "u.png")
    assert len(fig.axes[0].collections[0].get_offsets()) == 4 * table.n_obs
    assert_image(tmp_path / "u.png")
    sg.pl.embedding(table, key_added="X_sigmma_umap", color=None)
    assert table.obsm["X_sigmma_umap"].shape == (table.n_obs, 2)


def test_levels_synthetic(synthetic_hier, tmp_path):
    fig = sg.pl.levels(synthetic_hier, region=3, return_fig=True, save=tmp_path / "levels.png")
    assert isinstance(fig, plt.Figure)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("cells of the centre" in lab for lab in labels)
    assert any(lab.startswith("macro: region (") and "niches" in lab for lab in labels)
    assert_image(tmp_path / "levels.png")


def test_retrieval_synthetic_reference_gallery(synthetic_sdata, tmp_path):
    table = synthetic_sdata["table"]
    genes = list(table.var_names[:40])
    model = ContractModel(genes)
    slide = sg.io.validate(synthetic_sdata)
    reference = ad.AnnData(
        slide.expression(genes)[:300], obs=pd.DataFrame(index=table.obs_names[:300]), var=pd.DataFrame(index=genes)
    )
    reference.obsm[Keys.X_SIGMMA_EXPR] = reference.X.copy()
    reference.obsm[Keys.X_SIGMMA_IMG] = reference.X.copy()
    fig = sg.pl.retrieval(model, synthetic_sdata, query=5, k=3, gallery=reference, save=tmp_path / "r.png")
    assert "no H&E" in fig.axes[1].texts[0].get_text()
    assert_image(tmp_path / "r.png")


# ---------------------------------------------------------------------------------------------
# tables: history and evaluation
# ---------------------------------------------------------------------------------------------
def test_history_panels_per_level(tmp_path):
    df = _history()
    fig = sg.pl.history(df, save=tmp_path / "h.png")
    titles = [a.get_title() for a in fig.axes]
    assert titles == ["total", "micro level", "meso level", "macro level", "consistency"]
    # Train solid, validation dashed, both present in every panel; temperatures are not losses.
    for a in fig.axes:
        styles = sorted(line.get_linestyle() for line in a.get_lines())
        assert styles == ["-", "--"]
    assert_image(tmp_path / "h.png")
    # The same from an AnnData holding uns["sigmma"]["history"], into one axes.
    holder = ad.AnnData(np.zeros((2, 1), np.float32), uns={Keys.UNS: {Keys.HISTORY: df.to_dict(orient="list")}})
    _, ax = plt.subplots()
    out = sg.pl.history(holder, keys=["train_loss", "val_loss"], ax=ax)
    assert out is ax and len(ax.get_lines()) == 2
    with pytest.raises(TypeError, match="history"):
        sg.pl.history(object())


def test_history_integer_epoch_ticks():
    """Four epochs: matplotlib would tick 0, 0.5, 1, ...; epochs are whole numbers."""
    df = _history(levels=(Levels.MESO,), epochs=3)
    fig = sg.pl.history(df, return_fig=True)
    assert isinstance(fig, plt.Figure)
    for a in fig.axes:
        fig.canvas.draw()
        lo, hi = a.get_xlim()
        ticks = [t for t in a.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
        labels = [t.get_text().replace("\u2212", "-") for t in a.get_xticklabels() if lo <= t.get_position()[0] <= hi]
        assert all(lab.lstrip("-").isdigit() for lab in labels), labels


def _axes_by_ylabel(fig) -> dict[str, plt.Axes]:
    return {a.get_ylabel(): a for a in fig.axes}


def test_evaluation_readable_panels_and_chance(tmp_path):
    """tl.evaluate's table: Pearson r and Recall@k on separate axes, names in words, chance on recall."""
    df = _scores()
    fig = sg.pl.evaluation(df, save=tmp_path / "eval.png")
    assert isinstance(fig, plt.Figure)
    axes = _axes_by_ylabel(fig)
    assert list(axes) == ["Pearson r", "Recall@k"]
    pcc_ticks = [t.get_text() for t in axes["Pearson r"].get_xticklabels()]
    recall_ticks = [t.get_text() for t in axes["Recall@k"].get_xticklabels()]
    assert pcc_ticks == [
        "top-50 HVG",
        "top-50 expressed genes",
        "top-50 HVG detected in ≥ 1%",
        "top-50 HVG (per slide)",
        "top-50 expressed genes (per slide)",
        "top-50 HVG detected in ≥ 1% (per slide)",
    ]
    assert recall_ticks[:3] == ["H&E → expression, k = 1", "H&E → expression, k = 5", "H&E → expression, k = 10"]
    assert not any("_" in t for t in pcc_ticks + recall_ticks)  # no raw column names; no median ranks either
    # One bar per method and metric; chance (k / n) as one dashed line per recall metric, none for r.
    assert sum(p.get_height() != 0 for p in axes["Pearson r"].patches) == 3 * 6
    assert not [c for c in axes["Pearson r"].collections if c.get_gid() == "chance"]
    chance = [c.get_segments()[0][0][1] for c in axes["Recall@k"].collections if c.get_gid() == "chance"]
    np.testing.assert_allclose(chance, [k / 180 for k in (1, 5, 10)] * 2)
    assert "chance" in [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert_image(tmp_path / "eval.png")
    # One kind of metric fits the user's axes, with readable tick labels; two kinds do not.
    _, ax = plt.subplots()
    out = sg.pl.evaluation(df, metrics=["r1_img2expr", "r1_expr2img"], ax=ax)
    assert out is ax and ax.get_ylabel() == "Recall@k"
    with pytest.raises(ValueError, match="one panel"):
        sg.pl.evaluation(df, ax=ax)
    with pytest.raises(KeyError, match="not in the evaluation table"):
        sg.pl.evaluation(df, metrics=["nope"])
    ax = sg.pl.evaluation(df, metrics=["pcc_hvg50"], metric_names={"pcc_hvg50": "HVG"})
    assert [t.get_text() for t in ax.get_xticklabels()] == ["HVG"]
    # tl.evaluate's confidence score (SIGMMA only, NaN for baselines) gets its own labelled panel.
    fig = sg.pl.evaluation(df.assign(confidence_spearman=[0.3, np.nan, np.nan]))
    assert [a.get_ylabel() for a in fig.axes] == ["Pearson r", "Recall@k", "Spearman ρ"]
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == ["confidence vs per-unit r"]


def test_evaluation_error_bars_from_seeds():
    """Several seeds (the runs of benchmarks/quality.py): mean of per-seed fold means, s.d. over seeds."""
    rng = np.random.default_rng(0)
    runs = pd.DataFrame(
        [
            {
                "fold": f,
                "seed": s,
                "method": m,
                "pcc_hvg50": rng.uniform(0.2, 0.5),
                "r5_img2expr": rng.uniform(0.1, 0.4),
                "chance_r5": 5 / 90,
            }
            for f in range(2)
            for s in range(3)
            for m in ("sigmma", "ridge_cv")
        ]
    )
    fig = sg.pl.evaluation(runs)
    per_seed = runs.groupby(["method", "seed"])[["pcc_hvg50", "r5_img2expr"]].mean()
    for metric, ylabel in (("pcc_hvg50", "Pearson r"), ("r5_img2expr", "Recall@k")):
        ax = _axes_by_ylabel(fig)[ylabel]
        heights = [p.get_height() for p in ax.patches]
        half = [
            seg[1][1] - seg[0][1] for c in ax.containers if hasattr(c, "lines") for seg in c.lines[2][0].get_segments()
        ]
        for meth, h, e in zip(("sigmma", "ridge_cv"), heights, np.array(half) / 2):
            np.testing.assert_allclose(h, per_seed.loc[meth, metric].mean())
            np.testing.assert_allclose(e, per_seed.loc[meth, metric].std(ddof=1))
    assert fig.axes[-1].get_legend().get_title().get_text() == "mean ± s.d. over 3 seeds"
    # One seed: no error bars.
    fig = sg.pl.evaluation(runs[runs["seed"] == 0])
    assert not any(hasattr(c, "lines") for a in fig.axes for c in a.containers)


def test_evaluation_benchmark_json_and_long_table():
    """The aggregated table of benchmarks/quality.py (*_std columns, chance_r5 only) and long tables."""
    import json

    methods = json.loads((REPO / "benchmarks" / "results_her2st_loso.json").read_text())["methods"]
    df = pd.DataFrame.from_dict(methods, orient="index")
    fig = sg.pl.evaluation(df)
    recall = _axes_by_ylabel(fig)["Recall@k"]
    # chance_r5 alone gives every k: Recall@k of a random ranking of n items is k / n.
    chance = [c.get_segments()[0][0][1] for c in recall.collections if c.get_gid() == "chance"]
    c5 = methods["sigmma"]["chance_r5"]
    np.testing.assert_allclose(chance, [c5 / 5, c5, 2 * c5] * 2)
    assert sum(hasattr(c, "lines") for c in recall.containers) == len(methods)  # error bars from *_std
    assert fig.axes[-1].get_legend().get_title().get_text() == "mean ± s.d."
    wide = _scores()[["pcc_hvg50", "r1_img2expr"]].assign(pcc_hvg50_std=[0.05, 0.02, 0.03])
    long = wide.reset_index().melt(id_vars="method", value_vars=["pcc_hvg50", "r1_img2expr"], var_name="metric")
    ax = sg.pl.evaluation(long, metrics=["r1_img2expr"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["H&E → expression, k = 1"]


# ---------------------------------------------------------------------------------------------
# structure: shared docstrings, imports
# ---------------------------------------------------------------------------------------------
PL_DIR = REPO / "src" / "sigmma_sc" / "pl"
PL_FUNCTIONS = ("spatial", "embedding", "levels", "predicted_vs_observed", "retrieval", "history", "evaluation")


def test_pl_docstrings_share_one_text_and_render():
    """save / show / ax / return_fig text lives once in pl/_docs.py; napoleon renders every parameter."""
    import inspect

    from sphinx.ext.napoleon import Config
    from sphinx.ext.napoleon.docstring import NumpyDocstring

    from sigmma_sc.pl import _docs

    sources = {f.name: f.read_text() for f in PL_DIR.glob("*.py")}
    for phrase in ("Write the figure to this path", "Return the :class:`~matplotlib.figure.Figure` instead"):
        assert [name for name, text in sources.items() if phrase in text] == ["_docs.py"], phrase
    config = Config(napoleon_use_param=True)
    for name in PL_FUNCTIONS:
        fn = getattr(sg.pl, name)
        assert "{" + "save_show}" not in fn.__doc__ and _docs.doc_save_show.splitlines()[1].strip() in fn.__doc__
        rendered = str(NumpyDocstring(inspect.getdoc(fn), config))
        documented = set()
        for line in rendered.splitlines():
            if line.startswith(":param "):
                documented.update(p.strip() for p in line[len(":param ") :].split(":")[0].split(","))
        params = set(inspect.signature(fn).parameters)
        assert params <= documented, f"{name}: undocumented {sorted(params - documented)}"
        assert ":returns:" in rendered or ":rtype:" in rendered or "Returns" in rendered, name


def test_pl_imports_public_api_only():
    """pl imports other subpackages through their public names, at module top, and stays light."""
    import ast

    for path in PL_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body} | {
            id(n) for node in tree.body if isinstance(node, ast.If) for n in ast.walk(node)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.module is None:
                continue
            mod = ("." * node.level) + node.module
            parts = mod.lstrip(".").split(".") if node.level < 2 else ["sigmma_sc", *node.module.split(".")]
            # sigmma_sc.<subpackage>._<private>: reach it through the subpackage's public names.
            private = len(parts) > 2 and parts[1] not in ("pl",) and not parts[1].startswith("_")
            assert not (parts[0] == "sigmma_sc" and private and any(x.startswith("_") for x in parts[2:])), (
                path.name,
                mod,
            )
            if mod.startswith("sigmma_sc.") and not mod.startswith("sigmma_sc._"):
                assert id(node) in top, f"{path.name}: `from {mod} import ...` inside a function"
    code = "import sys, sigmma_sc.pl; print(sorted(m for m in ('torch', 'squidpy', 'spatialdata', 'scanpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# ---------------------------------------------------------------------------------------------
# documentation
# ---------------------------------------------------------------------------------------------
def test_api_page_lists_every_public_function():
    """Every name a subpackage exports (``__all__``) appears on docs/api.md."""
    api = (REPO / "docs" / "api.md").read_text()
    skip = {"DATA_DIR_ENV", "local_dataset_dir", "resolve_dataset_dir"}  # path helpers, not user API
    missing = []
    for sub in ("datasets", "io", "pp", "tl", "pl"):
        mod = getattr(sg, sub)
        names = getattr(mod, "__all__", None) or [
            n for n, obj in vars(mod).items() if not n.startswith("_") and callable(obj)
        ]
        for name in names:
            if name not in skip and f"{sub}.{name}" not in api:
                missing.append(f"{sub}.{name}")
    assert not missing, f"add to docs/api.md: {missing}"


def test_plotting_page_spatialdata_plot_claims(synthetic_sdata):
    """docs/plotting.md names spatialdata-plot arguments: they exist, and its example runs on our objects."""
    import inspect
    import re

    sdp = pytest.importorskip("spatialdata_plot")
    from spatialdata_plot.pl.basic import PlotAccessor

    page = (REPO / "docs" / "plotting.md").read_text()
    section = page[page.index("### spatialdata-plot") : page.index("## `pl.levels`")]
    claims = re.findall(r"(render_images|render_shapes|show)\((\w+)=", section)
    assert len(claims) >= 6
    for method, arg in claims:
        assert arg in inspect.signature(getattr(PlotAccessor, method)).parameters, (
            f"{method}({arg}=) in docs/plotting.md"
        )
    assert f"({sdp.__version__}" in section, "spatialdata-plot changed: re-check the claims of docs/plotting.md"
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    exec(code, {"sdata": synthetic_sdata})
    axes = plt.gcf().axes
    assert [a.get_title() for a in axes[:2]] == ["S0", "S1"] and axes[0].images


@pytest.mark.slow
def test_docs_build_warnings_as_errors(tmp_path):
    """``sphinx-build -W`` passes (offline: intersphinx off, notebooks not executed)."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    out = tmp_path / "html"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(REPO / "docs"),
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "SIGMMA_DOCS_INTERSPHINX": "0"},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    html = (out / "api.html").read_text()
    assert "sigmma_sc.pl.spatial" in html
    assert (out / "generated" / "sigmma_sc.pl.spatial.html").exists()
