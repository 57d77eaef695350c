"""Nuclei from the H&E of spot data (sigmma_sc.pp.segment_nuclei) and the spot micro level."""

from __future__ import annotations

import numpy as np
import pytest

import sigmma_sc as sg
from sigmma_sc._constants import Keys
from sigmma_sc.pp._nuclei import hematoxylin, load_nuclei, measure_labels, segment_tile


@pytest.fixture(scope="module")
def c2():
    bar = sg.settings.progress_bar
    sg.settings.progress_bar = False
    sdata = sg.datasets.her2st(sections=["C2"])
    sg.pp.segment_nuclei(sdata)
    yield sdata
    sg.settings.progress_bar = bar


def test_nuclei_per_spot_are_tens(c2):
    slide = sg.io.validate(c2)
    gdf = c2.shapes["C2_nuclei"]
    for col in (Keys.NUCLEUS_AREA, Keys.NUCLEUS_ECCENTRICITY, Keys.NUCLEUS_HEMATOXYLIN, Keys.NUCLEUS_SPOT, "radius"):
        assert col in gdf.columns
    per_spot = np.bincount(gdf[Keys.NUCLEUS_SPOT].to_numpy(), minlength=slide.n_units)
    # A 100 um ST spot over breast tissue covers tens of nuclei.
    assert 10 <= np.median(per_spot) <= 100
    assert np.mean(per_spot > 0) > 0.95
    area = gdf[Keys.NUCLEUS_AREA].to_numpy()
    assert 20 <= np.median(area) <= 100  # nuclei are ~5-11 um across
    # every nucleus lies in its spot's circle
    xy = np.column_stack([gdf.geometry.x, gdf.geometry.y])
    spot = gdf[Keys.NUCLEUS_SPOT].to_numpy()
    assert (np.linalg.norm(xy - slide.xy_um[spot], axis=1) <= slide.unit_diameter_um / 2 + 1e-6).all()
    assert (gdf[Keys.NUCLEUS_UNIT].to_numpy() == np.asarray(slide.table.obs_names)[spot]).all()
    # microns, Identity to the section's coordinate system (like the spots)
    from spatialdata.transformations import Identity, get_transformation

    assert isinstance(get_transformation(gdf, to_coordinate_system="C2"), Identity)


def test_nuclei_sit_on_hematoxylin_dark_pixels(c2):
    slide = sg.io.validate(c2)
    img = slide.images["C2"]
    nuc = load_nuclei(slide)
    rng = np.random.default_rng(0)
    sample = rng.choice(len(nuc["xy_um"]), 1500, replace=False)

    def h_at(xy_um):
        cr = np.rint(img.um_to_px(xy_um)).astype(int)
        return np.array([hematoxylin(img.read(r, r + 1, c, c + 1))[0, 0] for c, r in cr])

    h_nuc = h_at(nuc["xy_um"][sample])
    # random points inside the spots (tissue), same number
    spots = rng.integers(0, slide.n_units, 1500)
    ang, rad = rng.uniform(0, 2 * np.pi, 1500), 50 * np.sqrt(rng.uniform(0, 1, 1500))
    rand = slide.xy_um[spots] + np.column_stack([np.cos(ang), np.sin(ang)]) * rad[:, None]
    h_rand = h_at(rand)
    assert h_nuc.mean() > 1.5 * h_rand.mean()
    assert np.median(h_nuc) > np.quantile(h_rand, 0.75)


def test_segmenter_hook_replaces_the_default(c2):
    calls = []

    def one_square(rgb):
        calls.append(rgb.shape)
        lab = np.zeros(rgb.shape[:2], np.int32)
        r, c = rgb.shape[0] // 2, rgb.shape[1] // 2
        lab[r - 5 : r + 5, c - 5 : c + 5] = 1  # 100 px at 0.688 um/px = 47 um2
        return lab

    slide = sg.io.validate(c2)
    default = c2.shapes["C2_nuclei"]
    sg.pp.segment_nuclei(c2, segmenter=one_square)
    gdf = c2.shapes["C2_nuclei"]
    assert len(calls) == slide.n_units
    assert len(gdf) == slide.n_units
    np.testing.assert_allclose(gdf[Keys.NUCLEUS_AREA], 100 * 0.688**2, rtol=1e-4)
    # centred on the spot (the window is centred on the rounded spot pixel)
    xy = np.column_stack([gdf.geometry.x, gdf.geometry.y])
    assert np.abs(xy - slide.xy_um[gdf[Keys.NUCLEUS_SPOT].to_numpy()]).max() < 2.0
    with pytest.raises(ValueError, match="integer label image"):
        sg.pp.segment_nuclei(c2, segmenter=lambda rgb: np.zeros((3, 3)))
    c2.shapes["C2_nuclei"] = default  # the default nuclei, for the other tests


def test_spot_hierarchy_micro_level_from_nuclei(c2, tmp_path):
    import spatialdata as sd

    h = sg.pp.build_hierarchy(c2)
    micro, meso = h.levels["micro"], h.levels["meso"]
    assert list(h.levels) == ["micro", "meso", "macro"] and h.unit_level == "meso"
    assert micro.n_nodes == len(c2.shapes["C2_nuclei"]) and micro.members is None
    # intra-spot Delaunay: edges only between nuclei of one spot, nearly all nuclei connected
    e = micro.edges
    assert (micro.parent[e[0]] == micro.parent[e[1]]).all()
    assert np.mean(np.bincount(e[0], minlength=micro.n_nodes) > 0) > 0.95
    assert micro.fov_um == pytest.approx(32.0)
    # nuclei means per spot
    area = c2.shapes["C2_nuclei"][Keys.NUCLEUS_AREA].to_numpy()
    spot_area = h.children_mean("micro", area)
    assert spot_area.shape == (meso.n_nodes,) and spot_area.max() > 0
    # nuclei and hierarchy survive write / read_zarr (images left out: slow to write, not needed)
    sd.SpatialData(shapes=dict(c2.shapes), tables={"table": c2["table"]}).write(tmp_path / "c2.zarr")
    back = sd.read_zarr(tmp_path / "c2.zarr")
    h2 = sg.pp.get_hierarchy(back)
    for name, lv in h.levels.items():
        lv2 = h2.levels[name]
        np.testing.assert_array_equal(lv.edges, lv2.edges)
        np.testing.assert_allclose(lv.centers_um, lv2.centers_um)
        assert (lv.parent is None and lv2.parent is None) or np.array_equal(lv.parent, lv2.parent)
    # rebuilding from the stored nuclei needs no image and gives the same micro level
    h3 = sg.pp.build_hierarchy(back)
    np.testing.assert_array_equal(h3.levels["micro"].edges, micro.edges)
    np.testing.assert_allclose(h3.levels["micro"].centers_um, micro.centers_um)


def test_segment_tile_splits_touching_nuclei():
    # two touching discs of radius 6 um at 0.5 um/px, plus a speck
    yy, xx = np.mgrid[:80, :80]
    h = np.zeros((80, 80), np.float32)
    h[(yy - 40) ** 2 + (xx - 28) ** 2 <= 12**2] = 0.2
    h[(yy - 40) ** 2 + (xx - 52) ** 2 <= 12**2] = 0.2
    h[5, 5] = 0.3
    lab = segment_tile(h, um_per_px=0.5, threshold=0.1)
    m = measure_labels(lab, h)
    assert len(m["area_px"]) == 2
    np.testing.assert_allclose(sorted(m["col"]), [28, 52], atol=1.5)
    assert (m["eccentricity"] < 0.6).all()


def test_measure_labels_matches_skimage():
    from skimage.measure import regionprops

    rng = np.random.default_rng(0)
    lab = np.zeros((40, 40), np.int32)
    lab[2:8, 3:20] = 1
    lab[20:35, 20:26] = 4
    lab[30, 2] = 2
    h = rng.uniform(0, 1, (40, 40))
    m = measure_labels(lab, h)
    props = regionprops(lab, intensity_image=h)
    np.testing.assert_allclose(m["area_px"], [p.area for p in props])
    np.testing.assert_allclose(m["eccentricity"], [p.eccentricity for p in props], atol=0.02)
    np.testing.assert_allclose(m["hematoxylin"], [p.intensity_mean for p in props])
    np.testing.assert_allclose(np.c_[m["row"], m["col"]], [p.centroid for p in props])


def test_segment_nuclei_refuses_cell_data():
    sdata = sg.datasets.xenium_lung()
    with pytest.raises(ValueError, match="spot data"):
        sg.pp.segment_nuclei(sdata)
