"""Neighbourhood graphs per section (squidpy builders), never joining two sections.

Coordinates are microns (``SlideData.xy_um``); squidpy builds the graph of each section on its own
(``library_key``) and puts the blocks back in table order, so no edge ever crosses a section.

Graphs live where squidpy keeps them: ``obsp[f"{key}_connectivities"]``,
``obsp[f"{key}_distances"]`` and ``uns[f"{key}_neighbors"]``. The package marks the graphs it
writes (``uns[f"{key}_neighbors"]["written_by"] == "sigmma_sc"``) and never overwrites one it did
not write: a graph the user made with :func:`squidpy.gr.spatial_neighbors` under the default
``"spatial"`` key stays as it is, and the package's own goes to ``"sigmma_spatial"``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from sigmma_sc._constants import Defaults, Keys
from sigmma_sc._logging import logger
from sigmma_sc.io import validate

if TYPE_CHECKING:
    from spatialdata import SpatialData

METHODS = ("grid", "delaunay", "knn", "radius")

#: squidpy's default graph key (``key_added`` of :func:`squidpy.gr.spatial_neighbors`, ``"spatial"``).
SQUIDPY_GRAPH_KEY = Keys.SPATIAL
#: The package's graph key when ``"spatial"`` holds a graph it did not write.
OWN_GRAPH_KEY = Keys.OWN_GRAPH
#: Field of ``uns[f"{key}_neighbors"]`` marking a graph written by the package, and its value.
WRITTEN_BY = Keys.WRITTEN_BY
PACKAGE = "sigmma_sc"
# Edge count recorded with a written graph: a matrix replaced by hand no longer matches it.
_NNZ = Keys.GRAPH_NNZ

# Units that tile a lattice: legacy ST is square (4 neighbours), Visium hexagonal (6),
# Visium HD bins are square pixels (8: edge + corner neighbours).
_LATTICE_NEIGHBOURS = {"st": 4, "visium": 6, "visium_hd": 8}


def infer_lattice_neighbours(xy_um: np.ndarray, section: np.ndarray) -> int:
    """Guess whether spot centres lie on a square (4) or a hexagonal (6) lattice.

    On a hexagonal lattice the 5th and 6th nearest neighbours are as close as the 1st; on a
    square lattice they are diagonal (``sqrt(2)`` times farther).

    Parameters
    ----------
    xy_um
        ``(n, 2)`` unit centres in microns.
    section
        ``(n,)`` section codes; neighbours are searched within a section.

    Returns
    -------
    4 or 6.

    Examples
    --------
    >>> import numpy as np
    >>> g = np.stack(np.meshgrid(np.arange(10), np.arange(10)), -1).reshape(-1, 2) * 200.0
    >>> infer_lattice_neighbours(g, np.zeros(len(g), int))
    4
    """
    from scipy.spatial import cKDTree

    ratios = []
    for s in np.unique(section):
        pts = xy_um[section == s]
        if len(pts) < 8:
            continue
        d, _ = cKDTree(pts).query(pts, k=7)
        ratios.append(np.median(d[:, 6]) / max(np.median(d[:, 1]), 1e-12))
    if not ratios:
        return 4
    return 6 if np.median(ratios) < 1.2 else 4


def default_graph_params(technology: str, unit_kind: str) -> dict[str, Any]:
    """Per-technology default graph: a lattice for spots and bins, Delaunay with a radius cut for cells.

    Parameters
    ----------
    technology
        ``uns["sigmma_dataset"]["technology"]``.
    unit_kind
        ``"spot"`` or ``"cell"``.

    Returns
    -------
    ``{"method", "n_neighs", "radius_um"}``; ``n_neighs=None`` on a grid means "infer the lattice".

    Examples
    --------
    >>> default_graph_params("st", "spot")
    {'method': 'grid', 'n_neighs': 4, 'radius_um': None}
    """
    if technology in _LATTICE_NEIGHBOURS:
        return {"method": "grid", "n_neighs": _LATTICE_NEIGHBOURS[technology], "radius_um": None}
    if unit_kind == "spot":
        return {"method": "grid", "n_neighs": None, "radius_um": None}
    return {"method": "delaunay", "n_neighs": None, "radius_um": Defaults.CELL_GRAPH_RADIUS_UM}


def make_builder(method: str, *, n_neighs: int | None = None, radius_um: float | None = None, n_rings: int = 1):
    """Make the squidpy graph builder of one method (``grid``, ``delaunay``, ``knn``, ``radius``).

    Examples
    --------
    >>> make_builder("delaunay", radius_um=50.0).uns_params()["coord_type"]
    'generic'
    """
    from squidpy.gr.neighbors import DelaunayBuilder, GridBuilder, KNNBuilder, RadiusBuilder

    if method == "grid":
        return GridBuilder(n_neighs=n_neighs or 6, n_rings=n_rings)
    if method == "delaunay":
        return DelaunayBuilder(radius=radius_um)
    if method == "knn":
        return KNNBuilder(n_neighs=n_neighs or 6)
    if method == "radius":
        if radius_um is None:
            raise ValueError("method='radius' needs radius_um=<microns>, e.g. radius_um=50.")
        return RadiusBuilder(radius=float(radius_um))
    raise ValueError(f"method={method!r} is not one of {METHODS}.")


def _fallback_graph(coords: np.ndarray, radius_um: float | None) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    # Tiny or collinear sections: Delaunay / kNN are undefined, so chain each unit to its two
    # nearest neighbours (the whole set when it has three units or fewer).
    from scipy.spatial import cKDTree

    n = len(coords)
    if n < 2:
        return sp.csr_matrix((n, n), dtype=np.float32), sp.csr_matrix((n, n), dtype=np.float64)
    k = min(n - 1, 2)
    d, j = cKDTree(coords).query(coords, k=k + 1)
    rows = np.repeat(np.arange(n), k)
    d, j = d[:, 1:].ravel(), j[:, 1:].ravel()
    keep = np.ones_like(d, bool) if radius_um is None else d <= radius_um
    adj = sp.csr_matrix((np.ones(keep.sum(), np.float32), (rows[keep], j[keep])), shape=(n, n))
    dst = sp.csr_matrix((d[keep], (rows[keep], j[keep])), shape=(n, n))
    return adj, dst


def _build_one(builder, coords: np.ndarray, method: str, radius_um: float | None):
    from scipy.spatial import QhullError

    n = len(coords)
    too_small = n < 4 if method in ("delaunay", "grid") else n < 2
    if not too_small and method in ("grid", "knn") and builder.n_neighs >= n:
        too_small = True
    if too_small:
        return _fallback_graph(coords, radius_um)
    try:
        return builder.build(np.ascontiguousarray(coords, dtype=np.float64))
    except QhullError:
        return _fallback_graph(coords, radius_um)


def _per_section(builder, xy_um: np.ndarray, section: np.ndarray, method: str, radius_um: float | None):
    """One graph per section with squidpy's ``library_key``, tiny / collinear sections chained.

    squidpy builds each library with ``builder.build`` and assembles the blocks in table order
    (:meth:`~squidpy.gr.neighbors.GraphBuilderCSR.combine`); the wrapper only adds the fallback
    for sections where Delaunay / kNN are undefined, so the graphs equal the former per-section loop.
    """
    import anndata as ad
    import pandas as pd
    from squidpy.gr import spatial_neighbors_from_builder
    from squidpy.gr.neighbors import GraphBuilderCSR

    class _SectionSafe(GraphBuilderCSR):
        def __init__(self) -> None:
            super().__init__(transform=builder.transform)

        def build(self, coords: np.ndarray):
            return _build_one(builder, coords, method, radius_um)

        def build_graph(self, coords: np.ndarray):  # pragma: no cover - build() is overridden
            return builder.build_graph(coords)

        def uns_params(self) -> dict[str, Any]:
            return builder.uns_params()

    units = ad.AnnData(
        obs=pd.DataFrame({"section": pd.Categorical(section)}, index=np.arange(len(section)).astype(str)),
        obsm={Keys.SPATIAL: np.ascontiguousarray(xy_um, dtype=np.float64)},
    )
    # squidpy announces every build on spatialdata's logger at INFO; the package logs its own line.
    sd_logger = logging.getLogger("spatialdata._logging")

    def quiet(record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO

    sd_logger.addFilter(quiet)
    try:
        res = spatial_neighbors_from_builder(
            units, _SectionSafe(), spatial_key=Keys.SPATIAL, library_key="section", copy=True
        )
    finally:
        sd_logger.removeFilter(quiet)
    return res.connectivities, res.distances


def section_graphs(
    xy_um: np.ndarray,
    section: np.ndarray,
    *,
    method: str = "delaunay",
    n_neighs: int | None = None,
    radius_um: float | None = None,
    n_rings: int = 1,
) -> tuple[sp.csr_matrix, sp.csr_matrix, dict[str, Any]]:
    """Build one graph per section and assemble them in input order (never across sections).

    Parameters
    ----------
    xy_um
        ``(n, 2)`` coordinates in microns.
    section
        ``(n,)`` integer section codes.
    method
        ``"grid"`` (lattice; ``n_neighs`` 4 square, 6 hexagonal, 8 square with corners),
        ``"delaunay"`` (cut at ``radius_um`` when given), ``"knn"`` or ``"radius"``.
    n_neighs, radius_um, n_rings
        Builder options (see :mod:`squidpy.gr.neighbors`).

    Returns
    -------
    Symmetric connectivities (float32, 0/1), distances (microns, or ring number on a grid) and
    the squidpy ``params`` dict.

    Examples
    --------
    >>> import numpy as np
    >>> xy = np.random.default_rng(0).uniform(0, 500, (200, 2))
    >>> adj, dst, params = section_graphs(xy, np.repeat([0, 1], 100), method="delaunay", radius_um=80)
    >>> adj[:100, 100:].nnz
    0
    """
    xy_um = np.asarray(xy_um, dtype=np.float64)
    section = np.asarray(section)
    if xy_um.ndim != 2 or xy_um.shape[1] != 2 or len(xy_um) != len(section):
        raise ValueError(f"xy_um must be (n, 2) with one section code per row; got {xy_um.shape}, {section.shape}.")
    if method == "grid" and n_neighs is None:
        n_neighs = infer_lattice_neighbours(xy_um, section)
    builder = make_builder(method, n_neighs=n_neighs, radius_um=radius_um, n_rings=n_rings)
    n = len(xy_um)
    if n:
        adj, dst = _per_section(builder, xy_um, section, method, radius_um)
        adj, dst = sp.csr_matrix(adj, dtype=np.float32), sp.csr_matrix(dst, dtype=np.float64)
    else:
        adj, dst = sp.csr_matrix((0, 0), dtype=np.float32), sp.csr_matrix((0, 0), dtype=np.float64)
    # Edges both directions: a kNN-style lattice builder is not symmetric on its own.
    adj = adj.maximum(adj.T).tocsr()
    dst = dst.maximum(dst.T).tocsr()
    adj.eliminate_zeros()
    adj.sort_indices()
    dst.sort_indices()
    # anndata's zarr/h5ad writers store neither tuples nor None in uns.
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in builder.uns_params().items() if v is not None}
    return adj, dst, params


def graph_edges(adj: sp.spmatrix) -> np.ndarray:
    """``(2, E)`` int64 edge list of a sparse adjacency, self-loops removed.

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> graph_edges(sp.csr_matrix([[0, 1], [1, 0]])).tolist()
    [[0, 1], [1, 0]]
    """
    csr = sp.csr_matrix(adj)
    if not csr.has_sorted_indices:
        csr = csr.sorted_indices()
    # CSR with sorted indices is already in (row, column) order: no sort needed.
    rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    cols = csr.indices.astype(np.int64)
    keep = (rows != cols) & (csr.data != 0)
    return np.vstack([rows[keep], cols[keep]])


def grouped_delaunay_edges(xy: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Delaunay edges inside each group (e.g. the nuclei of each spot), both directions.

    Groups of two or three points are fully connected; collinear groups are chained.

    Parameters
    ----------
    xy
        ``(n, 2)`` coordinates.
    group
        ``(n,)`` integer group of each point; points of different groups are never joined.

    Returns
    -------
    ``(2, E)`` int64 edges into ``xy``.

    Examples
    --------
    >>> import numpy as np
    >>> xy = np.array([[0, 0], [1, 0], [0, 1], [10, 10], [11, 10]], float)
    >>> grouped_delaunay_edges(xy, np.array([0, 0, 0, 1, 1])).shape
    (2, 8)
    """
    from scipy.spatial import Delaunay, QhullError

    xy = np.asarray(xy, dtype=np.float64)
    group = np.asarray(group)
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    rows, cols = [], []
    for idx in np.split(order, bounds) if len(order) else []:
        n = len(idx)
        if n < 2:
            continue
        if n <= 3:
            r, c = np.nonzero(~np.eye(n, dtype=bool))
        else:
            try:
                indptr, indices = Delaunay(xy[idx]).vertex_neighbor_vertices
                r, c = np.repeat(np.arange(n), np.diff(indptr)), indices
            except QhullError:
                adj = _fallback_graph(xy[idx], None)[0]
                adj = adj.maximum(adj.T).tocoo()
                r, c = adj.row, adj.col
        rows.append(idx[r])
        cols.append(idx[c])
    if not rows:
        return np.zeros((2, 0), np.int64)
    edges = np.vstack([np.concatenate(rows), np.concatenate(cols)]).astype(np.int64)
    return edges[:, np.lexsort((edges[1], edges[0]))]


def density_radius(xy_um: np.ndarray, section: np.ndarray) -> float:
    """Radius cut of a cell graph that fits the cells' spacing.

    ``Defaults.CELL_GRAPH_RADIUS_UM``, or ``Defaults.CELL_GRAPH_NN_FACTOR`` times the median
    nearest-neighbour distance (within sections) when cells are sparser, so a subsampled or sparse
    panel does not get a near-empty graph.

    Examples
    --------
    >>> import numpy as np
    >>> grid = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)
    >>> density_radius(grid * 10.0, np.zeros(100, int)), density_radius(grid * 40.0, np.zeros(100, int))
    (50.0, 120.0)
    """
    from scipy.spatial import cKDTree

    section = np.asarray(section)
    dists = []
    for code in np.unique(section):
        pts = np.asarray(xy_um, dtype=np.float64)[section == code]
        if len(pts) > 1:
            dists.append(cKDTree(pts).query(pts, k=2)[0][:, 1])
    if not dists:
        return float(Defaults.CELL_GRAPH_RADIUS_UM)
    spacing = float(np.median(np.concatenate(dists)))
    return float(max(Defaults.CELL_GRAPH_RADIUS_UM, Defaults.CELL_GRAPH_NN_FACTOR * spacing))


def _resolve_params(slide, method, n_neighs, radius_um) -> dict[str, Any]:
    params = default_graph_params(slide.technology, slide.unit_kind)
    if method is None and radius_um is None and params["method"] == "delaunay":
        params["radius_um"] = density_radius(slide.xy_um, slide.unit_section)
    if method is not None:
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {METHODS}.")
        params = {"method": method, "n_neighs": None, "radius_um": None}
    if n_neighs is not None:
        params["n_neighs"] = int(n_neighs)
    if radius_um is not None:
        params["radius_um"] = float(radius_um)
    return params


def compute_unit_graph(
    slide, *, method: str | None = None, n_neighs: int | None = None, radius_um: float | None = None, n_rings: int = 1
) -> tuple[sp.csr_matrix, sp.csr_matrix, dict[str, Any]]:
    """Graph of the table units of a validated :class:`~sigmma_sc.io.SlideData`, nothing written.

    Returns ``(connectivities, distances, {"params": squidpy builder params})``.
    """
    params = _resolve_params(slide, method, n_neighs, radius_um)
    adj, dst, uns_params = section_graphs(slide.xy_um, slide.unit_section, n_rings=n_rings, **params)
    return adj, dst, {"params": uns_params}


def graph_keys(key: str) -> tuple[str, str, str]:
    """Return the ``(connectivities, distances, uns)`` keys of a graph key, as squidpy names them.

    ``key`` is squidpy's ``key_added`` / ``connectivity_key``: ``"spatial"`` and
    ``"spatial_connectivities"`` both name ``obsp["spatial_connectivities"]``.

    Examples
    --------
    >>> graph_keys("spatial")
    ('spatial_connectivities', 'spatial_distances', 'spatial_neighbors')
    >>> graph_keys("sigmma_spatial_connectivities")[0]
    'sigmma_spatial_connectivities'
    """
    base = str(key).removesuffix("_connectivities").removesuffix("_distances")
    return f"{base}_connectivities", f"{base}_distances", f"{base}_neighbors"


def graph_owner(table, key: str) -> str | None:
    """Who wrote the graph under ``key``: ``"sigmma_sc"``, ``"other"`` (squidpy, the user) or ``None`` (absent).

    A graph is the package's when its ``uns[f"{key}_neighbors"]`` carries the package's mark and the
    edge count recorded with it; anything else in those ``obsp`` / ``uns`` slots belongs to someone else.

    Examples
    --------
    >>> import anndata as ad, numpy as np, scipy.sparse as sp
    >>> t = ad.AnnData(np.zeros((3, 1)))
    >>> graph_owner(t, "spatial") is None
    True
    >>> t.obsp["spatial_connectivities"] = sp.csr_matrix(np.eye(3))
    >>> graph_owner(t, "spatial")
    'other'
    """
    conn, dist, neigh = graph_keys(key)
    if conn not in table.obsp and dist not in table.obsp and neigh not in table.uns:
        return None
    rec = table.uns.get(neigh)
    if (
        isinstance(rec, Mapping)
        and str(rec.get(WRITTEN_BY, "")) == PACKAGE
        and conn in table.obsp
        and int(np.asarray(rec.get(_NNZ, -1))) == table.obsp[conn].nnz
    ):
        return PACKAGE
    return "other"


def unit_graph_key(table, key_added: str | None = None) -> str:
    """Where the package writes its unit graph, never over a graph it did not write.

    ``key_added=None``: squidpy's ``"spatial"`` when it is free or holds the package's graph, else
    ``"sigmma_spatial"`` (the user's graph stays, and a log line says so). A given ``key_added``
    that holds someone else's graph is refused.

    Raises
    ------
    ValueError
        The key holds a graph the package did not write.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> unit_graph_key(ad.AnnData(np.zeros((3, 1))))
    'spatial'
    """
    if key_added is not None:
        if graph_owner(table, key_added) == "other":
            conn = graph_keys(key_added)[0]
            raise ValueError(
                f"obsp[{conn!r}] holds a graph sigmma-sc did not write; it is left alone. Pass another "
                f"key_added= (e.g. key_added={OWN_GRAPH_KEY!r}) or use that graph with connectivity_key={key_added!r}."
            )
        return graph_keys(key_added)[0].removesuffix("_connectivities")
    if graph_owner(table, SQUIDPY_GRAPH_KEY) != "other":
        return SQUIDPY_GRAPH_KEY
    if graph_owner(table, OWN_GRAPH_KEY) == "other":
        raise ValueError(
            f"obsp[{graph_keys(SQUIDPY_GRAPH_KEY)[0]!r}] and obsp[{graph_keys(OWN_GRAPH_KEY)[0]!r}] both hold graphs "
            "sigmma-sc did not write; pass key_added= to name where the package's graph goes, or "
            f"connectivity_key= to use one of them."
        )
    logger.info(
        f"obsp[{graph_keys(SQUIDPY_GRAPH_KEY)[0]!r}] holds a graph sigmma-sc did not write (e.g. squidpy's): it is "
        f"kept, and the package's graph goes to obsp[{graph_keys(OWN_GRAPH_KEY)[0]!r}] (use yours with "
        f"connectivity_key={SQUIDPY_GRAPH_KEY!r})"
    )
    return OWN_GRAPH_KEY


def read_unit_graph(table, connectivity_key: str, section: np.ndarray) -> sp.csr_matrix:
    """Read an existing unit graph (e.g. squidpy's) as symmetric 0/1 connectivities inside sections.

    The table is not modified. Edges are made two-way (a kNN graph is not symmetric) and edges
    between two sections are dropped, with a warning.

    Parameters
    ----------
    table
        The units' table.
    connectivity_key
        squidpy's key: ``"spatial"`` or ``"spatial_connectivities"``.
    section
        ``(n_units,)`` section codes.

    Raises
    ------
    KeyError
        No such ``obsp`` entry.
    """
    conn = graph_keys(connectivity_key)[0]
    if conn not in table.obsp:
        raise KeyError(
            f"connectivity_key={connectivity_key!r}: obsp[{conn!r}] not found (obsp holds {sorted(table.obsp)}). "
            "Build it with squidpy.gr.spatial_neighbors(adata) or leave connectivity_key=None."
        )
    adj = sp.csr_matrix(table.obsp[conn], dtype=np.float32, copy=True)
    if adj.shape != (table.n_obs, table.n_obs):
        raise ValueError(f"obsp[{conn!r}] is {adj.shape}; the table has {table.n_obs} units.")
    adj.data[:] = 1.0
    adj = adj.maximum(adj.T).tocsr()
    adj.setdiag(0)
    coo = adj.tocoo()
    across = np.asarray(section)[coo.row] != np.asarray(section)[coo.col]
    if across.any():
        logger.warning(
            f"obsp[{conn!r}]: {int(across.sum())} edges join two sections and are left out of the hierarchy "
            "(build per-section graphs with squidpy's library_key=)"
        )
        coo.data[across] = 0
    adj = coo.tocsr()
    adj.eliminate_zeros()
    adj.sort_indices()
    return adj


def write_unit_graph(
    table, adj: sp.csr_matrix, dst: sp.csr_matrix, uns: dict[str, Any], *, key: str = SQUIDPY_GRAPH_KEY
) -> None:
    """Store a unit graph where squidpy stores it under ``key``, marked as the package's.

    ``obsp[f"{key}_connectivities"]``, ``obsp[f"{key}_distances"]`` and
    ``uns[f"{key}_neighbors"]`` (squidpy's fields plus ``written_by`` and the edge count). Callers
    pick ``key`` with :func:`unit_graph_key`, which never returns someone else's graph.
    """
    conn, dist, neigh = graph_keys(key)
    table.obsp[conn] = adj
    table.obsp[dist] = dst
    table.uns[neigh] = {
        "connectivities_key": conn,
        "distances_key": dist,
        **{k: v for k, v in uns.items() if k not in ("connectivities_key", "distances_key")},
        WRITTEN_BY: PACKAGE,
        _NNZ: int(adj.nnz),
    }


def spatial_graphs(
    sdata: SpatialData,
    *,
    table_key: str = Keys.TABLE,
    method: str | None = None,
    n_neighs: int | None = None,
    radius_um: float | None = None,
    n_rings: int = 1,
    key_added: str | None = None,
    copy: bool = False,
) -> tuple[sp.csr_matrix, sp.csr_matrix] | None:
    """Neighbourhood graph of the table's units, one per section, in microns.

    Built with squidpy's graph builders (:mod:`squidpy.gr.neighbors`) on the unit centres in
    microns (``SlideData.xy_um``, never raw pixels), section by section, so no edge joins two
    sections. Defaults per technology: a lattice for spots (legacy ST: square, 4 neighbours;
    Visium: hexagonal, 6; other spot data: inferred), a lattice of 8 for Visium HD bins, and a
    Delaunay triangulation cut at :attr:`~sigmma_sc.Defaults.CELL_GRAPH_RADIUS_UM` for cells.
    Edges are stored in both directions. Sections are squidpy ``library_key`` libraries.

    A graph the package did not write (e.g. from :func:`squidpy.gr.spatial_neighbors`) is never
    overwritten: with ``key_added=None`` the package's graph then goes to ``"sigmma_spatial"``.

    Parameters
    ----------
    sdata
        SpatialData with a table of units (see :func:`sigmma_sc.io.validate`).
    table_key
        Table to annotate.
    method
        ``"grid"``, ``"delaunay"``, ``"knn"`` or ``"radius"``; ``None``: the technology's default.
    n_neighs
        Lattice neighbours (grid) or k (knn).
    radius_um
        Edge length cut in microns (delaunay) or the radius (radius).
    n_rings
        Grid rings (grid only).
    key_added
        squidpy's ``key_added``: the graph goes to ``obsp[f"{key_added}_connectivities"]`` /
        ``obsp[f"{key_added}_distances"]`` / ``uns[f"{key_added}_neighbors"]``. ``None``:
        ``"spatial"``, or ``"sigmma_spatial"`` when ``"spatial"`` holds a graph the package did not
        write. A key holding someone else's graph is refused.
    copy
        Return ``(connectivities, distances)`` instead of writing them (as squidpy's ``copy=True``).

    Returns
    -------
    ``None``; writes ``obsp["spatial_connectivities"]``, ``obsp["spatial_distances"]`` and
    ``uns["spatial_neighbors"]`` (or the ``key_added`` ones) to the table, as
    :func:`squidpy.gr.spatial_neighbors` does. With ``copy=True`` the two matrices, and nothing is
    written.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.visium_mouse_brain()  # 49 spots of the hexagonal Visium grid
    >>> sg.pp.spatial_graphs(sdata)
    >>> sdata["table"].uns["spatial_neighbors"]["params"]["coord_type"]
    'grid'
    >>> round(float(sdata["table"].obsp["spatial_connectivities"].sum(1).mean()), 2)  # 6 inside, fewer at the edge
    4.73
    """
    slide = validate(sdata, table_key=table_key, require_image=False)
    key = None if copy else unit_graph_key(slide.table, key_added)
    adj, dst, uns = compute_unit_graph(slide, method=method, n_neighs=n_neighs, radius_um=radius_um, n_rings=n_rings)
    where = "" if key is None else f" -> obsp[{graph_keys(key)[0]!r}]"
    logger.info(
        f"spatial graph ({uns['params']}): {adj.shape[0]} units, mean degree "
        f"{adj.nnz / max(adj.shape[0], 1):.2f}{where}"
    )
    if copy:
        return adj, dst
    write_unit_graph(slide.table, adj, dst, uns, key=key)
    return None
