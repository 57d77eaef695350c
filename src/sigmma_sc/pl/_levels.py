"""The micro / meso / macro nodes of one region over the H&E."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sigmma_sc._constants import Keys, Levels
from sigmma_sc.io import validate
from sigmma_sc.pp import Hierarchy, get_hierarchy

from . import _docs as d
from . import _utils as u

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

# A typical nucleus / cell is ~8 µm across: micro nodes are drawn at that size, in microns.
_NODE_DIAMETER_UM = 8.0
# Colours chosen to stand out on pink / purple H&E (no reds or purples).
_COLORS = {
    "macro": "black",
    "ring": "#00e5ff",
    "centre": "#ffd400",
    "micro": "#39ff14",
    "micro_other": "white",
    "edge": "#00e5ff",
}


def _square(ax: Axes, center: np.ndarray, side: float, **kwargs: Any) -> Any:
    from matplotlib.patches import Rectangle

    patch = Rectangle((center[0] - side / 2, center[1] - side / 2), side, side, fill=False, **kwargs)
    ax.add_patch(patch)
    return patch


def _edges(ax: Axes, centers: np.ndarray, edges: np.ndarray, keep: np.ndarray, **kwargs: Any) -> None:
    """Draw the edges whose both ends are in ``keep`` (each undirected edge once)."""
    from matplotlib.collections import LineCollection

    inside = np.zeros(len(centers), dtype=bool)
    inside[keep] = True
    e = edges[:, inside[edges[0]] & inside[edges[1]] & (edges[0] < edges[1])]
    if e.shape[1]:
        ax.add_collection(LineCollection(np.stack([centers[e[0]], centers[e[1]]], axis=1), **kwargs))


def _key(label: str, color: str, *, marker: str = "o", filled: bool = False, line: bool = False, ms: float = 8) -> Any:
    """Make a legend entry: a marker (hollow in ``color``, or ``color`` with a black rim), optionally on a line."""
    from matplotlib.lines import Line2D

    face, edge = (color, "black") if filled else ("none", color)
    return Line2D(
        [],
        [],
        marker=marker,
        ls="-" if line else "",
        color=color,
        lw=1,
        mfc=face,
        mec=edge,
        mew=1.5,
        ms=ms,
        label=label,
    )


def _region_index(sdata: SpatialData, hier: Hierarchy, region: int | str | None, table_key: str) -> int:
    """Macro node of ``region``: an index, a unit's obs_name, or the most central region of the first section."""
    macro = hier.levels[Levels.MACRO]
    if isinstance(region, str):
        names = pd.Index(sdata.tables[table_key].obs_names)
        pos = names.get_indexer([region])[0]
        if pos < 0:
            raise KeyError(
                f"region={region!r} is not a unit (obs_name) of table {table_key!r}; e.g. {list(names[:3])}."
            )
        return int(hier.unit_nodes(Levels.MACRO)[pos])
    if region is None:
        on = np.flatnonzero(macro.section == 0)
        mid = np.median(macro.centers_um[on], axis=0)
        return int(on[np.argmin(np.linalg.norm(macro.centers_um[on] - mid, axis=1))])
    r = int(region)
    if not 0 <= r < macro.n_nodes:
        raise IndexError(f"region={r} is out of range: the macro level has {macro.n_nodes} regions.")
    return r


@d.shared_docs
def levels(
    sdata: SpatialData,
    *,
    region: int | str | None = None,
    table_key: str = Keys.TABLE,
    img_alpha: float = 1.0,
    title: str | None = None,
    legend_loc: str | None = "right margin",
    frameon: bool = False,
    scalebar: bool = True,
    ax: Axes | None = None,
    return_fig: bool = False,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Axes | Figure:
    """Draw the micro / meso / macro nodes of one region over the H&E.

    Shows what the model sees at each scale around one region: the macro view (square) and the
    units of the region (the centre unit and its ring of neighbours within the region radius),
    the meso view of the centre unit and the edges of the meso graph, and the micro nodes
    (nuclei segmented from the H&E for spot data, cells for single-cell data) with their graph
    and one micro view.

    Parameters
    ----------
    sdata
        SpatialData whose table holds the hierarchy (:func:`sigmma_sc.pp.build_hierarchy`).
    region
        Region to draw: a macro node index, the ``obs_name`` of a unit (its region), or ``None``
        for the most central region of the first section.
    table_key
        Table holding the hierarchy.
    img_alpha
        Opacity of the H&E.
    title
        Axes title (default: the region and its section).
    {legend_loc}
    {map_frame}
    {ax_save_show}

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` (the :class:`~matplotlib.figure.Figure` with
    ``return_fig=True``).

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.synthetic(300, n_genes=20, n_sections=2, seed=0)
    >>> hier = sg.pp.build_hierarchy(sdata)
    >>> ax = sg.pl.levels(sdata, region=0)

    Spots (her2st, ~180 spots and their nuclei; segmenting the nuclei takes a minute):

    >>> sdata = sg.datasets.her2st(sections=["C2"])  # doctest: +SKIP
    >>> hier = sg.pp.build_hierarchy(sdata)  # doctest: +SKIP
    >>> ax = sg.pl.levels(sdata, region="C2_10")  # doctest: +SKIP

    The same on 49 Visium spots of a mouse brain and their nuclei (seconds):

    >>> sdata = sg.datasets.visium_mouse_brain()
    >>> hier = sg.pp.build_hierarchy(sdata)
    >>> ax = sg.pl.levels(sdata, region=0)
    """
    slide = validate(sdata, table_key=table_key)
    hier = get_hierarchy(sdata, table_key=table_key)
    missing = [lv for lv in (Levels.MESO, Levels.MACRO) if lv not in hier.levels]
    if missing:
        raise ValueError(f"the hierarchy has no {missing} level(s); rebuild it with sg.pp.build_hierarchy(sdata).")
    r = _region_index(sdata, hier, region, table_key)
    macro, meso = hier.levels[Levels.MACRO], hier.levels[Levels.MESO]
    section = hier.sections[int(macro.section[r])]
    centre = macro.centers_um[r]
    units = (
        macro.members[r].indices if macro.members is not None else np.flatnonzero(hier.unit_nodes(Levels.MACRO) == r)
    )
    meso_of_unit = hier.unit_nodes(Levels.MESO)
    region_meso = np.unique(meso_of_unit[units])
    # Macro's parent link is one region per meso node: the region's own subgraph is its centre.
    own = np.flatnonzero(meso.parent == r) if meso.parent is not None else np.array([], dtype=np.int64)
    centre_meso = (
        int(own[0])
        if own.size
        else int(region_meso[np.argmin(np.linalg.norm(meso.centers_um[region_meso] - centre, axis=1))])
    )

    half = 0.5 * macro.fov_um * 1.15
    bbox = (centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half)
    ax = u.single_axes(ax, figsize=(6.0, 6.0))
    if section in slide.images:
        u.draw_he(ax, slide.images[section], bbox, alpha=img_alpha)
    spot_units = hier.unit_level == Levels.MESO
    _edges(ax, meso.centers_um, meso.edges, region_meso, colors=_COLORS["edge"], linewidths=1.0, alpha=0.8, zorder=3)
    ring = region_meso[region_meso != centre_meso]
    if spot_units:
        # Spots: the region's spots as rings of their true diameter, the centre spot in another colour.
        for nodes, color, lw in ((ring, _COLORS["ring"], 1.6), ([centre_meso], _COLORS["centre"], 2.4)):
            u.draw_units(
                ax, meso.centers_um[nodes], slide.unit_diameter_um, "none", edgecolor=color, linewidth=lw, zorder=4
            )
        what_meso, marker, filled = "spot", "o", False
    else:
        for nodes, color, s_, z in ((region_meso, _COLORS["ring"], 30, 5), ([centre_meso], _COLORS["centre"], 60, 6)):
            ax.scatter(
                *meso.centers_um[nodes].T, marker="D", s=s_, c=color, edgecolors="black", linewidths=0.5, zorder=z
            )
        what_meso, marker, filled = "niche", "D", True
    handles = [
        _key(f"meso: centre {what_meso}", _COLORS["centre"], marker=marker, filled=filled, ms=10),
        _key(f"macro: region ({len(region_meso)} {what_meso}s)", _COLORS["ring"], marker=marker, filled=filled),
        _key("meso graph edges", _COLORS["edge"], marker="", line=True),
    ]

    micro = hier.levels.get(Levels.MICRO)
    if micro is not None and micro.parent is not None:
        in_region = np.flatnonzero(np.isin(micro.parent, region_meso))
        in_centre = in_region[micro.parent[in_region] == centre_meso]
        others = np.setdiff1d(in_region, in_centre)
        _edges(ax, micro.centers_um, micro.edges, in_centre, colors=_COLORS["micro"], linewidths=0.6, zorder=5)
        for nodes, color, lw, z in ((others, "micro_other", 0.3, 5), (in_centre, "micro", 0.4, 6)):
            u.draw_units(
                ax,
                micro.centers_um[nodes],
                _NODE_DIAMETER_UM,
                _COLORS[color],
                edgecolor="black",
                linewidth=lw,
                zorder=z,
            )
        what = "nuclei" if spot_units else "cells"
        handles += [
            _key(
                f"micro: {what} of the centre + graph ({len(in_centre)})",
                _COLORS["micro"],
                filled=True,
                line=True,
                ms=5,
            ),
            _key(f"micro: other {what} of the region", _COLORS["micro_other"], filled=True, ms=5),
        ]
        if in_centre.size:
            first = in_centre[
                np.argmin(np.linalg.norm(micro.centers_um[in_centre] - meso.centers_um[centre_meso], axis=1))
            ]
            _square(ax, micro.centers_um[first], micro.fov_um, edgecolor=_COLORS["micro"], lw=1.5, zorder=7)
            handles.append(_key(f"micro view ({micro.fov_um:g} µm)", _COLORS["micro"], marker="s"))
    _square(ax, meso.centers_um[centre_meso], meso.fov_um, edgecolor=_COLORS["centre"], lw=1.5, ls="--", zorder=7)
    _square(ax, centre, macro.fov_um, edgecolor=_COLORS["macro"], lw=1.5, ls="--", zorder=7)
    handles += [
        _key(f"meso view ({meso.fov_um:g} µm)", _COLORS["centre"], marker="s", ms=10),
        _key(f"macro view ({macro.fov_um:g} µm)", _COLORS["macro"], marker="s", ms=12),
    ]
    u.set_view(ax, bbox, frameon=frameon)
    if scalebar:
        u.add_scalebar(ax)
    if legend_loc not in (None, "none"):
        kw = (
            {"loc": "center left", "bbox_to_anchor": (1.01, 0.5), "frameon": False}
            if legend_loc == "right margin"
            else {"loc": legend_loc}
        )
        ax.legend(handles=handles, fontsize=8, **kw)
    ax.set_title(title if title is not None else f"region {r} ({section})", fontsize=11)
    return u.finish([ax], save=save, show=show, return_fig=return_fig)
