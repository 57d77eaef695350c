"""sigmma_sc.io: validation, SectionImage reads, from_anndata, spatialdata_io-like objects."""

from __future__ import annotations

import copy

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, Identity, Scale, get_transformation, set_transformation

import sigmma_sc as sg
from sigmma_sc._constants import HER2ST_MPP, VISIUM_SPOT_DIAMETER_UM, Keys

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------
def _adata(n=40, g=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, (n, g)).astype(np.float32)
    x[:, 0] += 1  # no empty unit
    x[0] += 1  # no empty gene
    a = ad.AnnData(x)
    a.obs_names = [f"bc{i}" for i in range(n)]
    a.var_names = [f"gene{i}" for i in range(g)]
    a.obs["batch"] = "a"
    a.obsm["spatial"] = rng.uniform(4, 90, (n, 2))  # (col, row) pixel-index coordinates
    return a


def _image(h=100, w=120, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _small(**kw):
    a = _adata()
    return sg.io.from_anndata(a, _image(), mpp=0.5, spot_diameter=55.0, **kw), a


def _snapshot(sdata):
    snap = {"images": {}, "shapes": {}, "tables": {}}
    for k, el in sdata.images.items():
        levels = sg.io.image_levels(el)
        snap["images"][k] = (
            [np.asarray(lv.data).copy() for lv in levels],
            [lv.dtype for lv in levels],
            repr(get_transformation(el, get_all=True)),
        )
    for k, el in sdata.shapes.items():
        snap["shapes"][k] = (el.copy(deep=True), repr(get_transformation(el, get_all=True)))
    for k, t in sdata.tables.items():
        snap["tables"][k] = {
            "X": t.X.copy(),
            "layers": {n: v.copy() for n, v in t.layers.items()},
            "obs": t.obs.copy(deep=True),
            "var": t.var.copy(deep=True),
            "obsm": {n: np.array(v, copy=True) for n, v in t.obsm.items()},
            "uns": copy.deepcopy(dict(t.uns)),
            "ids": (id(t.X), id(t.obs)),
        }
    return snap


def _same_matrix(a, b):
    a = a.toarray() if sparse.issparse(a) else np.asarray(a)
    b = b.toarray() if sparse.issparse(b) else np.asarray(b)
    return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def _assert_unchanged(before, sdata):
    after = _snapshot(sdata)
    assert before["images"].keys() == after["images"].keys()
    for k, (lv0, dt0, tr0) in before["images"].items():
        lv1, dt1, tr1 = after["images"][k]
        assert dt0 == dt1 and tr0 == tr1
        assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip(lv0, lv1))
    for k, (g0, tr0) in before["shapes"].items():
        g1, tr1 = after["shapes"][k]
        pd.testing.assert_frame_equal(pd.DataFrame(g0), pd.DataFrame(g1))
        assert tr0 == tr1
    for k, t0 in before["tables"].items():
        t1 = after["tables"][k]
        assert t0["ids"] == t1["ids"]
        assert _same_matrix(t0["X"], t1["X"])
        assert t0["layers"].keys() == t1["layers"].keys()
        assert all(_same_matrix(v, t1["layers"][n]) for n, v in t0["layers"].items())
        pd.testing.assert_frame_equal(t0["obs"], t1["obs"])
        pd.testing.assert_frame_equal(t0["var"], t1["var"])
        assert t0["obsm"].keys() == t1["obsm"].keys()
        assert all(np.array_equal(v, t1["obsm"][n]) for n, v in t0["obsm"].items())
        assert repr(t0["uns"]) == repr(t1["uns"])


def _replace_image(sdata, data, dims=("c", "y", "x"), **kw):
    name = "section0_he"
    tr = get_transformation(sdata.images[name], get_all=True)
    sdata.images[name] = Image2DModel.parse(data, dims=dims, transformations=tr, **kw)


def _set_table_X(sdata, x):
    t = sdata.tables["table"]
    t.X = x
    if Keys.COUNTS_LAYER in t.layers:
        del t.layers[Keys.COUNTS_LAYER]


# ---------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def her2st_c2():
    return sg.datasets.her2st(sections=["C2", "C3"])


def test_her2st_validates(her2st_c2):
    before = _snapshot_light(her2st_c2)
    slide = sg.io.validate(her2st_c2)
    assert slide.sections == ["C2", "C3"]
    assert slide.technology == "st" and slide.unit_kind == "spot" and slide.unit_diameter_um == 100.0
    counts = slide.table.obs[Keys.SECTION].value_counts()
    assert counts["C2"] == 187 and counts["C3"] == 180
    img = slide.images["C2"]
    assert np.isclose(img.um_per_px, HER2ST_MPP)
    assert img.n_levels >= 3 and img.level_factors[0] == 1.0
    assert img.best_level(HER2ST_MPP) == 0
    assert img.best_level(4 * HER2ST_MPP) == 2
    # unit centres land inside the image, in the pixels recorded in the selection file
    rows = slide.section_units("C2")
    cr = img.um_to_px(slide.xy_um[rows])
    assert (cr[:, 0] > 0).all() and (cr[:, 0] < img.shape[1]).all()
    sel = slide.table.obs.iloc[rows]
    # the selection file's pixel_x / pixel_y (column / row pixel indices) come back from the microns
    np.testing.assert_allclose(cr[:, 0] - 0.5, sel["pixel_x"].to_numpy(float), atol=1e-6)
    np.testing.assert_allclose(cr[:, 1] - 0.5, sel["pixel_y"].to_numpy(float), atol=1e-6)
    # counts: raw integers, float32 CSR, the user's matrix untouched
    c = slide.counts()
    assert sparse.isspmatrix_csr(c) and c.dtype == np.float32
    assert np.array_equal(c.data, np.rint(c.data)) and c.sum() > 0
    assert sg.io.validate(her2st_c2, require_counts=True, allow_empty_genes=True).n_units == 367
    _assert_light_unchanged(before, her2st_c2)


def test_her2st_reads_tissue_under_spots(her2st_c2):
    slide = sg.io.validate(her2st_c2)
    img = slide.images["C2"]
    cr = img.um_to_px(slide.xy_um[slide.section_units("C2")]).astype(int)
    half = 40
    spot = np.mean([img.read(r - half, r + half, c - half, c + half).mean() for c, r in cr[:20]])
    corner = img.read(0, 2 * half, 0, 2 * half).mean()
    assert spot < corner - 10  # stained tissue is darker than the slide background


def test_her2st_expression(her2st_c2):
    slide = sg.io.validate(her2st_c2)
    genes = list(slide.table.var_names[:5])
    e = slide.expression(genes)
    c = slide.counts()
    tot = np.asarray(c.sum(axis=1)).ravel()
    ref = np.log1p(c[:, :5].toarray() / tot[:, None] * 1e4)
    np.testing.assert_allclose(e, ref, rtol=1e-5)
    with pytest.raises(KeyError, match="not in table"):
        slide.expression(["NOT_A_GENE"])


def test_real_single_section_datasets():
    xen = sg.datasets.xenium_lung()
    slide = sg.io.validate(xen)
    assert slide.technology == "xenium" and slide.unit_kind == "cell" and slide.n_units == 200
    (img,) = slide.images.values()
    assert np.isclose(img.um_per_px, 2.125)
    # validate's empty-gene rule on real data: some panel genes are never detected in these 200 cells
    n_empty = int((np.asarray(slide.counts().sum(axis=0)).ravel() == 0).sum())
    if n_empty:
        with pytest.raises(ValueError, match=rf"{n_empty} of {slide.table.n_vars} gene.*filter_genes"):
            sg.io.validate(xen, require_counts=True)
        assert sg.io.validate(xen, require_counts=True, allow_empty_genes=True).n_units == 200
    else:  # a loader that already drops undetected genes passes the counts checks
        assert sg.io.validate(xen, require_counts=True).counts().shape == (200, slide.table.n_vars)

    brain = sg.datasets.visium_mouse_brain()
    slide = sg.io.validate(brain)
    assert slide.technology == "visium" and slide.unit_kind == "spot" and slide.log_normalized
    genes = list(slide.table.var_names[:3])
    x = slide.table[:, genes].X
    np.testing.assert_allclose(slide.expression(genes), x.toarray() if sparse.issparse(x) else x, rtol=1e-6)
    with pytest.raises(ValueError, match="no layers"):
        slide.counts()

    kidney = sg.datasets.visium_hd_kidney(crop=True)
    before = _snapshot_light(kidney)
    slide = sg.io.validate(kidney)
    n = kidney.tables["table"].n_obs
    assert slide.technology == "visium_hd" and slide.unit_diameter_um == 16.0 and slide.n_units == n > 5000
    (img,) = slide.images.values()
    assert np.isclose(img.um_per_px, 2.007, atol=1e-3)
    n_empty = int((np.asarray(slide.counts().sum(axis=1)).ravel() == 0).sum())
    if n_empty:
        with pytest.raises(ValueError, match=rf"{n_empty} of {n} unit.*filter_cells"):
            sg.io.validate(kidney, require_counts=True)
    else:
        assert sg.io.validate(kidney, require_counts=True, allow_empty_genes=True, min_units=n).n_units == n
    _assert_light_unchanged(before, kidney)


def _snapshot_light(sdata):
    t = sdata.tables["table"]
    return (id(t.X), t.X.copy(), t.obs.copy(), np.array(t.obsm[Keys.SPATIAL]), copy.deepcopy(dict(t.uns)))


def _assert_light_unchanged(before, sdata):
    t = sdata.tables["table"]
    assert id(t.X) == before[0] and _same_matrix(t.X, before[1])
    pd.testing.assert_frame_equal(t.obs, before[2])
    assert np.array_equal(t.obsm[Keys.SPATIAL], before[3])
    assert repr(dict(t.uns)) == repr(before[4])


# ---------------------------------------------------------------------------------------------
# from_anndata
# ---------------------------------------------------------------------------------------------
def test_from_anndata_roundtrip():
    a = _adata()
    a_before = a.copy()
    sdata = sg.io.from_anndata(a, _image(), mpp=0.5, spot_diameter=55.0, section="s1")
    # the input is untouched
    assert np.array_equal(a.X, a_before.X) and list(a.obs_names) == list(a_before.obs_names)
    assert np.array_equal(a.obsm["spatial"], a_before.obsm["spatial"])
    slide = sg.io.validate(sdata, require_counts=True)
    assert slide.sections == ["s1"] and slide.technology == "custom" and slide.unit_kind == "spot"
    assert slide.unit_diameter_um == 55.0 and not slide.log_normalized
    img = slide.images["s1"]
    assert np.isclose(img.um_per_px, 0.5)
    # pixel index -> microns -> pixel index (pixel centres at integers in the input convention)
    np.testing.assert_allclose(slide.xy_um, (a.obsm["spatial"] + 0.5) * 0.5)
    np.testing.assert_allclose(img.um_to_px(slide.xy_um) - 0.5, a.obsm["spatial"], atol=1e-9)
    np.testing.assert_allclose(img.px_to_um(img.um_to_px(slide.xy_um)), slide.xy_um, atol=1e-9)
    # counts and names carried over
    assert np.array_equal(slide.counts().toarray(), a.X)
    assert list(slide.table.obs[Keys.BARCODE]) == list(a.obs_names)
    assert "batch" in slide.table.obs
    # the pixel under a unit is the pixel of the input image
    c, r = a.obsm["spatial"][3].round().astype(int)
    assert np.array_equal(img.read(r, r + 1, c, c + 1)[0, 0], _image()[r, c])


def test_from_anndata_cell_and_log_and_errors():
    a = _adata()
    a.X = np.log1p(a.X)
    sdata = sg.io.from_anndata(a, _image(), mpp=0.5, cell_diameter=10.0)
    slide = sg.io.validate(sdata, require_counts=True)
    assert slide.unit_kind == "cell" and slide.log_normalized
    np.testing.assert_allclose(slide.expression(["gene2"])[:, 0], a.X[:, 2], rtol=1e-6)
    with pytest.raises(ValueError, match="exactly one of spot_diameter"):
        sg.io.from_anndata(a, _image(), mpp=0.5)
    with pytest.raises(ValueError, match="exactly one of spot_diameter"):
        sg.io.from_anndata(a, _image(), mpp=0.5, spot_diameter=55.0, cell_diameter=10.0)
    with pytest.raises(ValueError, match="mpp"):
        sg.io.from_anndata(a, _image(), mpp=-1.0, spot_diameter=55.0)
    with pytest.raises(KeyError, match="obsm"):
        sg.io.from_anndata(a, _image(), mpp=0.5, spot_diameter=55.0, spatial_key="xy")
    with pytest.raises(ValueError, match="3 colour channels"):
        sg.io.from_anndata(a, _image()[..., :2], mpp=0.5, spot_diameter=55.0)
    # channel-first float image in [0, 1] is converted into the new object
    img = _image()
    sdata = sg.io.from_anndata(_adata(), np.moveaxis(img / 255.0, -1, 0), mpp=0.5, spot_diameter=55.0)
    assert np.array_equal(sg.io.validate(sdata).images["section0"].read(0, 100, 0, 120), img)


# ---------------------------------------------------------------------------------------------
# SectionImage
# ---------------------------------------------------------------------------------------------
def test_read_padding_and_levels():
    sdata, _ = _small()
    img = sg.io.validate(sdata).images["section0"]
    src = _image()
    assert img.shape == (100, 120) and img.n_levels >= 2
    w = img.read(-5, 10, 110, 130)
    assert w.shape == (15, 20, 3) and w.dtype == np.uint8
    assert (w[:5] == 255).all() and (w[:, 10:] == 255).all()
    assert np.array_equal(w[5:, :10], src[0:10, 110:120])
    assert (img.read(200, 210, 0, 10) == 255).all()  # fully outside
    assert img.read(3, 3, 0, 4).shape == (0, 4, 3)
    with pytest.raises(ValueError, match="inverted"):
        img.read(10, 5, 0, 4)
    # level 1 is the 2x pyramid level; level_array matches read
    h1, w1 = img.level_shape(1)
    lv1 = img.level_array(1).compute()
    assert lv1.shape == (h1, w1, 3) and lv1.dtype == np.uint8
    assert np.array_equal(img.read(0, h1, 0, w1, level=1), lv1)
    assert np.isclose(img.level_um_per_px(1), 1.0)
    assert img.best_level(0.9) == 0 and img.best_level(1.0) == 1 and img.best_level(100.0) == img.n_levels - 1


def test_float_and_uint16_images_converted_lazily():
    src = _image()
    for data, kind in (
        (np.moveaxis(src, -1, 0) / 255.0, "float01"),
        (np.moveaxis(src, -1, 0).astype(np.float64), "float255"),
        (np.moveaxis(src, -1, 0).astype(np.uint16) * 257, "uint16"),
        (np.moveaxis(src, -1, 0).astype(np.uint16), "uint16-small"),
    ):
        sdata, _ = _small()
        _replace_image(sdata, data, scale_factors=[2])
        before = _snapshot(sdata)
        img = sg.io.validate(sdata).images["section0"]
        got = img.read(0, 100, 0, 120)
        assert got.dtype == np.uint8
        assert np.abs(got.astype(int) - src).max() <= 1, kind
        assert img.level_array(0).dtype == np.uint8
        _assert_unchanged(before, sdata)  # the user's image keeps its dtype and values


def test_bad_images_refused():
    src = np.moveaxis(_image(), -1, 0)
    sdata, _ = _small()
    _replace_image(sdata, src[:1])
    with pytest.raises(ValueError, match="1 channel"):
        sg.io.validate(sdata)
    sdata, _ = _small()
    _replace_image(sdata, src.astype(np.float32) * 4 - 10)
    with pytest.raises(ValueError, match="neither"):
        sg.io.validate(sdata)
    sdata, _ = _small()
    _replace_image(sdata, src.astype(np.int32) * 1000)
    with pytest.raises(ValueError, match="only uint8 or uint16"):
        sg.io.validate(sdata)
    sdata, _ = _small()
    _replace_image(sdata, src.astype(np.int16) - 5)
    with pytest.raises(ValueError, match="negative"):
        sg.io.validate(sdata)


def test_rgba_alpha_dropped():
    src = np.moveaxis(_image(), -1, 0)
    sdata, _ = _small()
    rgba = np.concatenate([src, np.full_like(src[:1], 7)], axis=0)
    _replace_image(sdata, rgba, c_coords=["r", "g", "b", "a"])
    img = sg.io.validate(sdata).images["section0"]
    assert np.array_equal(img.read(0, 100, 0, 120), _image())


# ---------------------------------------------------------------------------------------------
# validation errors
# ---------------------------------------------------------------------------------------------
def test_validate_leaves_object_unchanged():
    sdata, _ = _small()
    before = _snapshot(sdata)
    slide = sg.io.validate(sdata, require_counts=True, min_units=2)
    slide.counts().data[:] = -1  # a returned matrix is a copy
    slide.expression(["gene1"])
    slide.images["section0"].read(-3, 20, -3, 20)
    _assert_unchanged(before, sdata)


def test_missing_elements():
    sdata, _ = _small()
    with pytest.raises(KeyError, match="table 'nope' not found"):
        sg.io.validate(sdata, table_key="nope")
    del sdata.images["section0_he"]
    with pytest.raises(KeyError, match="image 'section0_he' of section 'section0' not found"):
        sg.io.validate(sdata)
    slide = sg.io.validate(sdata, require_image=False)
    assert slide.images == {} and slide.xy_um.shape == (40, 2)
    sdata, _ = _small()
    del sdata.shapes["section0_spots"]
    with pytest.raises(KeyError, match="shapes element 'section0_spots'"):
        sg.io.validate(sdata)
    sdata, _ = _small()
    del sdata.tables["table"].obsm[Keys.SPATIAL]
    with pytest.raises(KeyError, match="obsm"):
        sg.io.validate(sdata)
    with pytest.raises(TypeError, match="from_anndata"):
        sg.io.validate(_adata())


def test_image_without_transformation():
    sdata, _ = _small()
    set_transformation(sdata.images["section0_he"], {"other": Identity()}, set_all=True)
    with pytest.raises(ValueError, match="no transformation to coordinate system 'section0'"):
        sg.io.validate(sdata)


def test_units_outside_image():
    sdata, _ = _small()
    sdata.tables["table"].obsm[Keys.SPATIAL][:3] += 1000.0
    with pytest.raises(ValueError, match="3 of 40 unit.*outside image 'section0_he'"):
        sg.io.validate(sdata)


@pytest.mark.parametrize(
    ("bad", "match"),
    [("nan", "NaN"), ("negative", "negative"), ("fraction", "non-integer")],
)
def test_bad_counts(bad, match):
    sdata, a = _small()
    x = a.X.copy()
    x[2, 3] = {"nan": np.nan, "negative": -2.0, "fraction": 0.5}[bad]
    _set_table_X(sdata, sparse.csr_matrix(x))
    sg.io.validate(sdata)  # counts not required: accepted
    with pytest.raises(ValueError, match=match):
        sg.io.validate(sdata, require_counts=True)
    with pytest.raises(ValueError, match=match):
        sg.io.validate(sdata).counts()


def test_log_normalized_flag_skips_integer_checks():
    sdata, a = _small()
    _set_table_X(sdata, sparse.csr_matrix(np.log1p(a.X)))
    with pytest.raises(ValueError, match="non-integer"):
        sg.io.validate(sdata, require_counts=True)
    sdata.tables["table"].uns[Keys.DATASET][Keys.LOG_NORMALIZED] = True
    slide = sg.io.validate(sdata, require_counts=True)
    assert slide.log_normalized
    np.testing.assert_allclose(slide.expression(["gene4"])[:, 0], np.log1p(a.X[:, 4]), rtol=1e-6)
    with pytest.raises(ValueError, match="no layers"):
        slide.counts()


def test_duplicated_names():
    sdata, _ = _small()
    t = sdata.tables["table"]
    names = list(t.obs_names)
    names[1] = names[0]
    t.obs_names = names
    with pytest.raises(ValueError, match="1 duplicated obs name"):
        sg.io.validate(sdata)
    sdata, _ = _small()
    t = sdata.tables["table"]
    genes = list(t.var_names)
    genes[2] = genes[5]
    t.var_names = genes
    with pytest.raises(ValueError, match="duplicated gene name"):
        sg.io.validate(sdata)


def test_empty_units_and_genes():
    sdata, a = _small()
    x = a.X.copy()
    x[[4, 7]] = 0
    _set_table_X(sdata, sparse.csr_matrix(x))
    sg.io.validate(sdata)
    with pytest.raises(ValueError, match=r"2 of 40 unit.*sc\.pp\.filter_cells"):
        sg.io.validate(sdata, require_counts=True)
    sdata, a = _small()
    x = a.X.copy()
    x[:, [1, 2, 3]] = 0
    _set_table_X(sdata, sparse.csr_matrix(x))
    with pytest.raises(ValueError, match=r"3 of 12 gene.*sc\.pp\.filter_genes"):
        sg.io.validate(sdata, require_counts=True)
    assert sg.io.validate(sdata, require_counts=True, allow_empty_genes=True).counts()[:, 1:4].nnz == 0


def test_min_units():
    sdata, _ = _small()
    assert sg.io.validate(sdata, min_units=40).n_units == 40
    with pytest.raises(ValueError, match="40 unit.*at least 64"):
        sg.io.validate(sdata, min_units=64)


def test_subset_and_sections():
    sdata, _ = _small()
    slide = sg.io.validate(sdata)
    sub = slide.subset(np.arange(40) % 2 == 0)
    assert sub.n_units == 20 and sub.xy_um.shape == (20, 2)
    np.testing.assert_array_equal(sub.xy_um, slide.xy_um[::2])
    np.testing.assert_allclose(sub.counts().toarray(), slide.counts().toarray()[::2])
    assert np.array_equal(slide.section_units("section0"), np.arange(40))


# ---------------------------------------------------------------------------------------------
# objects shaped like spatialdata_io's readers
# ---------------------------------------------------------------------------------------------
def _counts_table(n, rng):
    x = rng.poisson(2.0, (n, 6)).astype(np.float32)
    x[:, 0] += 1
    return x


def _xenium_like(*, region="cell_circles", mirror=True, n=30):
    """spatialdata_io.xenium(..., aligned H&E): shapes in microns with Scale(1/0.2125) to "global"
    (morphology pixels), DAPI morphology_focus (uint16) with Identity, the H&E with an Affine to "global"."""
    rng = np.random.default_rng(1)
    pixel_size, he_mpp = 0.2125, 0.5
    he = rng.integers(0, 256, (3, 160, 200), dtype=np.uint8)
    # H&E pixel -> microns: rotation by 30 degrees, optional mirror, 0.5 um/px, shifted
    th = np.deg2rad(30)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) * he_mpp
    if mirror:
        rot = rot @ np.diag([-1.0, 1.0])
    um_from_he = np.eye(3)
    um_from_he[:2, :2], um_from_he[:2, 2] = rot, [150.0, 20.0]
    global_from_he = np.diag([1 / pixel_size, 1 / pixel_size, 1.0]) @ um_from_he
    he_px = np.column_stack([rng.uniform(5, 195, n), rng.uniform(5, 155, n)])  # (col, row)
    cells_um = he_px @ um_from_he[:2, :2].T + um_from_he[:2, 2]
    ids = [f"cell{i:03d}" for i in range(n)]
    to_global = {"global": Scale([1 / pixel_size, 1 / pixel_size], axes=("x", "y"))}
    radius = np.full(n, 5.0)
    circles = ShapesModel.parse(cells_um, geometry=0, radius=radius, index=pd.Index(ids), transformations=to_global)
    boxes = shapely.box(cells_um[:, 0] - 4, cells_um[:, 1] - 4, cells_um[:, 0] + 4, cells_um[:, 1] + 4)
    bounds = ShapesModel.parse(gpd.GeoDataFrame(geometry=boxes, index=pd.Index(ids)), transformations=to_global)
    morph = Image2DModel.parse(
        rng.integers(0, 4000, (1, 300, 300), dtype=np.uint16),
        dims=("c", "y", "x"),
        transformations={"global": Identity()},
    )
    he_el = Image2DModel.parse(
        he,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2],
        transformations={"global": Affine(global_from_he, input_axes=("x", "y"), output_axes=("x", "y"))},
    )
    labels = Labels2DModel.parse(
        np.zeros((300, 300), np.uint32), dims=("y", "x"), transformations={"global": Identity()}
    )
    a = ad.AnnData(_counts_table(n, rng))
    a.obs_names = ids
    a.obs["cell_id"] = ids
    a.obs["cell_area"] = np.pi * 5.0**2
    a.obs["region"] = pd.Categorical([region] * n)
    a.obsm["spatial"] = cells_um
    instance = "cell_id"
    if region == "cell_labels":
        a.obs["cell_labels"] = np.arange(1, n + 1)
        instance = "cell_labels"
    table = TableModel.parse(a, region=region, region_key="region", instance_key=instance)
    shapes = {"cell_boundaries": bounds}
    if region == "cell_circles":
        shapes["cell_circles"] = circles
    sdata = SpatialData(
        images={"morphology_focus": morph, "he_image": he_el},
        labels={"cell_labels": labels},
        shapes=shapes,
        tables={"table": table},
    )
    return sdata, cells_um, he_px, he


@pytest.mark.parametrize("region", ["cell_circles", "cell_labels"])
def test_xenium_like(region):
    sdata, cells_um, he_px, he = _xenium_like(region=region)
    before = _snapshot(sdata)
    slide = sg.io.validate(sdata, require_counts=True)
    sec = slide.sections[0]
    assert slide.technology == "xenium" and slide.unit_kind == "cell"
    assert np.isclose(slide.unit_diameter_um, 10.0)
    img = slide.images[sec]
    assert img.element == "he_image" and img.coordinate_system == "global"  # never the DAPI image
    assert np.isclose(img.um_per_px, 0.5)
    np.testing.assert_allclose(slide.xy_um, cells_um, atol=1e-6)
    np.testing.assert_allclose(img.um_to_px(slide.xy_um), he_px, atol=1e-6)
    c, r = np.floor(he_px[0]).astype(int)
    assert np.array_equal(img.read(r, r + 1, c, c + 1)[0, 0], he[:, r, c])
    _assert_unchanged(before, sdata)
    with pytest.raises(ValueError, match="1 channel"):
        sg.io.validate(sdata, image_key="morphology_focus")


def test_mirrored_rotated_affine_microns_distances():
    sdata, cells_um, _, _ = _xenium_like(mirror=True)
    img = sg.io.validate(sdata).images["cell_circles"]
    d_um = np.linalg.norm(cells_um[0] - cells_um[1])
    d_px = np.linalg.norm(img.um_to_px(cells_um[:1]) - img.um_to_px(cells_um[1:2]))
    assert np.isclose(d_px * img.um_per_px, d_um)
    assert np.linalg.det(img.px_from_um[:2, :2]) < 0  # the mirror survives


def _visium_like(*, full=True, hd=False, n=25):
    """spatialdata_io.visium / visium_hd: spots in full-resolution pixels (Identity to "global",
    Scale to "downscaled_hires"), the full image in "global", the hires image in "downscaled_hires"."""
    rng = np.random.default_rng(2)
    mpp, hires_scale = 0.8, 0.1
    dataset = "V1_test"
    full_img = rng.integers(0, 256, (3, 400, 500), dtype=np.uint8)
    px = np.column_stack([rng.uniform(40, 460, n), rng.uniform(40, 360, n)])
    if hd:
        side_um = 16.0
        half = side_um / mpp / 2
        region = f"{dataset}_square_016um"
        geoms = shapely.box(px[:, 0] - half, px[:, 1] - half, px[:, 0] + half, px[:, 1] + half)
        gdf = gpd.GeoDataFrame(geometry=geoms, index=pd.Index(np.arange(n)))
        shape_kw = {}
    else:
        region = dataset
        gdf = None
        shape_kw = {"geometry": 0, "radius": np.full(n, VISIUM_SPOT_DIAMETER_UM / mpp / 2), "index": np.arange(n)}
    trs = {
        "global": Identity(),
        "downscaled_hires": Scale([hires_scale, hires_scale], axes=("y", "x")),
        "downscaled_lowres": Scale([0.02, 0.02], axes=("y", "x")),
    }
    shapes = (
        ShapesModel.parse(gdf, transformations=trs) if hd else ShapesModel.parse(px, transformations=trs, **shape_kw)
    )
    hires = full_img[:, ::10, ::10]
    images = {
        f"{dataset}_hires_image": Image2DModel.parse(
            hires, dims=("c", "y", "x"), transformations={"downscaled_hires": Identity()}
        ),
        f"{dataset}_lowres_image": Image2DModel.parse(
            full_img[:, ::50, ::50], dims=("c", "y", "x"), transformations={"downscaled_lowres": Identity()}
        ),
    }
    if full:
        images[f"{dataset}_full_image"] = Image2DModel.parse(
            full_img, dims=("c", "y", "x"), scale_factors=[2, 2], transformations={"global": Identity()}
        )
    a = ad.AnnData(_counts_table(n, rng))
    a.obs_names = [f"AAAC-{i}" for i in range(n)]
    a.obs["spot_id"] = np.arange(n)
    a.obs["region"] = pd.Categorical([region] * n)
    a.obsm["spatial"] = px
    table = TableModel.parse(a, region=region, region_key="region", instance_key="spot_id")
    key = "square_016um" if hd else "table"
    sdata = SpatialData(images=images, shapes={region: shapes}, tables={key: table})
    return sdata, px, mpp, region, key


def test_visium_like_full_image():
    sdata, px, mpp, region, key = _visium_like()
    before = _snapshot(sdata)
    slide = sg.io.validate(sdata, require_counts=True)
    assert slide.sections == [region] and slide.technology == "visium" and slide.unit_kind == "spot"
    assert slide.unit_diameter_um == VISIUM_SPOT_DIAMETER_UM
    img = slide.images[region]
    assert img.element.endswith("_full_image") and img.coordinate_system == "global"
    assert np.isclose(img.um_per_px, mpp)
    np.testing.assert_allclose(slide.xy_um, px * mpp)
    np.testing.assert_allclose(img.um_to_px(slide.xy_um), px)
    _assert_unchanged(before, sdata)
    # mpp= overrides the 55 um rule
    slide2 = sg.io.validate(sdata, mpp=2 * mpp)
    np.testing.assert_allclose(slide2.xy_um, px * 2 * mpp)


def test_visium_like_hires_only():
    sdata, px, mpp, region, _ = _visium_like(full=False)
    slide = sg.io.validate(sdata)
    img = slide.images[region]
    assert img.element.endswith("_hires_image") and img.coordinate_system == "downscaled_hires"
    assert np.isclose(img.um_per_px, mpp * 10)
    np.testing.assert_allclose(slide.xy_um, px * mpp)
    np.testing.assert_allclose(img.um_to_px(slide.xy_um), px * 0.1)
    slide_low = sg.io.validate(sdata, image_key=f"{region}_lowres_image")
    assert np.isclose(slide_low.images[region].um_per_px, mpp * 50)
    with pytest.raises(ValueError, match="no transformation"):
        sg.io.validate(sdata, image_key=f"{region}_lowres_image", coordinate_system="downscaled_hires")


def test_visium_hd_like():
    sdata, px, mpp, region, key = _visium_like(hd=True)
    with pytest.raises(KeyError, match="table 'table' not found"):
        sg.io.validate(sdata)
    slide = sg.io.validate(sdata, table_key=key, require_counts=True)
    assert slide.technology == "visium_hd" and slide.unit_kind == "cell" and slide.unit_diameter_um == 16.0
    assert np.isclose(slide.images[region].um_per_px, mpp)
    np.testing.assert_allclose(slide.xy_um, px * mpp, rtol=1e-9)


def test_foreign_without_pixel_size_asks_for_mpp():
    sdata, px, mpp, region, key = _visium_like()
    renamed = SpatialData(
        images={"he": sdata.images[f"{region}_full_image"]},
        shapes={"units": sdata.shapes[region]},
        tables={},
    )
    t = sdata.tables[key].copy()
    t.obs["region"] = pd.Categorical(["units"] * t.n_obs)
    t.uns["spatialdata_attrs"]["region"] = "units"
    renamed.tables["table"] = t
    with pytest.raises(ValueError, match="Pass mpp="):
        sg.io.validate(renamed)
    slide = sg.io.validate(renamed, mpp=mpp)
    assert slide.technology == "custom" and slide.unit_kind == "spot"
    np.testing.assert_allclose(slide.xy_um, px * mpp)
    np.testing.assert_allclose(slide.unit_diameter_um, VISIUM_SPOT_DIAMETER_UM)


def test_section_image_from_plain_array_and_dask_path(monkeypatch):
    import dask.array as da
    import xarray as xr

    from sigmma_sc.io import _image as image_mod

    src = _image(90, 70)
    m = np.diag([2.0, 2.0, 1.0])  # 0.5 um / px
    img = sg.io.SectionImage.from_element(
        xr.DataArray(src, dims=("y", "x", "c")), section="s", name="arr", coordinate_system="s", px_from_um=m
    )
    assert img.shape == (90, 70) and img.n_levels == 1 and np.isclose(img.um_per_px, 0.5)
    assert np.array_equal(img.read(-2, 50, 10, 80)[2:, :60], src[:50, 10:70])
    # a lazily computed image (no numpy array behind it) larger than the cache limit: dask reads per window
    monkeypatch.setattr(image_mod, "_CACHE_MAX_BYTES", 0)
    lazy = Image2DModel.parse(da.from_array(src, chunks=(32, 32, 3)) + np.uint8(0), dims=("y", "x", "c"))
    img = sg.io.SectionImage.from_element(lazy, section="s", name="lazy", coordinate_system="s", px_from_um=m)
    assert img._numpy_level(0) is None
    assert np.array_equal(img.read(-2, 50, 10, 80)[2:, :60], src[:50, 10:70])
    # windows across chunk borders come from the shared chunk cache; chunks too large to cache: per window
    assert np.array_equal(img.read(31, 65, 30, 33), src[31:65, 30:33])
    assert any(isinstance(k, tuple) and k[1:] == (1, 0) for k in image_mod._shared_cache)
    monkeypatch.setattr(image_mod, "_CHUNK_MAX_BYTES", 0)
    assert image_mod._read_chunks(img.level_array(0), 0, 5, 0, 5) is None
    assert np.array_equal(img.read(31, 95, -1, 33)[:59, 1:], src[31:90, 0:33])
    with pytest.raises(ValueError, match="singular"):
        sg.io.SectionImage.from_element(
            lazy, section="s", name="lazy", coordinate_system="s", px_from_um=np.zeros((3, 3))
        )


def test_read_rgb_pyramid_cache_is_lazy_and_decoded_once(tmp_path, monkeypatch):
    from PIL import Image

    from sigmma_sc.io import _build

    src = _image(300, 200)
    path = tmp_path / "he.png"
    Image.fromarray(src).save(path)
    in_memory = sg.io.read_rgb_pyramid(path, cache=False)
    assert all(isinstance(lv, np.ndarray) for lv in in_memory) and np.array_equal(in_memory[0], src)
    lazy = sg.io.read_rgb_pyramid(path)
    assert all(hasattr(lv, "dask") for lv in lazy)  # no pixels held in memory
    assert [lv.shape for lv in lazy] == [lv.shape for lv in in_memory]
    assert all(np.array_equal(a.compute(), b) for a, b in zip(lazy, in_memory))
    stores = list((sg.settings.cachedir / "images").glob("he-*.zarr"))
    assert len(stores) == 1
    # the next load reads the store and decodes nothing
    monkeypatch.setattr(_build, "_open_rgb", lambda p: pytest.fail("decoded again"))
    assert np.array_equal(sg.io.read_rgb_pyramid(path)[1].compute(), in_memory[1])
    monkeypatch.undo()
    # an interrupted write (no completion mark) is rebuilt; a changed file gets its own store
    (stores[0] / _build._STORE_DONE).unlink()
    assert np.array_equal(sg.io.read_rgb_pyramid(path)[0].compute(), src)
    Image.fromarray(src[::-1].copy()).save(path)
    assert np.array_equal(sg.io.read_rgb_pyramid(path)[0].compute(), src[::-1])
    assert len(list((sg.settings.cachedir / "images").glob("he-*.zarr"))) == 2


def test_io_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, sigmma_sc.io; "
        "heavy = [m for m in ('spatialdata', 'dask', 'xarray', 'torch', 'scanpy', 'squidpy', 'anndata') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.filterwarnings("ignore:Call to deprecated class Scaler:DeprecationWarning")  # ome_zarr, on write
@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")
def test_validate_after_zarr_roundtrip(tmp_path):
    import spatialdata as sd

    sdata, a = _small()
    sdata.write(tmp_path / "s.zarr")
    back = sd.read_zarr(tmp_path / "s.zarr")
    slide = sg.io.validate(back, require_counts=True)
    img = slide.images["section0"]
    assert np.array_equal(img.read(-1, 20, 0, 30)[1:], _image()[:20, :30])
    np.testing.assert_allclose(img.um_to_px(slide.xy_um) - 0.5, a.obsm["spatial"], atol=1e-9)
