"""Unit graphs, niches and the micro / meso / macro hierarchy (sigmma_sc.pp)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import sigmma_sc as sg
from sigmma_sc._constants import Defaults, Keys, Levels
from sigmma_sc.pp import Hierarchy, Level
from sigmma_sc.pp._graphs import graph_edges, grouped_delaunay_edges, section_graphs
from sigmma_sc.pp._hierarchy import cell_hierarchy, grid_adjacency, ring_members, spot_hierarchy, square_niches


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    bar = sg.settings.progress_bar
    sg.settings.progress_bar = False
    yield
    sg.settings.progress_bar = bar


@pytest.fixture(scope="module")
def her2st():
    return sg.datasets.her2st(sections=["C2", "C3"])


def _assert_consistent(h: Hierarchy, n_units: int) -> None:
    """Parents valid, edges inside sections, members of the right shape: checked independently of h.check()."""
    names = h.level_names
    assert h.n_units == n_units
    for i, name in enumerate(names):
        lv = h.levels[name]
        e = lv.edges
        assert e.dtype == np.int64 and e.shape[0] == 2
        if e.size:
            assert (lv.section[e[0]] == lv.section[e[1]]).all()
            assert not (e[0] == e[1]).any()
            # both directions
            fwd = set(map(tuple, e.T.tolist()))
            assert all((b, a) in fwd for a, b in fwd)
        if i + 1 < len(names):
            up = h.levels[names[i + 1]]
            assert lv.parent is not None and lv.parent.shape == (lv.n_nodes,)
            assert (lv.parent >= 0).all() and (lv.parent < up.n_nodes).all()
            assert (up.section[lv.parent] == lv.section).all()
        else:
            assert lv.parent is None
        if lv.members is not None:
            assert lv.members.shape == (lv.n_nodes, n_units)
            assert set(np.unique(lv.members.data)) <= {1.0}


# ---------------------------------------------------------------------------------------------
# graphs
# ---------------------------------------------------------------------------------------------
def test_her2st_grid_degrees_match_st_lattice(her2st):
    sg.pp.spatial_graphs(her2st)
    table = her2st["table"]
    adj = table.obsp[Keys.CONNECTIVITIES]
    dst = table.obsp[Keys.DISTANCES]
    assert table.uns[Keys.NEIGHBORS]["params"]["coord_type"] == "grid"
    assert (adj != adj.T).nnz == 0 and adj.diagonal().sum() == 0
    deg = np.asarray(adj.sum(1)).ravel()
    # ST is a square lattice: most spots have 4 neighbours, none more than a few extra.
    assert np.mean(deg == 4) > 0.6
    assert deg.max() <= 6
    # Neighbours are lattice neighbours: about one pitch (200 um) apart, never a diagonal.
    xy = table.obsm[Keys.SPATIAL]
    r, c = adj.nonzero()
    d = np.linalg.norm(xy[r] - xy[c], axis=1)
    assert np.median(d) == pytest.approx(200, rel=0.1)
    assert np.quantile(d, 0.95) < 260
    sec = table.obs[Keys.SECTION].to_numpy()
    assert (sec[r] == sec[c]).all()
    assert dst.nnz == adj.nnz


def test_spatial_graphs_copy_writes_nothing(her2st):
    table = her2st["table"]
    before = set(table.obsp.keys())
    adj, dst = sg.pp.spatial_graphs(her2st, method="knn", n_neighs=3, copy=True)
    assert set(table.obsp.keys()) == before
    assert adj.shape == (table.n_obs, table.n_obs)
    # kNN symmetrised: each spot has at least its 3 nearest.
    assert np.asarray(adj.sum(1)).min() >= 3


@pytest.mark.parametrize(
    ("method", "kw"),
    [("delaunay", {"radius_um": 60.0}), ("knn", {"n_neighs": 5}), ("radius", {"radius_um": 40.0}), ("grid", {})],
)
def test_graphs_never_cross_sections(method, kw):
    rng = np.random.default_rng(0)
    # Two sections on top of each other: any cross edge would be short.
    xy = rng.uniform(0, 300, (400, 2))
    sec = rng.integers(0, 2, 400)
    adj, dst, params = section_graphs(xy, sec, method=method, **kw)
    r, c = adj.nonzero()
    assert len(r) > 400
    assert (sec[r] == sec[c]).all()
    assert (adj != adj.T).nnz == 0
    if method in ("delaunay", "radius"):
        assert dst.data.max() <= kw["radius_um"] + 1e-9


def test_tiny_and_collinear_sections_get_a_graph():
    xy = np.array([[0.0, 0], [10, 0], [20, 0], [30, 0], [0, 0], [5, 5]])
    sec = np.array([0, 0, 0, 0, 1, 1])
    adj, _, _ = section_graphs(xy, sec, method="delaunay")
    e = graph_edges(adj)
    assert {(0, 1), (1, 2), (2, 3), (4, 5)} <= set(map(tuple, e.T.tolist()))
    assert not {(3, 4), (0, 4)} & set(map(tuple, e.T.tolist()))


def test_grouped_delaunay_stays_inside_groups():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, (300, 2))
    grp = rng.integers(0, 20, 300)
    e = grouped_delaunay_edges(xy, grp)
    assert (grp[e[0]] == grp[e[1]]).all()
    # Each group's triangulation connects all its points.
    deg = np.bincount(e[0], minlength=300)
    assert (deg[np.bincount(grp)[grp] > 1] > 0).all()


# ---------------------------------------------------------------------------------------------
# niches and regions (array level)
# ---------------------------------------------------------------------------------------------
def test_square_niches_partition_and_adjacency():
    rng = np.random.default_rng(2)
    xy = np.vstack([rng.uniform(0, 350, (2000, 2)), rng.uniform(1000, 1200, (500, 2))])
    sec = np.r_[np.zeros(2000, int), np.ones(500, int)]
    niche, centers, nsec, ij = square_niches(xy, sec, 100.0)
    # every cell in exactly one niche, inside its square
    assert niche.shape == (2500,)
    assert (np.abs(xy - centers[niche]) <= 50 + 1e-9).all()
    assert (nsec[niche] == sec).all()
    assert len(centers) == 16 + 4
    e = grid_adjacency(ij, nsec)
    deg = np.bincount(e[0], minlength=len(centers))
    # a 4x4 grid of tiles: 4 corners (3), 8 sides (5), 4 inside (8); a 2x2 grid: 3 each
    assert sorted(deg[nsec == 0].tolist()) == [3] * 4 + [5] * 8 + [8] * 4
    assert deg[nsec == 1].tolist() == [3] * 4
    assert (nsec[e[0]] == nsec[e[1]]).all()


def test_square_niches_of_a_block_are_the_whole_sections_niches():
    rng = np.random.default_rng(3)
    xy = rng.uniform(13, 613, (3000, 2))
    sec = np.zeros(len(xy), int)
    _, centers, _, _ = square_niches(xy, sec, 100.0)
    # A spatial block starting off the grid (as a train / test split cuts it) keeps the same tiles.
    block = (xy[:, 0] > 257) & (xy[:, 1] > 171)
    niche_b, centers_b, _, _ = square_niches(xy[block], sec[block], 100.0)
    whole = {tuple(c) for c in centers.round(6)}
    assert {tuple(c) for c in centers_b.round(6)} <= whole
    assert (np.abs(xy[block] - centers_b[niche_b]) <= 50 + 1e-9).all()


def test_ring_members_radius_and_sections():
    c = np.array([[0.0, 0], [200, 0], [400, 0], [0, 0]])
    m = ring_members(c, np.array([0, 0, 0, 1]), 250.0).toarray()
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]]


def test_cell_hierarchy_synthetic_sums_and_parents():
    rng = np.random.default_rng(3)
    n = 5000
    xy = rng.uniform(0, 800, (n, 2))
    sec = rng.integers(0, 2, n)
    adj, _, _ = section_graphs(xy, sec, method="delaunay", radius_um=Defaults.CELL_GRAPH_RADIUS_UM)
    fovs = {"micro": 32.0, "meso": 150.0, "macro": 500.0}
    h = cell_hierarchy(
        xy, sec, ["a", "b"], cell_edges=graph_edges(adj), fovs=fovs, niche_size_um=100, region_radius_um=250
    )
    _assert_consistent(h, n)
    micro, meso, macro = (h.levels[k] for k in Levels.ALL)
    assert h.unit_level == "micro"
    # every cell in exactly one niche, and the niche of each cell is its parent
    assert (np.asarray(meso.members.sum(0)).ravel() == 1).all()
    assert (meso.members.tocoo().row[np.argsort(meso.members.tocoo().col)] == micro.parent).all()
    # regions: the niche itself plus the niches within 250 um
    ring = macro.members @ meso.members.T
    assert (ring.diagonal() == np.asarray(meso.members.sum(1)).ravel()).all()
    counts = sp.csr_matrix(rng.poisson(1.0, (n, 7)).astype(np.float32))
    np.testing.assert_allclose((meso.members @ counts).sum(0), counts.sum(0))
    np.testing.assert_array_equal(h.unit_nodes("macro"), micro.parent)
    # children_mean of the micro level into niches = niche means
    vals = rng.normal(size=(n, 3))
    cm = h.children_mean("micro", vals, to="meso")
    k = micro.parent[0]
    np.testing.assert_allclose(cm[k], vals[micro.parent == k].mean(0))


def test_spot_hierarchy_with_nuclei_arrays():
    xy = np.array([[0.0, 0], [200, 0], [400, 0], [0, 0]])
    sec = np.array([0, 0, 0, 1])
    adj, _, _ = section_graphs(xy, sec, method="knn", n_neighs=1)
    rng = np.random.default_rng(4)
    spot = rng.integers(0, 4, 80)
    nxy = xy[spot] + rng.uniform(-40, 40, (80, 2))
    h = spot_hierarchy(
        xy,
        sec,
        ["a", "b"],
        spot_edges=graph_edges(adj),
        nuclei_xy_um=nxy,
        nuclei_spot=spot,
        fovs={"micro": 32.0, "meso": 150.0, "macro": 500.0},
        region_radius_um=250.0,
    )
    _assert_consistent(h, 4)
    assert h.unit_level == "meso" and h.levels["micro"].members is None
    e = h.levels["micro"].edges
    assert (spot[e[0]] == spot[e[1]]).all()
    np.testing.assert_array_equal(h.levels["macro"].members.toarray().sum(1), [2, 3, 2, 1])
    cm = h.children_mean("micro", np.ones((80, 2)))
    np.testing.assert_allclose(cm[np.bincount(spot, minlength=4) > 0], 1.0)
    with pytest.raises(ValueError, match="finer"):
        h.unit_nodes("micro")


def test_check_rejects_inconsistent_hierarchies():
    xy = np.zeros((2, 2))
    meso = dict(name="meso", centers_um=xy, fov_um=150.0, members=sp.identity(2, format="csr"))
    with pytest.raises(ValueError, match="joins two sections"):
        Hierarchy(
            ["a", "b"],
            {"meso": Level(section=[0, 1], edges=[[0], [1]], parent=None, **meso)},
            unit_level="meso",
        )
    macro = Level("macro", xy[:1], [0], 500.0, np.zeros((2, 0)), None, None)
    with pytest.raises(ValueError, match="parents point outside"):
        Hierarchy(
            ["a"],
            {"meso": Level(section=[0, 0], edges=np.zeros((2, 0)), parent=[0, 3], **meso), "macro": macro},
            unit_level="meso",
        )


# ---------------------------------------------------------------------------------------------
# build_hierarchy on real data, storage
# ---------------------------------------------------------------------------------------------
def test_get_hierarchy_missing_says_what_to_run(her2st):
    table = her2st["table"]
    saved = table.uns.get(Keys.UNS, {}).pop(Keys.HIERARCHY, None)
    try:
        with pytest.raises(KeyError, match="build_hierarchy"):
            sg.pp.get_hierarchy(her2st)
    finally:
        if saved is not None:
            table.uns[Keys.UNS][Keys.HIERARCHY] = saved


def test_her2st_hierarchy_without_nuclei_zarr_roundtrip(her2st, tmp_path):
    import spatialdata as sd

    h = sg.pp.build_hierarchy(her2st, nuclei=False)
    table = her2st["table"]
    _assert_consistent(h, table.n_obs)
    assert list(h.levels) == ["meso", "macro"]
    assert h.levels["meso"].fov_um == pytest.approx(150.0) and h.levels["macro"].fov_um == pytest.approx(500.0)
    # macro region: the spot plus its 4 lattice neighbours within 250 um for interior spots
    size = np.asarray(h.levels["macro"].members.sum(1)).ravel()
    assert np.median(size) == 5
    # write only shapes + table (the images are irrelevant to the table's uns and slow to write)
    small = sd.SpatialData(shapes=dict(her2st.shapes), tables={"table": table})
    small.write(tmp_path / "h.zarr")
    back = sg.pp.get_hierarchy(sd.read_zarr(tmp_path / "h.zarr"))
    _roundtrip_equal(h, back)


def _roundtrip_equal(a: Hierarchy, b: Hierarchy) -> None:
    assert a.sections == b.sections and a.unit_level == b.unit_level and list(a.levels) == list(b.levels)
    for k, la in a.levels.items():
        lb = b.levels[k]
        np.testing.assert_array_equal(la.centers_um, lb.centers_um)
        np.testing.assert_array_equal(la.section, lb.section)
        np.testing.assert_array_equal(la.edges, lb.edges)
        assert la.fov_um == lb.fov_um
        assert (la.parent is None) == (lb.parent is None)
        if la.parent is not None:
            np.testing.assert_array_equal(la.parent, lb.parent)
        assert (la.members is None) == (lb.members is None)
        if la.members is not None:
            assert (la.members != lb.members).nnz == 0


def test_to_uns_is_plain_and_roundtrips_in_memory():
    rng = np.random.default_rng(5)
    xy = rng.uniform(0, 500, (300, 2))
    h = cell_hierarchy(
        xy,
        np.zeros(300, int),
        ["s"],
        cell_edges=np.zeros((2, 0), np.int64),
        fovs={"micro": 32.0, "meso": 150.0, "macro": 500.0},
        niche_size_um=100,
        region_radius_um=250,
    )
    d = h.to_uns()

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        return isinstance(x, np.ndarray | np.generic | str | int | float)

    assert plain(d)
    _roundtrip_equal(h, Hierarchy.from_uns(d))


def test_xenium_cell_graph_and_niches():
    sdata = sg.datasets.xenium_lung()
    h = sg.pp.build_hierarchy(sdata)
    table = sdata["table"]
    _assert_consistent(h, table.n_obs)
    micro, meso = h.levels["micro"], h.levels["meso"]
    adj = table.obsp[Keys.CONNECTIVITIES]
    assert adj.nnz > 0 and (adj != adj.T).nnz == 0
    # A subsampled field: 75 um between cells. The cut follows the spacing (3 x the median
    # nearest-neighbour distance) instead of leaving 74 edges on 200 cells at 50 um.
    radius = sg.pp._graphs.density_radius(sg.io.validate(sdata).xy_um, np.zeros(table.n_obs, int))
    assert 200 < radius < 250
    assert table.obsp[Keys.DISTANCES].data.max() <= radius + 1e-6
    assert adj.nnz / table.n_obs >= 3.0
    # every cell in exactly one niche; niche counts sum the cells' counts
    assert (np.asarray(meso.members.sum(0)).ravel() == 1).all()
    counts = sg.io.validate(sdata).counts()
    np.testing.assert_allclose((meso.members @ counts).sum(0), counts.sum(0), rtol=1e-5)
    assert (np.abs(micro.centers_um - meso.centers_um[micro.parent]) <= Defaults.NICHE_SIZE_UM / 2 + 1e-6).all()


def test_dense_cells_keep_the_fixed_radius_cut():
    from sigmma_sc.pp._graphs import density_radius

    sdata = sg.datasets.synthetic(2000, n_genes=20, seed=0)
    slide = sg.io.validate(sdata)
    assert density_radius(slide.xy_um, slide.unit_section) == Defaults.CELL_GRAPH_RADIUS_UM
    sg.pp.build_hierarchy(sdata)
    assert sdata["table"].obsp[Keys.DISTANCES].data.max() <= Defaults.CELL_GRAPH_RADIUS_UM + 1e-6


def test_kidney_crop_hierarchy():
    sdata = sg.datasets.visium_hd_kidney(crop=True)
    h = sg.pp.build_hierarchy(sdata)
    table = sdata["table"]
    _assert_consistent(h, table.n_obs)
    # 16 um bins on a lattice: 8 neighbours inside the tissue
    deg = np.asarray(table.obsp[Keys.CONNECTIVITIES].sum(1)).ravel()
    assert np.median(deg) == 8
    # a 100 um niche holds at most (100 / 16 + 1)^2 bins
    per_niche = np.asarray(h.levels["meso"].members.sum(1)).ravel()
    assert per_niche.max() <= 49 and np.median(per_niche) >= 25


def test_visium_hex_lattice_six_neighbours():
    sdata = sg.datasets.visium_mouse_brain()
    adj, dst = sg.pp.spatial_graphs(sdata, copy=True)
    deg = np.asarray(adj.sum(1)).ravel()
    assert deg.max() == 6 and np.mean(deg == 6) > 0.3  # a 49-spot crop: many spots on its border
    xy = sdata["table"].obsm[Keys.SPATIAL]
    r, c = adj.nonzero()
    np.testing.assert_allclose(np.linalg.norm(xy[r] - xy[c], axis=1), 100.0, rtol=0.1)  # the Visium pitch


def test_cell_hierarchy_table_writes_to_zarr(tmp_path):
    # squidpy's Delaunay params hold a (0, radius) tuple, which anndata cannot write: it must be stored as a list.
    import spatialdata as sd

    sdata = sg.datasets.synthetic(600, n_genes=30, seed=3)
    sg.pp.build_hierarchy(sdata)
    small = sd.SpatialData(shapes=dict(sdata.shapes), tables={"table": sdata["table"]})
    small.write(tmp_path / "cells.zarr")
    back = sd.read_zarr(tmp_path / "cells.zarr")["table"]
    assert (
        back.uns[Keys.NEIGHBORS]["params"]["coord_type"] == sdata["table"].uns[Keys.NEIGHBORS]["params"]["coord_type"]
    )
    _roundtrip_equal(sg.pp.get_hierarchy(sdata), sg.pp.get_hierarchy(sd.read_zarr(tmp_path / "cells.zarr")))
