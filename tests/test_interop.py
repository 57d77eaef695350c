"""Interoperability with scanpy / squidpy / sopa / LazySlide: Visium AnnData in, ``uns["spatial"]`` out, patch embeddings.

1. ``io.from_anndata`` reads the scanpy / squidpy Visium layout (``uns["spatial"][library_id]``:
   images, scale factors; ``obsm["spatial"]`` in full-resolution pixels), one section per library.
2. ``tl.fit`` writes ``uns["spatial"]`` so ``sc.pl.spatial`` draws the units over the H&E.
3. ``pp.patch_features`` pools patch embeddings (sopa / LazySlide layouts) onto the hierarchy's nodes.

Real data: squidpy's Visium test data (49 mouse-brain spots, ``../shared/data/squidpy_tests``).
"""

from __future__ import annotations

import logging

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from _shared import TINY_ENCODER, quiet_single_thread, tiny_patch_registered

import sigmma_sc as sg
from sigmma_sc._constants import VISIUM_SPOT_DIAMETER_UM, VISIUM_SPOT_PITCH_UM, Keys
from sigmma_sc.io import read_rgb
from sigmma_sc.tl._fit import _write_scanpy_spatial, light_copy

ENCODER = TINY_ENCODER
PITCH_MPP = VISIUM_SPOT_PITCH_UM / 137.0  # squidpy_tests: 137 px between spot centres = 100 µm


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_thread():
    with quiet_single_thread(), tiny_patch_registered():
        yield


@pytest.fixture(scope="module")
def squidpy_dir():
    folder = sg.datasets.local_dataset_dir("squidpy_tests", required=["test_data.h5ad", "test_img.jpg"])
    if folder is None:
        pytest.skip("squidpy_tests data not found (set SIGMMA_DATA_DIR)")
    return folder


@pytest.fixture(scope="module")
def visium(squidpy_dir):
    """squidpy's Visium AnnData as stored (read-only here: tests copy it)."""
    return ad.read_h5ad(squidpy_dir / "test_data.h5ad")


@pytest.fixture(scope="module")
def full_image(squidpy_dir):
    return read_rgb(squidpy_dir / "test_img.jpg")


def _reduce(image: np.ndarray, factor: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).reduce(factor))


def _saturation(image: np.ndarray, colrow: np.ndarray, half: int = 3) -> np.ndarray:
    """Colourfulness (max - min of the mean RGB) of a small window around each (col, row): glass is grey."""
    c = np.rint(colrow).astype(int)
    out = []
    for col, row in c:
        win = image[max(row - half, 0) : row + half + 1, max(col - half, 0) : col + half + 1].reshape(-1, 3)
        mean = win.astype(float).mean(axis=0)
        out.append(mean.max() - mean.min())
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------
# 1. from_anndata on scanpy / squidpy Visium
# ---------------------------------------------------------------------------------------------
def test_from_anndata_reads_squidpy_visium_as_stored(visium, caplog):
    a = visium.copy()
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        sdata = sg.io.from_anndata(a)
    text = caplog.text
    # The stored "hires" (100 x 100) does not cover the crop's spots at its scale factor: "lowres" does.
    assert "image 'hires'" in text and "using 'lowres'" in text
    # spot_diameter_fullres (89.4 px) says 0.61 µm/px, the 137 px pitch 0.73: the pitch wins, both are logged.
    assert "0.6149" in text and "0.7299" in text and "using the pitch" in text
    slide = sg.io.validate(sdata)
    lib = "V1_Adult_Mouse_Brain"
    assert slide.sections == [lib] and slide.unit_kind == "spot" and slide.unit_diameter_um == VISIUM_SPOT_DIAMETER_UM
    assert slide.log_normalized and len(slide.xy_um) == a.n_obs
    scalef = a.uns["spatial"][lib]["scalefactors"]["tissue_lowres_scalef"]
    img = slide.images[lib]
    lowres = a.uns["spatial"][lib]["images"]["lowres"]
    assert img.shape == lowres.shape[:2]
    np.testing.assert_array_equal(img.read(0, *img.shape[:1], 0, img.shape[1]), np.rint(lowres * 255).astype(np.uint8))
    assert img.um_per_px == pytest.approx(PITCH_MPP / scalef, rel=1e-6)
    px = np.asarray(a.obsm["spatial"], dtype=float)
    np.testing.assert_allclose(slide.xy_um, (px + 0.5) * PITCH_MPP)
    # each spot sits where scanpy draws it on the lowres image (obsm * scalef), within half a pixel
    np.testing.assert_allclose(img.um_to_px(slide.xy_um) - 0.5, px * scalef, atol=0.5)
    assert list(slide.table.obs[Keys.BARCODE]) == list(a.obs_names)
    # uns stays behind: uns["spatial"] is in pixels, the new table is in microns
    assert Keys.SPATIAL not in sdata["table"].uns


def test_from_anndata_full_resolution_image_without_mpp(visium, full_image, caplog):
    a = visium.copy()
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        sdata = sg.io.from_anndata(a, full_image)  # pixel size and spot size from the AnnData itself
    assert "using the pitch" in caplog.text
    slide = sg.io.validate(sdata)
    assert slide.sections == ["section0"] and slide.unit_diameter_um == VISIUM_SPOT_DIAMETER_UM
    assert slide.images["section0"].um_per_px == pytest.approx(PITCH_MPP)
    # the same object as the explicit call (which stays as it was)
    explicit = sg.io.validate(sg.io.from_anndata(a, full_image, mpp=PITCH_MPP, spot_diameter=55.0))
    np.testing.assert_allclose(slide.xy_um, explicit.xy_um)
    # mpp= overrides the derivation; a per-library dict works too
    other = sg.io.validate(sg.io.from_anndata(a, full_image, mpp={"V1_Adult_Mouse_Brain": 0.5}))
    assert other.images["section0"].um_per_px == pytest.approx(0.5)


def _two_libraries(visium, full_image):
    """Library "B" (listed first): the crop mirrored left-right, 4x downsampled, with the stored (wrong) spot
    diameter and a lowres image; library "A": the crop 2x downsampled with a spot diameter that fits."""
    h, w = full_image.shape[:2]
    px = np.asarray(visium.obsm["spatial"], dtype=float)
    a_lib, b_lib = visium.copy(), visium.copy()
    b_lib.obsm["spatial"] = np.stack([(w - 1) - px[:, 0], px[:, 1]], axis=1)
    a_lib.obs_names = [f"A-{n}" for n in visium.obs_names]
    b_lib.obs_names = [f"B-{n}" for n in visium.obs_names]
    a_lib.obs["library_id"], b_lib.obs["library_id"] = "A", "B"
    both = ad.concat([b_lib, a_lib])
    both.obs["library_id"] = pd.Categorical(both.obs["library_id"], categories=["A", "B"])
    mirrored = np.ascontiguousarray(full_image[:, ::-1])
    both.uns["spatial"] = {
        "A": {
            "images": {"hires": _reduce(full_image, 2)},
            "scalefactors": {"tissue_hires_scalef": 0.5, "spot_diameter_fullres": 55.0 / PITCH_MPP},
        },
        "B": {
            "images": {"hires": _reduce(mirrored, 4), "lowres": _reduce(mirrored, 16)},
            "scalefactors": {
                "tissue_hires_scalef": 0.25,
                "tissue_lowres_scalef": 1 / 16,
                "spot_diameter_fullres": visium.uns["spatial"]["V1_Adult_Mouse_Brain"]["scalefactors"][
                    "spot_diameter_fullres"
                ],
            },
        },
    }
    return both


def test_from_anndata_two_libraries(visium, full_image, caplog):
    both = _two_libraries(visium, full_image)
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        sdata = sg.io.from_anndata(both, library_key="library_id")
    slide = sg.io.validate(sdata)
    assert slide.sections == ["B", "A"]  # one section per library, in order of first appearance
    assert np.bincount(slide.unit_section).tolist() == [visium.n_obs, visium.n_obs]
    # A: the stored diameter fits the pitch and is used; B: it does not, the pitch is used
    assert "library 'A': 0.7299 µm/px from spot_diameter_fullres" in caplog.text
    assert "library 'B': spot_diameter_fullres" in caplog.text and "using the pitch" in caplog.text
    for lib, factor in (("A", 2), ("B", 4)):
        img = slide.images[lib]
        hires = both.uns["spatial"][lib]["images"]["hires"]  # the finest image is used, as stored
        assert img.um_per_px == pytest.approx(PITCH_MPP * factor, rel=1e-6)
        np.testing.assert_array_equal(img.read(0, img.shape[0], 0, img.shape[1]), hires)
        rows = slide.unit_section == slide.sections.index(lib)
        barcodes = slide.table.obs[Keys.BARCODE].to_numpy()[rows]
        src = np.asarray(both[barcodes].obsm["spatial"], dtype=float)
        np.testing.assert_allclose(img.um_to_px(slide.xy_um[rows]) - 0.5, src / factor, atol=0.5)
    # The same tissue under the same spot in both libraries (B is A mirrored): colours agree spot by spot.
    colours = {}
    for lib in ("A", "B"):
        img, rows = slide.images[lib], slide.unit_section == slide.sections.index(lib)
        order = np.argsort([b[2:] for b in slide.table.obs[Keys.BARCODE].to_numpy()[rows]])
        full = img.read(0, img.shape[0], 0, img.shape[1])
        cr = img.um_to_px(slide.xy_um[rows][order]) - 0.5
        colours[lib] = np.array(
            [
                full[max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3].reshape(-1, 3).mean(0)
                for c, r in np.rint(cr).astype(int)
            ]
        )
    same = np.abs(colours["A"] - colours["B"]).mean()
    shuffled = np.abs(colours["A"] - np.roll(colours["B"], 7, axis=0)).mean()
    assert same < 12 and same < 0.6 * shuffled, (same, shuffled)
    # one library of several; several libraries need library_key
    one = sg.io.validate(sg.io.from_anndata(both, library_key="library_id", library_id="A", section="mine"))
    assert one.sections == ["mine"] and len(one.xy_um) == visium.n_obs
    with pytest.raises(ValueError, match="library_key="):
        sg.io.from_anndata(both)
    with pytest.raises(KeyError, match="library_id"):
        sg.io.from_anndata(both, library_key="library_id", library_id="C")


# ---------------------------------------------------------------------------------------------
# 2. uns["spatial"] written by tl.fit, drawn by sc.pl.spatial
# ---------------------------------------------------------------------------------------------
def _circles(ax, n):
    """Centres and radii of the n circles sc.pl.spatial drew (data coordinates = image pixels)."""
    coll = next(c for c in ax.collections if len(c.get_paths()) == n)
    ext = np.array([[p.vertices.min(0), p.vertices.max(0)] for p in coll.get_paths()])
    return ext.mean(axis=1), (ext[:, 1] - ext[:, 0]).mean(axis=1) / 2


def test_fit_writes_uns_spatial_that_scanpy_draws_on_the_tissue(visium, full_image, tmp_path):
    import matplotlib.pyplot as plt
    import scanpy as sc

    sdata = sg.io.from_anndata(visium.copy(), full_image)
    sg.tl.fit(
        sdata,
        max_epochs=1,
        batch_size=8,
        embed_dim=8,
        hidden_dim=16,
        n_genes=20,
        seed=0,
        encoder=ENCODER,
        hierarchy_kwargs={"nuclei": False},
    )
    adata = sdata["table"]
    entry = adata.uns["spatial"]["section0"]
    hires = entry["images"]["hires"]
    # the pyramid level nearest 2,000 px: the full-resolution crop (1,717 px; the next level has 858)
    np.testing.assert_array_equal(hires, full_image)
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(1 / PITCH_MPP)  # hires px per micron
    assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(55.0)  # microns, as obsm["spatial"]
    adata.write_h5ad(tmp_path / "fitted.h5ad")
    back = ad.read_h5ad(tmp_path / "fitted.h5ad")
    for table in (adata, back):
        ax = sc.pl.spatial(table, color="leiden", library_id="section0", show=False)
        ax = ax[0] if isinstance(ax, list) else ax
        centres, radii = _circles(ax, table.n_obs)
        plt.close("all")
        # each spot is drawn where the source AnnData had it (full-resolution pixels), 55 µm wide
        np.testing.assert_allclose(centres, np.asarray(visium.obsm["spatial"], dtype=float), atol=1.0)
        np.testing.assert_allclose(radii, 27.5 / PITCH_MPP, rtol=1e-3)
        # ... and on the tissue: the H&E under the drawn spots is stained, the glass at the left edge is grey
        on_tissue = _saturation(hires, centres) > 15
        assert on_tissue.mean() >= 0.9
    glass = _saturation(hires, np.array([[20.0, 1000.0], [25.0, 1300.0]]))
    assert (glass < 15).all()


def test_uns_spatial_for_several_sections_and_never_over_the_users(synthetic_sdata):
    import matplotlib.pyplot as plt
    import scanpy as sc

    sdata = light_copy(synthetic_sdata)
    adata = sdata["table"]
    _write_scanpy_spatial(sdata, "table")
    slide = sg.io.validate(sdata)
    assert sorted(adata.uns["spatial"]) == sorted(slide.sections)
    for code, section in enumerate(slide.sections):
        sub = adata[adata.obs[Keys.SECTION] == section]
        ax = sc.pl.spatial(sub, color="cell_type", library_id=section, show=False)
        ax = ax[0] if isinstance(ax, list) else ax
        centres, _ = _circles(ax, sub.n_obs)
        plt.close("all")
        img = slide.images[section]
        level = int(np.argmin([abs(max(img.level_shape(lv)) - 2000) for lv in range(img.n_levels)]))
        expected = img.um_to_px(slide.xy_um[slide.unit_section == code], level=level)
        np.testing.assert_allclose(centres, expected, atol=0.51)  # scanpy puts pixel centres at integers
    # the package's own entry is refreshed; a user's uns["spatial"] is never touched
    mine = {"lib": {"images": {"hires": np.zeros((4, 4, 3), np.uint8)}, "scalefactors": {"tissue_hires_scalef": 1.0}}}
    adata.uns["spatial"] = mine
    _write_scanpy_spatial(sdata, "table")
    assert adata.uns["spatial"] is mine and list(mine) == ["lib"]


# ---------------------------------------------------------------------------------------------
# 3. patch embeddings from sopa / LazySlide pooled onto the hierarchy
# ---------------------------------------------------------------------------------------------
SIDE = 16.0  # patch side, microns (32 px at the synthetic 0.5 µm/px)


def _grid(lo=-300.0, hi=500.0, side=SIDE):
    x0, y0 = np.meshgrid(np.arange(lo, hi, side), np.arange(lo, hi, side))
    return np.stack([x0.ravel(), y0.ravel(), x0.ravel() + side, y0.ravel() + side], axis=1)


def _embedding(boxes_um, shift=0.0):
    """A known function of the patch centre (microns): linear, and not."""
    cx, cy = (boxes_um[:, 0] + boxes_um[:, 2]) / 2, (boxes_um[:, 1] + boxes_um[:, 3]) / 2
    return np.stack([cx + shift, cy, np.sin(cx / 40.0) * np.cos(cy / 25.0)], axis=1)


def _brute_force(centers, fov, boxes_um, emb, weighting):
    """The pooled value from first principles: shapely polygon overlaps (area) or centres in the window."""
    patches = shapely.box(*boxes_um.T)
    mid = (boxes_um[:, :2] + boxes_um[:, 2:]) / 2
    out = np.zeros((len(centers), emb.shape[1]))
    for i, (x, y) in enumerate(centers):
        lo, hi = np.array([x - fov / 2, y - fov / 2]), np.array([x + fov / 2, y + fov / 2])
        if weighting == "area":
            w = shapely.area(shapely.intersection(patches, shapely.box(*lo, *hi)))
        else:
            w = np.all((mid >= lo) & (mid < hi), axis=1).astype(float)
        out[i] = (w[:, None] * emb).sum(0) / w.sum()
    return out


def _check_pooled(sdata, key, truth, weighting):
    hier = sg.pp.get_hierarchy(sdata)
    feats = sg.pp.get_features(sdata, key=key)
    slide = sg.io.validate(sdata)
    assert set(feats) == set(hier.levels)
    for name, level in hier.levels.items():
        for code, section in enumerate(slide.sections):
            rows = np.flatnonzero(np.asarray(level.section) == code)
            boxes_um, emb = truth[section]
            expected = _brute_force(level.centers_um[rows], level.fov_um, boxes_um, emb, weighting)
            np.testing.assert_allclose(feats[name][rows], expected, rtol=1e-5, atol=1e-4, err_msg=f"{name} {section}")
            # a linear embedding averages to near the node centre (within half a patch) where patches cover the view
            inside = np.all(
                (level.centers_um[rows] - level.fov_um / 2 >= boxes_um[:, :2].min(0))
                & (level.centers_um[rows] + level.fov_um / 2 <= boxes_um[:, 2:].max(0)),
                axis=1,
            )
            if name != "macro":  # 500 µm views reach past the patch grids
                assert inside.all()
            err = np.abs(feats[name][rows][inside, 1] - level.centers_um[rows][inside, 1])  # y (x may be shifted)
            assert (err <= SIDE / 2).all()


def test_patch_features_sopa_layout_two_sections(synthetic_sdata, caplog):
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Scale

    sdata = light_copy(synthetic_sdata)
    slide = sg.io.validate(sdata)
    rng = np.random.default_rng(0)
    truth, patches, tables = {}, {}, {}
    for shift, section in enumerate(slide.sections):
        mpp = slide.images[section].um_per_px
        boxes_um = _grid()
        emb = _embedding(boxes_um, shift=100.0 * shift)
        truth[section] = (boxes_um, emb)
        # sopa: patches in the image's pixels, carrying the image's transformation; table rows in another order
        gdf = gpd.GeoDataFrame(geometry=shapely.box(*(boxes_um / mpp).T), index=np.arange(len(boxes_um)) + 1000)
        patches[section] = f"{section}_embeddings_patches"
        sdata.shapes[patches[section]] = ShapesModel.parse(
            gdf, transformations={section: Scale([mpp, mpp], axes=("x", "y"))}
        )
        order = rng.permutation(len(boxes_um))
        table = ad.AnnData(emb[order].astype(np.float32))
        table.obs["region"] = pd.Categorical([patches[section]] * len(order))
        table.obs["instance"] = gdf.index.to_numpy()[order]
        tables[section] = f"{section}_resnet_embeddings"
        sdata.tables[tables[section]] = TableModel.parse(
            table, region=patches[section], region_key="region", instance_key="instance"
        )
    key = sg.pp.patch_features(sdata, patches=patches, embeddings=tables, name="resnet50")
    assert key.id == "precomputed-resnet50__patches__micro32_meso150_macro500__raw"
    _check_pooled(sdata, key, truth, "area")
    # cached like image features: a second call does no work, overwrite=True recomputes
    before = sg.pp.get_features(sdata, key=key)["meso"]
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        assert sg.pp.patch_features(sdata, patches=patches, embeddings=tables, name="resnet50") == key
    assert "found in the table cache" in caplog.text
    assert sg.pp.get_features(sdata, key=key)["meso"] is before
    # centre-in-window weighting, its own cache entry
    centre = sg.pp.patch_features(sdata, patches=patches, embeddings=tables, name="resnet50", weighting="centre")
    assert centre.method == "patches-centre" and centre != key
    _check_pooled(sdata, centre, truth, "centre")
    # one element for two sections without a hint: refused with the way out
    with pytest.raises(ValueError, match="which section"):
        sg.pp.patch_features(
            sdata,
            patches=gpd.GeoDataFrame(geometry=shapely.box(*_grid().T)),
            embeddings=ad.AnnData(np.zeros((len(_grid()), 2), np.float32)),
            coordinates="microns",
        )


def test_patch_features_lazyslide_layout_and_uncovered_nodes(caplog):
    from spatialdata.models import ShapesModel, TableModel

    sdata = sg.datasets.synthetic(80, n_genes=20, seed=1)
    section = sg.io.validate(sdata).sections[0]
    mpp = sg.io.validate(sdata).images[section].um_per_px
    # LazySlide / wsidata: "tiles" with tile_id / x / y in level-0 pixels (Identity to "global"), and a
    # "{model}_tiles" table indexed by str(tile_id), annotating "tiles" through obs["library_id"]
    boxes_um = _grid(-100.0, 300.0)
    xy_px = boxes_um[:, :2] / mpp
    w = SIDE / mpp
    tiles = gpd.GeoDataFrame(
        {"tile_id": np.arange(len(xy_px)), "x": xy_px[:, 0], "y": xy_px[:, 1]},
        geometry=[shapely.box(x, y, x + w, y + w) for x, y in xy_px],
    )
    sdata.shapes["tiles"] = ShapesModel.parse(tiles)
    emb = _embedding(boxes_um)
    obs = pd.DataFrame({"tile_id": tiles["tile_id"].to_numpy(), "library_id": pd.Categorical(["tiles"] * len(tiles))})
    obs.index = obs["tile_id"].astype(str)
    feature_table = ad.AnnData(emb[::-1].copy(), obs=obs.iloc[::-1].copy())
    sdata.tables["uni_tiles"] = TableModel.parse(
        feature_table, region="tiles", region_key="library_id", instance_key="tile_id"
    )
    with pytest.raises(ValueError, match="coordinates='pixels'"):
        sg.pp.patch_features(sdata, patches="tiles", embeddings="uni_tiles")  # "global" is not the section's
    key = sg.pp.patch_features(sdata, patches="tiles", embeddings="uni_tiles", coordinates="pixels")
    assert key.encoder == "precomputed-uni_tiles"
    _check_pooled(sdata, key, {section: (boxes_um, emb)}, "area")

    # patches over part of the section only: nodes no patch reaches take the nearest patch's embedding
    part = boxes_um[(boxes_um[:, 2] <= 60.0) & (boxes_um[:, 0] >= 0.0) & (boxes_um[:, 1] >= 0.0)]
    gdf = gpd.GeoDataFrame(geometry=shapely.box(*part.T))
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        key = sg.pp.patch_features(
            sdata, patches=gdf, embeddings=ad.AnnData(_embedding(part)), coordinates="microns", name="part"
        )
    assert "overlap no patch" in caplog.text
    micro = sg.pp.get_hierarchy(sdata).levels["micro"]
    feats = sg.pp.get_features(sdata, key=key)["micro"]
    far = micro.centers_um[:, 0] - micro.fov_um / 2 >= 60.0
    assert far.any()
    mid = (part[:, :2] + part[:, 2:]) / 2
    nearest = np.argmin(((micro.centers_um[far][:, None] - mid[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(feats[far], _embedding(part)[nearest], rtol=1e-5)
