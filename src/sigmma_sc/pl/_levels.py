"""The micro / meso / macro nodes of one region over the H&E."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sigmma_sc._constants import Keys, Levels

from . import _utils as u

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from spatialdata import SpatialData

    from sigmma_sc.pp import Hierarchy

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


def levels(
    sdata: SpatialData,
    *,
    region: int | str | None = None,
    table_key: str = Keys.TABLE,
    img_alpha: float = 1.0,
    title: str | None = None,
    frameon: bool = False,
    legend_loc: str | None = "right margin",
    scalebar: bool = True,
    ax: Axes | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Axes:
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
    frameon
        Draw micron ticks instead of a bare image.
    legend_loc
        ``"right margin"``, ``"none"`` or a matplotlib location.
    scalebar
        Draw a scale bar.
    ax
        Draw into this axes.
    save
        Write the figure to this path.
    show
        Show the figure (default: only when not saving and the backend is interactive).

    Returns
    -------
    The axes.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.her2st(sections=["C2"])
    >>> sg.pp.build_hierarchy(sdata)
    >>> ax = sg.pl.levels(sdata, region="C2_10")
    """
    from matplotlib.lines import Line2D

    from sigmma_sc.io import validate
    from sigmma_sc.pp import get_hierarchy

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
    handles = []

    spot_units = hier.unit_level == Levels.MESO
    _edges(ax, meso.centers_um, meso.edges, region_meso, colors=_COLORS["edge"], linewidths=1.0, alpha=0.8, zorder=3)
    if spot_units:
        # Spots: the region's spots as rings of their true diameter, the centre spot in another colour.
        ring = region_meso[region_meso != centre_meso]
        u.draw_units(
            ax,
            meso.centers_um[ring],
            slide.unit_diameter_um,
            "none",
            edgecolor=_COLORS["ring"],
            linewidth=1.6,
            zorder=4,
        )
        u.draw_units(
            ax,
            meso.centers_um[[centre_meso]],
            slide.unit_diameter_um,
            "none",
            edgecolor=_COLORS["centre"],
            linewidth=2.4,
            zorder=4,
        )
        handles += [
            Line2D(
                [], [], marker="o", ls="", mfc="none", mec=_COLORS["centre"], mew=2, ms=10, label="meso: centre spot"
            ),
            Line2D(
                [],
                [],
                marker="o",
                ls="",
                mfc="none",
                mec=_COLORS["ring"],
                mew=2,
                ms=10,
                label=f"macro: region ({len(region_meso)} spots)",
            ),
        ]
    else:
        ax.scatter(
            *meso.centers_um[region_meso].T,
            marker="D",
            s=30,
            c=_COLORS["ring"],
            edgecolors="black",
            linewidths=0.5,
            zorder=5,
        )
        ax.scatter(
            *meso.centers_um[[centre_meso]].T,
            marker="D",
            s=60,
            c=_COLORS["centre"],
            edgecolors="black",
            linewidths=0.5,
            zorder=6,
        )
        handles += [
            Line2D([], [], marker="D", ls="", mfc=_COLORS["centre"], mec="black", ms=7, label="meso: centre niche"),
            Line2D(
                [],
                [],
                marker="D",
                ls="",
                mfc=_COLORS["ring"],
                mec="black",
                ms=6,
                label=f"macro: region ({len(region_meso)} niches)",
            ),
        ]
    handles.append(Line2D([], [], color=_COLORS["edge"], lw=1, label="meso graph edges"))

    micro = hier.levels.get(Levels.MICRO)
    if micro is not None and micro.parent is not None:
        in_region = np.flatnonzero(np.isin(micro.parent, region_meso))
        in_centre = in_region[micro.parent[in_region] == centre_meso]
        others = np.setdiff1d(in_region, in_centre)
        _edges(ax, micro.centers_um, micro.edges, in_centre, colors=_COLORS["micro"], linewidths=0.6, zorder=5)
        u.draw_units(
            ax,
            micro.centers_um[others],
            _NODE_DIAMETER_UM,
            _COLORS["micro_other"],
            edgecolor="black",
            linewidth=0.3,
            alpha=0.9,
            zorder=5,
        )
        u.draw_units(
            ax,
            micro.centers_um[in_centre],
            _NODE_DIAMETER_UM,
            _COLORS["micro"],
            edgecolor="black",
            linewidth=0.4,
            zorder=6,
        )
        what = "nuclei" if spot_units else "cells"
        handles += [
            Line2D(
                [],
                [],
                marker="o",
                ls="-",
                color=_COLORS["micro"],
                mec="black",
                ms=5,
                lw=0.6,
                label=f"micro: {what} of the centre + graph ({len(in_centre)})",
            ),
            Line2D(
                [],
                [],
                marker="o",
                ls="",
                mfc=_COLORS["micro_other"],
                mec="black",
                ms=5,
                label=f"micro: other {what} of the region",
            ),
        ]
        if in_centre.size:
            first = in_centre[
                np.argmin(np.linalg.norm(micro.centers_um[in_centre] - meso.centers_um[centre_meso], axis=1))
            ]
            _square(ax, micro.centers_um[first], micro.fov_um, edgecolor=_COLORS["micro"], lw=1.5, zorder=7)
            handles.append(
                Line2D(
                    [],
                    [],
                    marker="s",
                    ls="",
                    mfc="none",
                    mec=_COLORS["micro"],
                    ms=8,
                    label=f"micro view ({micro.fov_um:g} µm)",
                )
            )
    _square(ax, meso.centers_um[centre_meso], meso.fov_um, edgecolor=_COLORS["centre"], lw=1.5, ls="--", zorder=7)
    _square(ax, centre, macro.fov_um, edgecolor=_COLORS["macro"], lw=1.5, ls="--", zorder=7)
    handles += [
        Line2D(
            [], [], marker="s", ls="", mfc="none", mec=_COLORS["centre"], ms=10, label=f"meso view ({meso.fov_um:g} µm)"
        ),
        Line2D(
            [],
            [],
            marker="s",
            ls="",
            mfc="none",
            mec=_COLORS["macro"],
            ms=12,
            label=f"macro view ({macro.fov_um:g} µm)",
        ),
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
    u.savefig_or_show(ax.figure, save=save, show=show)
    return ax
