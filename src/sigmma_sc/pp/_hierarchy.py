"""The micro / meso / macro hierarchy the model consumes (docs/architecture.md, section 3).

Spot data: micro = nuclei from the H&E (image only), meso = spots (the table units),
macro = a spot and its ring of spots. Cell data: micro = cells or fine bins (the table units),
meso = square niches of cells, macro = a niche and its ring of niches. Everything is index
arrays and sparse matrices, built section by section, so no edge or region crosses a section.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from sigmma_sc._constants import Defaults, Keys, Levels
from sigmma_sc._logging import logger, timed
from sigmma_sc.io import SlideData, get_table, validate

from ._graphs import (
    compute_unit_graph,
    graph_edges,
    graph_keys,
    grouped_delaunay_edges,
    read_unit_graph,
    unit_graph_key,
    write_unit_graph,
)
from ._nuclei import load_nuclei, nuclei_key, segment_nuclei
from ._workcopy import light_copy

if TYPE_CHECKING:
    from spatialdata import SpatialData

# Format version of the uns layout, bumped when it changes.
_UNS_VERSION = 1
# Field of the stored hierarchy naming the obsp connectivities of the unit graph it was built on.
_UNIT_GRAPH = Keys.UNIT_GRAPH


@dataclass(eq=False)
class Level:
    """One level of a :class:`Hierarchy`.

    Attributes
    ----------
    name
        ``"micro"``, ``"meso"`` or ``"macro"``.
    centers_um
        ``(n, 2)`` float64 node centres ``(x, y)`` in microns.
    section
        ``(n,)`` int section codes (as ``Hierarchy.sections``).
    fov_um
        Side of the node's image view in microns.
    edges
        ``(2, E)`` int64 edges, both directions, never across sections.
    parent
        ``(n,)`` int64 index into the next coarser level; ``None`` for the coarsest.
    members
        ``(n, n_units)`` 0/1 CSR: the table units a node sums (expression = ``members @ counts``);
        ``None`` for an image-only level (nuclei).

    Examples
    --------
    >>> import numpy as np
    >>> lv = Level("meso", np.zeros((2, 2)), np.array([0, 0]), 150.0, np.array([[0, 1], [1, 0]]), None, None)
    >>> lv.n_nodes
    2
    """

    name: str
    centers_um: np.ndarray
    section: np.ndarray
    fov_um: float
    edges: np.ndarray
    parent: np.ndarray | None = None
    members: sp.csr_matrix | None = None

    def __post_init__(self) -> None:
        self.centers_um = np.asarray(self.centers_um, dtype=np.float64).reshape(-1, 2)
        self.section = np.asarray(self.section, dtype=np.int64).reshape(-1)
        self.edges = np.asarray(self.edges, dtype=np.int64).reshape(2, -1)
        self.fov_um = float(self.fov_um)
        if self.parent is not None:
            self.parent = np.asarray(self.parent, dtype=np.int64).reshape(-1)
        if self.members is not None:
            self.members = sp.csr_matrix(self.members, dtype=np.float32)

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return len(self.centers_um)

    def _summary(self) -> str:
        members = "image only" if self.members is None else f"{self.members.nnz:,} memberships"
        return f"{self.n_nodes:,} nodes, {self.edges.shape[1]:,} edges, fov {self.fov_um:g} µm, {members}"

    def __repr__(self) -> str:
        return f"Level({self.name!r}: {self._summary()})"


@dataclass(eq=False)
class Hierarchy:
    """Micro / meso / macro graphs of a slide: nodes, edges, parents and unit membership.

    Attributes
    ----------
    sections
        Section names; ``Level.section`` codes index this list.
    levels
        ``{name: Level}`` fine to coarse, a subset of ``("micro", "meso", "macro")``.
    unit_level
        The level whose nodes are the table units, in table order: ``"meso"`` for spot data,
        ``"micro"`` for cell data.

    Examples
    --------
    49 Visium spots and the nuclei segmented under them:

    >>> import sigmma_sc as sg
    >>> h = sg.pp.build_hierarchy(sg.datasets.visium_mouse_brain())
    >>> h.unit_level, {k: v.n_nodes for k, v in h.levels.items()}
    ('meso', {'micro': 339, 'meso': 49, 'macro': 49})
    >>> h.levels["micro"].parent[:5]  # spot of each nucleus
    array([0, 0, 0, 0, 0])
    >>> region = h.unit_nodes("macro")  # region of each spot
    >>> region.shape
    (49,)
    """

    sections: list[str]
    levels: dict[str, Level]
    unit_level: str
    _names: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sections = [str(s) for s in self.sections]
        self._names = [n for n in Levels.ALL if n in self.levels]
        if list(self.levels) != self._names:
            raise ValueError(
                f"levels must be ordered fine to coarse, a subset of {Levels.ALL}; got {list(self.levels)}."
            )
        if self.unit_level not in self.levels:
            raise ValueError(f"unit_level {self.unit_level!r} is not one of the levels {self._names}.")
        self.check()

    def __repr__(self) -> str:
        shown = ", ".join(self.sections[:5]) + (f", ... ({len(self.sections)})" if len(self.sections) > 5 else "")
        lines = [f"Hierarchy: {self.n_units:,} units ({self.unit_level} level), sections {shown}"]
        lines += [
            f"    {name}: {lv._summary()}" + (" <- units" if name == self.unit_level else "")
            for name, lv in self.levels.items()
        ]
        return "\n".join(lines)

    # -- consistency ------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ``ValueError`` unless parents, edges, sections and members are consistent.

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> sdata = sg.datasets.synthetic(100, n_genes=10, seed=0)
        >>> sg.pp.build_hierarchy(sdata).check()  # None: consistent
        """
        n_units = self.n_units
        for i, name in enumerate(self._names):
            lv = self.levels[name]
            n = lv.n_nodes
            if lv.name != name:
                raise ValueError(f"level stored under {name!r} is named {lv.name!r}.")
            if len(lv.section) != n or (n and (lv.section.min() < 0 or lv.section.max() >= len(self.sections))):
                raise ValueError(
                    f"level {name!r}: section codes must be (n,) codes into {len(self.sections)} sections."
                )
            e = lv.edges
            if e.size and (e.min() < 0 or e.max() >= n):
                raise ValueError(f"level {name!r}: edges point outside its {n} nodes.")
            if e.size and np.any(lv.section[e[0]] != lv.section[e[1]]):
                raise ValueError(f"level {name!r}: an edge joins two sections.")
            coarser = self._names[i + 1] if i + 1 < len(self._names) else None
            if coarser is None:
                if lv.parent is not None:
                    raise ValueError(f"level {name!r} is the coarsest; its parent must be None.")
            else:
                up = self.levels[coarser]
                if lv.parent is None or len(lv.parent) != n:
                    raise ValueError(f"level {name!r} needs one parent per node in {coarser!r}.")
                if n and (lv.parent.min() < 0 or lv.parent.max() >= up.n_nodes):
                    raise ValueError(f"level {name!r}: parents point outside the {up.n_nodes} nodes of {coarser!r}.")
                if n and np.any(up.section[lv.parent] != lv.section):
                    raise ValueError(f"level {name!r}: a node's parent lies in another section.")
            if lv.members is not None and lv.members.shape != (n, n_units):
                raise ValueError(f"level {name!r}: members must be ({n}, {n_units}), got {lv.members.shape}.")
        unit = self.levels[self.unit_level]
        if unit.members is not None and (unit.members != sp.identity(n_units, format="csr")).nnz:
            raise ValueError(f"unit level {self.unit_level!r}: members must be the identity (a node is a unit).")

    # -- navigation -------------------------------------------------------------------------
    @property
    def level_names(self) -> list[str]:
        """Level names fine to coarse."""
        return list(self._names)

    @property
    def n_units(self) -> int:
        """Number of table units (nodes of ``unit_level``)."""
        return self.levels[self.unit_level].n_nodes

    def _walk(self, start: str, stop: str) -> np.ndarray:
        names = self._names
        if names.index(stop) < names.index(start):
            raise ValueError(f"level {stop!r} is finer than {start!r}; parents only lead to coarser levels.")
        idx = np.arange(self.levels[start].n_nodes, dtype=np.int64)
        for name in names[names.index(start) : names.index(stop)]:
            idx = self.levels[name].parent[idx]
        return idx

    def unit_nodes(self, level: str) -> np.ndarray:
        """Node index of each table unit at ``level`` (the unit level or a coarser one).

        Parameters
        ----------
        level
            ``"micro"``, ``"meso"`` or ``"macro"``, at or above ``unit_level``.

        Returns
        -------
        ``(n_units,)`` int64.

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> h = sg.pp.build_hierarchy(sg.datasets.synthetic(100, n_genes=10, seed=0))  # 100 cells
        >>> h.unit_level, h.unit_nodes("macro")[:5]  # region of each cell
        ('micro', array([0, 0, 2, 2, 2]))
        """
        self._require(level)
        return self._walk(self.unit_level, level)

    def ancestors(self, level: str, to: str) -> np.ndarray:
        """Node index at the coarser level ``to`` of every node of ``level`` (follows ``parent``).

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> h = sg.pp.build_hierarchy(sg.datasets.synthetic(100, n_genes=10, seed=0))  # 100 cells, 4 niches
        >>> h.ancestors("micro", "meso")[:5]  # niche of each cell
        array([0, 0, 2, 2, 2])
        """
        self._require(level)
        self._require(to)
        return self._walk(level, to)

    def children_mean(self, level: str, values: np.ndarray, *, to: str | None = None) -> np.ndarray:
        """Mean of ``level`` node values over the nodes under each node of ``to`` (default: unit level).

        Parameters
        ----------
        level
            The finer level holding ``values`` (e.g. ``"micro"``, the nuclei of spot data).
        values
            ``(n_nodes_at_level, ...)`` array.
        to
            Coarser level to average into; ``None``: ``unit_level``.

        Returns
        -------
        ``(n_nodes_at_to, ...)`` float array; nodes without any child get 0.

        Examples
        --------
        >>> import numpy as np
        >>> import sigmma_sc as sg
        >>> h = sg.pp.build_hierarchy(sg.datasets.synthetic(100, n_genes=10, seed=0))  # 100 cells, 4 niches
        >>> h.children_mean("micro", np.arange(100.0), to="meso").round(1)  # mean cell index per niche
        array([24. , 70.2, 23.1, 76.8])
        """
        to = self.unit_level if to is None else to
        values = np.asarray(values)
        if len(values) != self.levels[level].n_nodes:
            raise ValueError(f"values has {len(values)} rows; level {level!r} has {self.levels[level].n_nodes} nodes.")
        anc = self.ancestors(level, to)
        n_to = self.levels[to].n_nodes
        counts = np.bincount(anc, minlength=n_to).astype(np.float64)
        agg = sp.csr_matrix((np.ones(len(anc)), (anc, np.arange(len(anc)))), shape=(n_to, len(anc)))
        flat = values.reshape(len(values), -1).astype(np.float64, copy=False)
        out = np.asarray(agg @ flat) / np.maximum(counts, 1)[:, None]
        return out.reshape((n_to,) + values.shape[1:])

    def _require(self, level: str) -> None:
        if level not in self.levels:
            raise KeyError(f"level {level!r} not in this hierarchy (levels: {self._names}).")

    # -- storage ----------------------------------------------------------------------------
    def to_uns(self) -> dict[str, Any]:
        """Plain arrays, scalars and strings that survive ``sdata.write`` / ``read_zarr``.

        Sparse ``members`` are stored as ``members_indptr`` / ``members_indices`` (values are 1).

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> h = sg.pp.build_hierarchy(sg.datasets.synthetic(100, n_genes=10, seed=0))
        >>> d = h.to_uns()
        >>> Hierarchy.from_uns(d).levels.keys()
        dict_keys(['micro', 'meso', 'macro'])
        """
        levels: dict[str, Any] = {}
        for name, lv in self.levels.items():
            d: dict[str, Any] = {
                "centers_um": lv.centers_um,
                "section": lv.section,
                "fov_um": np.float64(lv.fov_um),
                "edges": lv.edges,
            }
            if lv.parent is not None:
                d["parent"] = lv.parent
            if lv.members is not None:
                m = lv.members.tocsr()
                m.sort_indices()
                d["members_indptr"] = m.indptr.astype(np.int64)
                d["members_indices"] = m.indices.astype(np.int64 if m.shape[1] >= 2**31 else np.int32)
                d["members_n_units"] = np.int64(m.shape[1])
            levels[name] = d
        return {
            "version": np.int64(_UNS_VERSION),
            "sections": np.asarray(self.sections, dtype=object),
            "level_names": np.asarray(self._names, dtype=object),
            "unit_level": str(self.unit_level),
            "levels": levels,
        }

    @classmethod
    def from_uns(cls, d: dict[str, Any]) -> Hierarchy:
        """Rebuild a hierarchy from :meth:`to_uns` output (also after a zarr roundtrip).

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> sdata = sg.datasets.synthetic(100, n_genes=10, seed=0)
        >>> h = sg.pp.build_hierarchy(sdata)
        >>> h2 = Hierarchy.from_uns(sdata["table"].uns["sigmma"]["hierarchy"])
        >>> h2.unit_level, h2.levels["meso"].n_nodes
        ('micro', 4)
        """
        try:
            names = [str(n) for n in np.asarray(d["level_names"]).tolist()]
            levels = {}
            for name in names:
                ld = d["levels"][name]
                members = None
                if "members_indptr" in ld:
                    indptr = np.asarray(ld["members_indptr"], dtype=np.int64)
                    indices = np.asarray(ld["members_indices"])
                    n_units = int(np.asarray(ld["members_n_units"]))
                    members = sp.csr_matrix(
                        (np.ones(len(indices), np.float32), indices, indptr), shape=(len(indptr) - 1, n_units)
                    )
                levels[name] = Level(
                    name=name,
                    centers_um=np.asarray(ld["centers_um"]),
                    section=np.asarray(ld["section"]),
                    fov_um=float(np.asarray(ld["fov_um"])),
                    edges=np.asarray(ld["edges"]),
                    parent=np.asarray(ld["parent"]) if "parent" in ld else None,
                    members=members,
                )
            return cls(
                sections=[str(s) for s in np.asarray(d["sections"]).tolist()],
                levels=levels,
                unit_level=str(d["unit_level"]),
            )
        except KeyError as err:
            raise ValueError(
                f"stored hierarchy lacks {err}; it was written by another version. Rebuild it with "
                "sigmma_sc.pp.build_hierarchy(sdata)."
            ) from None


# ---------------------------------------------------------------------------------------------
# array-level builders
# ---------------------------------------------------------------------------------------------
def square_niches(
    xy_um: np.ndarray, section: np.ndarray, size_um: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Assign points to square tiles of side ``size_um``, per section, on the grid of multiples of ``size_um``.

    The grid is fixed in the section's coordinates rather than started at its lowest point, so a
    crop or a spatial block of a section gets exactly the tiles of the whole section.

    Parameters
    ----------
    xy_um
        ``(n, 2)`` points in microns.
    section
        ``(n,)`` section codes.
    size_um
        Tile side.

    Returns
    -------
    ``niche`` ``(n,)`` tile of each point; per occupied tile (sorted by section, column, row):
    ``centers`` ``(m, 2)`` tile centres, ``niche_section`` ``(m,)``, ``ij`` ``(m, 2)`` integer tile
    coordinates.

    Examples
    --------
    >>> import numpy as np
    >>> niche, centers, sec, ij = square_niches(np.array([[5.0, 5], [15, 5], [150, 5]]), np.zeros(3, int), 100)
    >>> niche.tolist(), centers.tolist()
    ([0, 0, 1], [[50.0, 50.0], [150.0, 50.0]])
    """
    if size_um <= 0:
        raise ValueError(f"niche size must be positive microns, got {size_um}.")
    xy_um = np.asarray(xy_um, dtype=np.float64)
    section = np.asarray(section, dtype=np.int64)
    n_sec = int(section.max()) + 1 if len(section) else 0
    origin = np.full((n_sec, 2), np.inf)
    np.minimum.at(origin, section, xy_um)
    origin = np.floor(origin / size_um) * size_um
    ij = np.floor((xy_um - origin[section]) / size_um).astype(np.int64)
    span = int(ij.max()) + 2 if len(ij) else 1
    key = (section * span + ij[:, 0]) * span + ij[:, 1]
    uniq, niche = np.unique(key, return_inverse=True)
    u_sec, rest = np.divmod(uniq, span * span)
    u_ij = np.stack(np.divmod(rest, span), 1)
    centers = origin[u_sec] + (u_ij + 0.5) * size_um
    return niche.astype(np.int64), centers, u_sec.astype(np.int64), u_ij


def grid_adjacency(ij: np.ndarray, section: np.ndarray) -> np.ndarray:
    """Edges between occupied tiles that touch by a side or a corner (8-neighbourhood), per section.

    Examples
    --------
    >>> import numpy as np
    >>> grid_adjacency(np.array([[0, 0], [1, 1], [3, 3]]), np.zeros(3, int)).tolist()
    [[0, 1], [1, 0]]
    """
    ij = np.asarray(ij, dtype=np.int64)
    section = np.asarray(section, dtype=np.int64)
    if not len(ij):
        return np.zeros((2, 0), np.int64)
    span = int(ij.max()) + 3
    key = (section * span + ij[:, 0] + 1) * span + ij[:, 1] + 1
    order = np.argsort(key)
    sk = key[order]
    rows, cols = [], []
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di == 0 and dj == 0:
                continue
            q = key + di * span + dj
            pos = np.minimum(np.searchsorted(sk, q), len(sk) - 1)
            hit = sk[pos] == q
            rows.append(np.flatnonzero(hit))
            cols.append(order[pos[hit]])
    edges = np.vstack([np.concatenate(rows), np.concatenate(cols)])
    return edges[:, np.lexsort((edges[1], edges[0]))]


def ring_members(centers_um: np.ndarray, section: np.ndarray, radius_um: float) -> sp.csr_matrix:
    """``(n, n)`` 0/1 CSR: node ``j`` is in the region of node ``i`` when within ``radius_um`` (same section).

    The diagonal is always set (a region holds its own centre node).

    Examples
    --------
    >>> import numpy as np
    >>> ring_members(np.array([[0.0, 0], [100, 0], [500, 0]]), np.zeros(3, int), 150).toarray().astype(int).tolist()
    [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    from scipy.spatial import cKDTree

    centers_um = np.asarray(centers_um, dtype=np.float64)
    section = np.asarray(section, dtype=np.int64)
    n = len(centers_um)
    rows, cols = [np.arange(n)], [np.arange(n)]
    for s in np.unique(section):
        idx = np.flatnonzero(section == s)
        pairs = cKDTree(centers_um[idx]).query_pairs(radius_um, output_type="ndarray")
        if len(pairs):
            rows += [idx[pairs[:, 0]], idx[pairs[:, 1]]]
            cols += [idx[pairs[:, 1]], idx[pairs[:, 0]]]
    r, c = np.concatenate(rows), np.concatenate(cols)
    m = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(n, n))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def _one_hot(index: np.ndarray, n_rows: int) -> sp.csr_matrix:
    """``(n_rows, len(index))`` 0/1 CSR with a 1 at ``(index[u], u)``: members of disjoint groups."""
    n = len(index)
    return sp.csr_matrix((np.ones(n, np.float32), (index, np.arange(n))), shape=(n_rows, n))


def default_fovs(unit_kind: str, unit_diameter_um: float, niche_size_um: float, region_radius_um: float) -> dict:
    """Per-level fields of view (microns) when not given.

    micro: :attr:`Defaults.MICRO_FOV_UM` (a nucleus / cell and its neighbours). meso: the
    subgraph (spot diameter or niche side) with 50% context, at least :attr:`Defaults.MESO_FOV_UM`.
    macro: the region's diameter, at least :attr:`Defaults.MACRO_FOV_UM`.

    Examples
    --------
    >>> default_fovs("spot", 100.0, 100.0, 250.0)
    {'micro': 32.0, 'meso': 150.0, 'macro': 500.0}
    """
    sub = unit_diameter_um if unit_kind == "spot" else niche_size_um
    return {
        Levels.MICRO: float(Defaults.MICRO_FOV_UM),
        Levels.MESO: float(max(Defaults.MESO_FOV_UM, 1.5 * sub)),
        Levels.MACRO: float(max(Defaults.MACRO_FOV_UM, 2 * region_radius_um)),
    }


def _level(name, fovs, centers_um, section, edges, parent, members) -> Level:
    # The builders below make three levels each; positional, so each level reads as one line.
    return Level(name, centers_um, section, fovs[name], edges, parent, members)


def spot_hierarchy(
    xy_um: np.ndarray,
    section: np.ndarray,
    sections: list[str],
    *,
    spot_edges: np.ndarray,
    nuclei_xy_um: np.ndarray | None,
    nuclei_spot: np.ndarray | None,
    fovs: dict[str, float],
    region_radius_um: float,
) -> Hierarchy:
    """Hierarchy of spot data from arrays: nuclei (optional) -> spots -> regions.

    Parameters
    ----------
    xy_um, section
        Spot centres (microns) and section codes, in table order.
    sections
        Section names.
    spot_edges
        ``(2, E)`` spot graph (from :func:`~sigmma_sc.pp.spatial_graphs`).
    nuclei_xy_um, nuclei_spot
        Nucleus centres and the table row of their spot; ``None``: no micro level.
    fovs
        ``{level: fov_um}``.
    region_radius_um
        Spots within this distance of a spot form its region.

    Returns
    -------
    The :class:`Hierarchy` (``unit_level="meso"``).

    Examples
    --------
    >>> import numpy as np
    >>> xy = np.array([[0.0, 0], [200, 0]])
    >>> h = spot_hierarchy(xy, np.zeros(2, int), ["s"], spot_edges=np.array([[0, 1], [1, 0]]),
    ...     nuclei_xy_um=None, nuclei_spot=None, fovs={"meso": 150.0, "macro": 500.0}, region_radius_um=250.0)
    >>> h.levels["macro"].members.toarray().tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    n = len(xy_um)
    levels: dict[str, Level] = {}
    if nuclei_xy_um is not None:
        nuclei_spot = np.asarray(nuclei_spot, dtype=np.int64)
        nuclei_section = np.asarray(section)[nuclei_spot] if len(nuclei_spot) else np.zeros(0, np.int64)
        nuclei_edges = grouped_delaunay_edges(nuclei_xy_um, nuclei_spot)
        levels[Levels.MICRO] = _level(Levels.MICRO, fovs, nuclei_xy_um, nuclei_section, nuclei_edges, nuclei_spot, None)
    identity = sp.identity(n, dtype=np.float32, format="csr")
    levels[Levels.MESO] = _level(Levels.MESO, fovs, xy_um, section, spot_edges, np.arange(n, dtype=np.int64), identity)
    regions = ring_members(xy_um, section, region_radius_um)
    levels[Levels.MACRO] = _level(Levels.MACRO, fovs, xy_um, section, spot_edges, None, regions)
    return Hierarchy(sections=list(sections), levels=levels, unit_level=Levels.MESO)


def cell_hierarchy(
    xy_um: np.ndarray,
    section: np.ndarray,
    sections: list[str],
    *,
    cell_edges: np.ndarray,
    fovs: dict[str, float],
    niche_size_um: float,
    region_radius_um: float,
) -> Hierarchy:
    """Hierarchy of cell data from arrays: cells -> square niches -> niche + ring of niches.

    Parameters
    ----------
    xy_um, section
        Cell centres (microns) and section codes, in table order.
    sections
        Section names.
    cell_edges
        ``(2, E)`` cell graph (from :func:`~sigmma_sc.pp.spatial_graphs`).
    fovs
        ``{level: fov_um}``.
    niche_size_um
        Side of the square niches.
    region_radius_um
        Niches whose centres lie within this distance form a region.

    Returns
    -------
    The :class:`Hierarchy` (``unit_level="micro"``).

    Examples
    --------
    >>> import numpy as np
    >>> xy = np.random.default_rng(0).uniform(0, 400, (500, 2))
    >>> h = cell_hierarchy(xy, np.zeros(500, int), ["s"], cell_edges=np.zeros((2, 0), int),
    ...     fovs={"micro": 32.0, "meso": 150.0, "macro": 500.0}, niche_size_um=100, region_radius_um=250)
    >>> h.levels["meso"].n_nodes, int(h.levels["meso"].members.sum())
    (16, 500)
    """
    n = len(xy_um)
    niche, centers, niche_section, ij = square_niches(xy_um, section, niche_size_um)
    m = len(centers)
    niche_members = _one_hot(niche, m)
    niche_edges = grid_adjacency(ij, niche_section)
    ring = ring_members(centers, niche_section, region_radius_um)
    # Niches are disjoint, so ring @ members stays 0/1.
    region_members = (ring @ niche_members).tocsr()
    region_members.data[:] = 1.0
    identity = sp.identity(n, dtype=np.float32, format="csr")
    niche_parent = np.arange(m, dtype=np.int64)
    levels = {
        Levels.MICRO: _level(Levels.MICRO, fovs, xy_um, section, cell_edges, niche, identity),
        Levels.MESO: _level(Levels.MESO, fovs, centers, niche_section, niche_edges, niche_parent, niche_members),
        Levels.MACRO: _level(Levels.MACRO, fovs, centers, niche_section, niche_edges, None, region_members),
    }
    return Hierarchy(sections=list(sections), levels=levels, unit_level=Levels.MICRO)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def build_hierarchy(
    sdata: SpatialData,
    *,
    table_key: str = Keys.TABLE,
    micro_fov_um: float | None = None,
    meso_fov_um: float | None = None,
    macro_fov_um: float | None = None,
    niche_size_um: float = Defaults.NICHE_SIZE_UM,
    region_radius_um: float = Defaults.REGION_RADIUS_UM,
    nuclei: bool = True,
    graph_method: str | None = None,
    n_neighs: int | None = None,
    radius_um: float | None = None,
    nuclei_kwargs: dict[str, Any] | None = None,
    connectivity_key: str | None = None,
    key_added: str | None = None,
) -> Hierarchy:
    """Build the micro / meso / macro hierarchy of a slide and store it in the table.

    Spot data (``unit_kind == "spot"``): micro = nuclei segmented from the H&E
    (:func:`segment_nuclei` runs when the ``"{section}_nuclei"`` elements are missing), image
    only, joined by a Delaunay triangulation inside each spot; meso = the spots (the table units),
    joined by :func:`spatial_graphs`; macro = one region per spot, the spot plus every spot of its
    section within ``region_radius_um`` (same edges as meso).

    Cell data (``unit_kind == "cell"``: cells or fine bins): micro = the units, joined by
    :func:`spatial_graphs` (Delaunay cut at ``Defaults.CELL_GRAPH_RADIUS_UM`` for cells, the
    lattice for Visium HD bins); meso = square niches of side ``niche_size_um`` holding at least
    one unit (every unit in exactly one niche), joined when they touch by a side or a corner;
    macro = one region per niche, the niche plus the niches within ``region_radius_um``.

    Fields of view default to :func:`default_fovs`: micro 32 µm; meso the spot / niche size with
    50% context, at least 150 µm; macro the region's diameter, at least 500 µm.

    Parameters
    ----------
    sdata
        SpatialData with a table of units (see :func:`sigmma_sc.io.validate`).
    table_key
        Table of the units.
    micro_fov_um, meso_fov_um, macro_fov_um
        Side of each level's image view in microns.
    niche_size_um
        Niche side (cell data).
    region_radius_um
        Radius of the ring of subgraphs around a subgraph (macro regions).
    nuclei
        Spot data: build the micro level from nuclei (needs the H&E). ``False``: meso and macro only.
    graph_method, n_neighs, radius_um
        Unit graph options, see :func:`spatial_graphs` (``method``, ``n_neighs``, ``radius_um``).
    nuclei_kwargs
        Options for :func:`segment_nuclei` when it runs.
    connectivity_key
        Use this existing unit graph instead of building one, named as squidpy names it
        (``"spatial"`` for ``obsp["spatial_connectivities"]``, e.g. from
        :func:`squidpy.gr.spatial_neighbors`). It is read, never modified: its edges are made two-way
        and edges between sections are left out. Excludes ``graph_method`` / ``n_neighs`` /
        ``radius_um``.
    key_added
        Where the package's own unit graph goes (squidpy's ``key_added``), see
        :func:`spatial_graphs`: ``None`` writes ``"spatial"``, or ``"sigmma_spatial"`` when
        ``obsp["spatial_connectivities"]`` holds a graph the package did not write (that graph is
        kept as it is).

    Returns
    -------
    The :class:`Hierarchy`. Also written to the table: ``uns["sigmma"]["hierarchy"]``
    (:meth:`Hierarchy.to_uns`, with the ``obsp`` key of the unit graph it used under
    ``"unit_graph"``) and, unless ``connectivity_key`` is given, the package's unit graph in
    ``obsp["spatial_connectivities"]`` / ``obsp["spatial_distances"]`` (+ ``uns["spatial_neighbors"]``)
    or the ``key_added`` ones; nuclei elements when segmented. Nothing the package did not write is
    overwritten.

    Examples
    --------
    On the five her2st sections (segmenting the nuclei takes minutes):

    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.her2st()  # doctest: +SKIP
    >>> h = sg.pp.build_hierarchy(sdata)  # doctest: +SKIP

    On 49 Visium spots:

    >>> sdata = sg.datasets.visium_mouse_brain()
    >>> h = sg.pp.build_hierarchy(sdata)
    >>> {k: v.n_nodes for k, v in h.levels.items()}  # nuclei, spots, regions
    {'micro': 339, 'meso': 49, 'macro': 49}
    >>> h = sg.pp.get_hierarchy(sdata)  # later, also after sdata.write / read_zarr
    """
    for name, val in (("niche_size_um", niche_size_um), ("region_radius_um", region_radius_um)):
        if not np.isfinite(val) or val <= 0:
            raise ValueError(f"{name} must be a positive number of microns, got {val!r}.")
    if connectivity_key is not None and (graph_method, n_neighs, radius_um) != (None, None, None):
        raise ValueError(
            f"connectivity_key={connectivity_key!r} uses an existing graph; graph_method / n_neighs / radius_um "
            "build a new one. Pass one or the other."
        )
    with timed("hierarchy"):
        return _build_hierarchy(
            sdata,
            table_key=table_key,
            fov_um={Levels.MICRO: micro_fov_um, Levels.MESO: meso_fov_um, Levels.MACRO: macro_fov_um},
            niche_size_um=niche_size_um,
            region_radius_um=region_radius_um,
            nuclei=nuclei,
            graph_kwargs={"method": graph_method, "n_neighs": n_neighs, "radius_um": radius_um},
            nuclei_kwargs=nuclei_kwargs,
            connectivity_key=connectivity_key,
            key_added=key_added,
        )


def _build_hierarchy(
    sdata: SpatialData,
    *,
    table_key: str,
    fov_um: dict[str, float | None],
    niche_size_um: float,
    region_radius_um: float,
    nuclei: bool,
    graph_kwargs: dict[str, Any],
    nuclei_kwargs: dict[str, Any] | None,
    connectivity_key: str | None,
    key_added: str | None,
) -> Hierarchy:
    t0 = time.perf_counter()
    slide = validate(sdata, table_key=table_key, require_image=False)
    fovs = default_fovs(slide.unit_kind, slide.unit_diameter_um, niche_size_um, region_radius_um)
    for level, val in fov_um.items():
        if val is not None:
            if not np.isfinite(val) or val <= 0:
                raise ValueError(f"{level}_fov_um must be a positive number of microns, got {val!r}.")
            fovs[level] = float(val)
    new_graph = None
    new_nuclei: dict[str, Any] = {}
    if connectivity_key is not None:
        adj = read_unit_graph(slide.table, connectivity_key, slide.unit_section)
        graph_key = graph_keys(connectivity_key)[0]
        origin = f"obsp[{graph_key!r}] (connectivity_key={connectivity_key!r}, kept as it is)"
    else:
        key = unit_graph_key(slide.table, key_added)
        adj, dst, graph_uns = compute_unit_graph(slide, **graph_kwargs)
        new_graph = (adj, dst, graph_uns, key)
        graph_key = graph_keys(key)[0]
        origin = f"the package's {graph_uns['params']}, written to obsp[{graph_key!r}]"
    logger.info(f"unit graph: {origin}; mean degree {adj.nnz / max(adj.shape[0], 1):.2f}")
    unit_edges = graph_edges(adj)
    if slide.unit_kind == "spot":
        nuc = None
        if nuclei:
            missing = [s for s in slide.sections if nuclei_key(s) not in sdata.shapes]
            no_image = [s for s in missing if s not in slide.images]
            if no_image:
                raise ValueError(
                    f"section(s) {no_image} have neither nuclei elements nor an H&E image to segment them from. Add "
                    "the images or pass nuclei=False for a hierarchy without the micro level."
                )
            if missing:
                # Into a working copy: the nuclei reach sdata with the hierarchy, at the end, or not at all.
                work = light_copy(sdata, table_key=table_key)
                with timed("nuclei segmentation"):
                    segment_nuclei(work, table_key=table_key, section=missing, **(nuclei_kwargs or {}))
                new_nuclei = {nuclei_key(s): work.shapes[nuclei_key(s)] for s in missing}
                nuc = load_nuclei(replace(slide, sdata=work))
            else:
                nuc = load_nuclei(slide)
        h = spot_hierarchy(
            slide.xy_um,
            slide.unit_section,
            slide.sections,
            spot_edges=unit_edges,
            nuclei_xy_um=None if nuc is None else nuc["xy_um"],
            nuclei_spot=None if nuc is None else nuc["spot"],
            fovs=fovs,
            region_radius_um=region_radius_um,
        )
    else:
        h = cell_hierarchy(
            slide.xy_um,
            slide.unit_section,
            slide.sections,
            cell_edges=unit_edges,
            fovs=fovs,
            niche_size_um=niche_size_um,
            region_radius_um=region_radius_um,
        )
    stored = h.to_uns()
    stored[_UNIT_GRAPH] = graph_key
    # Everything is computed; now the writes.
    for name, element in new_nuclei.items():
        sdata.shapes[name] = element
    if new_graph is not None:
        adj, dst, graph_uns, key = new_graph
        write_unit_graph(slide.table, adj, dst, graph_uns, key=key)
    uns = slide.table.uns.setdefault(Keys.UNS, {})
    uns[Keys.HIERARCHY] = stored
    logger.info(
        "hierarchy: "
        + ", ".join(f"{k} {v.n_nodes} nodes / {v.edges.shape[1]} edges" for k, v in h.levels.items())
        + f" ({time.perf_counter() - t0:.1f} s)"
    )
    return h


def get_hierarchy(sdata: SpatialData, *, table_key: str = Keys.TABLE) -> Hierarchy:
    """Read the hierarchy stored by :func:`build_hierarchy`.

    Parameters
    ----------
    sdata
        SpatialData (also one read back with :func:`spatialdata.read_zarr`).
    table_key
        Table holding it.

    Returns
    -------
    The :class:`Hierarchy`.

    Raises
    ------
    KeyError
        No hierarchy stored, or it does not match the table.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.synthetic(100, n_genes=10, seed=0)
    >>> _ = sg.pp.build_hierarchy(sdata)
    >>> h = sg.pp.get_hierarchy(sdata)  # later, also after sdata.write / read_zarr
    >>> h.unit_level, h.n_units
    ('micro', 100)
    """
    table = get_table(sdata, table_key)
    stored = table.uns.get(Keys.UNS, {}).get(Keys.HIERARCHY)
    if stored is None:
        raise KeyError(
            f"no hierarchy in table {table_key!r} (uns[{Keys.UNS!r}][{Keys.HIERARCHY!r}]); run "
            f"sigmma_sc.pp.build_hierarchy(sdata, table_key={table_key!r}) first."
        )
    h = Hierarchy.from_uns(stored)
    if h.n_units != table.n_obs:
        raise KeyError(
            f"the stored hierarchy has {h.n_units} units but table {table_key!r} has {table.n_obs} (was the table "
            "subset?). Rebuild it with sigmma_sc.pp.build_hierarchy(sdata)."
        )
    return h


def ensure_hierarchy(
    sdata: SpatialData,
    *,
    table_key: str = Keys.TABLE,
    require_image: bool = True,
    build: bool = True,
    **build_kwargs: Any,
) -> tuple[SlideData, Hierarchy]:
    """Return the validated slide and its hierarchy: the stored one, else built by :func:`build_hierarchy`.

    The one "get or build" rule of the package: image features, patches and the model all call it.
    A missing hierarchy, or one stored for another version of the table (other units), is rebuilt.

    Parameters
    ----------
    sdata
        SpatialData with a table of units.
    table_key
        Table of the units.
    require_image
        Every section needs an image (see :func:`sigmma_sc.io.validate`).
    build
        Build a missing hierarchy (``False``: raise instead).
    **build_kwargs
        Passed to :func:`build_hierarchy` when it runs.

    Returns
    -------
    ``(slide, hierarchy)``.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.synthetic(300, n_genes=20, seed=0)
    >>> slide, h = sg.pp.ensure_hierarchy(sdata)
    >>> sorted(h.levels) == sorted(sg.pp.get_hierarchy(sdata).levels)
    True
    """
    slide = validate(sdata, table_key=table_key, require_image=require_image)
    try:
        return slide, get_hierarchy(sdata, table_key=table_key)
    except (KeyError, ValueError) as err:
        if not build:
            raise ValueError(
                f"table {table_key!r} has no usable hierarchy ({err}); run sigmma_sc.pp.build_hierarchy(sdata) first."
            ) from err
        logger.info("no hierarchy in the table: building it with pp.build_hierarchy")
    return slide, build_hierarchy(sdata, table_key=table_key, **build_kwargs)
