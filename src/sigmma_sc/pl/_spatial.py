"""Maps over the H&E: any obs column, gene or predicted gene, one panel per section."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sigmma_sc._constants import Keys

from . import _utils as u

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

    from sigmma_sc.io import SlideData

# Padding around the units of a section, in unit diameters: the tissue edge stays visible.
_PAD_DIAMETERS = 1.5
_PANEL = (5.0, 5.0)
# Rendered panel width in pixels (5 in at 150 dpi) and the unit size from which units get a rim.
_PANEL_PX = 750
_OUTLINE_MIN_PX = 10


@dataclass
class _Layer:
    """What one map draws: units (positions, section codes) and their resolved colours."""

    xy: np.ndarray
    section: np.ndarray
    color: u.ColorValues
    uns_colors: Sequence[Any] | None


def _slide(sdata: SpatialData, table_key: str) -> SlideData:
    from sigmma_sc.io import validate

    return validate(sdata, table_key=table_key)


def _layer(slide: SlideData, color: str | None, *, adata: AnnData | None, layer: str | None) -> _Layer:
    """Resolve ``color`` on the table, or on ``adata`` (e.g. predictions) placed on the table's units."""
    if adata is None:
        cv = u.resolve_color(slide.table, color, layer=layer, expression=slide.expression)
        uns = slide.table.uns.get(f"{color}_colors") if color is not None else None
        return _Layer(slide.xy_um, slide.unit_section, cv, uns)
    pos = pd.Index(slide.table.obs_names).get_indexer(adata.obs_names)
    if (pos >= 0).all():
        xy, sec = slide.xy_um[pos], slide.unit_section[pos]
    elif Keys.SPATIAL in adata.obsm and Keys.SECTION in adata.obs:
        # Units not in the table: trust adata's own microns and section names.
        names = adata.obs[Keys.SECTION].astype(str).to_numpy()
        unknown = sorted(set(names) - set(slide.sections))
        if unknown:
            raise ValueError(f"adata has sections {unknown} that are not in the SpatialData ({slide.sections}).")
        xy = np.asarray(adata.obsm[Keys.SPATIAL], dtype=np.float64)
        sec = np.array([slide.sections.index(s) for s in names])
    else:
        raise ValueError(
            f"adata's obs_names are not units of table {slide.table_key!r} ({int((pos < 0).sum())} unknown) and adata "
            f"has no obsm[{Keys.SPATIAL!r}] + obs[{Keys.SECTION!r}] to place them. Pass the AnnData returned by "
            "sg.tl.predict_expression on this SpatialData."
        )
    # Predictions are stored on the log1p scale: read them as they are.
    cv = u.resolve_color(adata, color, layer=layer)
    uns = adata.uns.get(f"{color}_colors") if color is not None else None
    return _Layer(xy, sec, cv, uns)


def map_panel(
    ax: Axes,
    slide: SlideData,
    section: str,
    lay: _Layer,
    *,
    img: bool,
    img_alpha: float,
    alpha: float,
    size: float,
    palette: Any,
    cmap: Any,
    vmin: Any,
    vmax: Any,
    groups: Sequence[str] | None,
    na_color: Any,
    legend_loc: str | None,
    colorbar: bool,
    scalebar: bool,
    frameon: bool,
    crop_coord: tuple[float, float, float, float] | None,
    title: str | None,
    outline: bool | None,
    legend_present: set[str] | None = None,
) -> tuple[float, float, float, float]:
    """Draw one section: H&E, units coloured by ``lay``, legend / colour bar, scale bar.

    Returns the view ``(x0, x1, y0, y1)`` in microns.
    """
    code = slide.sections.index(section)
    mask = lay.section == code
    if not mask.any():
        raise ValueError(f"section {section!r} has no units to draw.")
    xy = lay.xy[mask]
    diameter = slide.unit_diameter_um * size
    bbox = crop_coord or u.bbox_of(xy, pad=_PAD_DIAMETERS * slide.unit_diameter_um)
    if img and section in slide.images:
        u.draw_he(ax, slide.images[section], bbox, alpha=img_alpha)
    if lay.color.kind == "none":
        u.draw_units(ax, xy, diameter, "none", edgecolor="black", linewidth=0.6, alpha=alpha)
    else:
        vals = lay.color.values[mask]
        sub = u.ColorValues(lay.color.kind, vals, lay.color.label)
        rgba, key = u.unit_colors(
            sub,
            palette=palette,
            uns_colors=lay.uns_colors,
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            groups=groups,
            na_color=na_color,
            present=legend_present,
        )
        # High values on top so hot spots are not hidden under their neighbours (cells overlap).
        order = (
            np.argsort(np.nan_to_num(np.asarray(vals, dtype=float), nan=-np.inf)) if sub.kind == "continuous" else None
        )
        if outline is None:
            # A thin white rim separates adjacent spots and lifts them off the purple H&E; on
            # dense small units (cells, Visium HD bins) it would only paint a white lattice.
            span = max(bbox[1] - bbox[0], bbox[3] - bbox[2])
            outline = diameter / span * _PANEL_PX >= _OUTLINE_MIN_PX
        edge = "white" if outline else "none"
        u.draw_units(ax, xy, diameter, rgba, alpha=alpha, edgecolor=edge, linewidth=0.3, order=order)
        if sub.kind == "categorical":
            u.add_legend(ax, key, title=lay.color.label, loc=legend_loc)
        elif colorbar:
            u.add_colorbar(ax, key, lay.color.label)
    u.set_view(ax, bbox, frameon=frameon)
    if scalebar:
        u.add_scalebar(ax)
    ax.set_title(section if title is None else title, fontsize=11)
    return bbox


def spatial(
    sdata: SpatialData,
    *,
    color: str | None = None,
    table_key: str = Keys.TABLE,
    sections: str | Sequence[str] | None = None,
    adata: AnnData | None = None,
    layer: str | None = None,
    img: bool = True,
    img_alpha: float = 1.0,
    alpha: float = 1.0,
    size: float = 1.0,
    palette: str | Sequence[Any] | dict[str, Any] | None = None,
    cmap: str | Any | None = "viridis",
    vmin: float | str | None = None,
    vmax: float | str | None = "p99",
    groups: Sequence[str] | None = None,
    na_color: Any = u.NA_COLOR,
    title: str | Sequence[str] | None = None,
    ncols: int = 4,
    frameon: bool = False,
    legend_loc: str | None = "right margin",
    colorbar: bool = True,
    scalebar: bool = True,
    outline: bool | None = None,
    crop_coord: tuple[float, float, float, float] | None = None,
    ax: Axes | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Axes | Figure:
    """Units coloured by an obs column, a gene or a predicted gene, over the H&E of each section.

    Units (spots, cells, bins) are drawn as discs of their true diameter in microns on the
    section's H&E, read from the coarsest pyramid level that keeps about 1,200 pixels across the
    panel. Categorical keys get a legend (scanpy colours from ``uns[f"{color}_colors"]`` when
    present), continuous keys a colour bar; every panel has a scale bar in microns.

    Parameters
    ----------
    sdata
        SpatialData with an H&E per section (see :func:`sigmma_sc.io.validate`).
    color
        An ``obs`` column (categorical or numeric) or a gene. Genes of the table are shown as
        ``log1p(normalize_total(counts, 1e4))``; with ``adata=`` they are read from ``adata.X``
        as stored (predictions are already on the log1p scale). ``None`` draws unit outlines.
    table_key
        Table annotating the units.
    sections
        Section(s) to draw, one panel each (default: all, in table order).
    adata
        Take ``color`` from this AnnData instead of the table, e.g. the output of
        :func:`sigmma_sc.tl.predict_expression`. Its ``obs_names`` are matched to the table's
        units; units not in the table are placed by ``obsm["spatial"]`` (microns) and
        ``obs["section"]``.
    layer
        Read genes from this layer as stored (no normalisation).
    img
        Draw the H&E.
    img_alpha
        Opacity of the H&E.
    alpha
        Opacity of the units.
    size
        Unit diameter as a multiple of the true diameter (``0.5`` leaves the tissue visible
        between Visium spots).
    palette
        Categorical colours: dict category -> colour, list, or a colormap name.
    cmap
        Colormap for continuous values.
    vmin, vmax
        Colour limits: a number or a percentile such as ``"p99"`` (per panel). The default
        ``vmax="p99"`` keeps one hot spot from washing out the map.
    groups
        Categories to colour; the others are drawn in ``na_color``.
    na_color
        Colour of missing values and of categories outside ``groups``.
    title
        Panel title(s); default the section name.
    ncols
        Panels per row.
    frameon
        Draw axes with micron ticks instead of a bare image.
    legend_loc
        ``"right margin"``, ``None`` / ``"none"``, or a matplotlib legend location.
    colorbar
        Draw a colour bar for continuous values.
    scalebar
        Draw a scale bar.
    outline
        Thin white rim around each unit (default: when units are drawn at least ~10 pixels wide).
    crop_coord
        View ``(x0, x1, y0, y1)`` in microns (default: the section's units plus a margin).
    ax
        Draw into this axes (one section only).
    save
        Write the figure to this path (format from the suffix, default PNG).
    show
        Show the figure (default: only when not saving and the backend is interactive).

    Returns
    -------
    The axes for one section, else the figure.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.her2st(sections=["C2", "C3"])
    >>> fig = sg.pl.spatial(sdata, color="ERBB2")
    >>> ax = sg.pl.spatial(sdata, color="section", sections="C2")
    """
    slide = _slide(sdata, table_key)
    secs = _sections(slide, sections)
    lay = _layer(slide, color, adata=adata, layer=layer)
    titles = _titles(title, secs)
    kwargs = dict(
        img=img,
        img_alpha=img_alpha,
        alpha=alpha,
        size=size,
        palette=palette,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        groups=groups,
        na_color=na_color,
        legend_loc=legend_loc,
        colorbar=colorbar,
        scalebar=scalebar,
        frameon=frameon,
        crop_coord=crop_coord,
        outline=outline,
    )
    if ax is not None or len(secs) == 1:
        if ax is not None and len(secs) > 1:
            raise ValueError(f"ax= draws one section but {len(secs)} were asked; pass sections='{secs[0]}'.")
        ax = u.single_axes(ax, figsize=_panel_size(slide, lay, secs, crop_coord))
        map_panel(ax, slide, secs[0], lay, title=titles[0], **kwargs)
        u.savefig_or_show(ax.figure, save=save, show=show)
        return ax
    fig, axs = u.panel_grid(len(secs), ncols=ncols, panel_size=_panel_size(slide, lay, secs, crop_coord))
    present = None
    if lay.color.kind == "categorical":  # the one legend lists what any drawn panel shows
        drawn = np.isin(lay.section, [slide.sections.index(s) for s in secs])
        present = set(pd.Series(np.asarray(lay.color.values)[drawn]).dropna().astype(str))
    for a, s, t in zip(axs, secs, titles):
        # One legend for categorical keys: the right-most panel of the first row carries it.
        loc = legend_loc if a is axs[min(ncols, len(axs)) - 1] else None
        map_panel(a, slide, s, lay, title=t, legend_present=present, **{**kwargs, "legend_loc": loc})
    u.savefig_or_show(fig, save=save, show=show)
    return fig


def _panel_size(
    slide: SlideData, lay: _Layer, secs: list[str], crop_coord: tuple[float, float, float, float] | None
) -> tuple[float, float]:
    """Panel size following the sections' shape, so wide sections do not float in white space."""
    aspects = []
    for s in secs:
        xy = lay.xy[lay.section == slide.sections.index(s)]
        if len(xy) == 0:
            continue
        x0, x1, y0, y1 = crop_coord or u.bbox_of(xy, pad=_PAD_DIAMETERS * slide.unit_diameter_um)
        aspects.append((y1 - y0) / max(x1 - x0, 1e-9))
    aspect = max(aspects) if aspects else 1.0
    width = _PANEL[0]
    # The colour bar / legend takes ~15% of the width: the map itself is narrower than the panel.
    return width, float(np.clip(0.85 * width * aspect, 0.5 * width, 1.5 * width)) + 0.4


def _sections(slide: SlideData, sections: str | Sequence[str] | None) -> list[str]:
    if sections is None:
        return list(slide.sections)
    secs = [sections] if isinstance(sections, str) else list(sections)
    unknown = [s for s in secs if s not in slide.sections]
    if unknown:
        raise KeyError(f"sections {unknown} not in the data; sections are {slide.sections}.")
    return secs


def _titles(title: str | Sequence[str] | None, secs: list[str]) -> list[str | None]:
    if title is None:
        return [None] * len(secs)
    if isinstance(title, str):
        return [title if len(secs) == 1 else f"{title} – {s}" for s in secs]
    titles = list(title)
    if len(titles) != len(secs):
        raise ValueError(f"title has {len(titles)} entries for {len(secs)} sections.")
    return titles


def predicted_vs_observed(
    pred: AnnData,
    observed: SpatialData | AnnData,
    *,
    genes: str | Sequence[str],
    table_key: str = Keys.TABLE,
    sections: str | Sequence[str] | None = None,
    img: bool = True,
    img_alpha: float = 1.0,
    size: float = 1.0,
    cmap: str | Any | None = "viridis",
    vmin: float | str | None = None,
    vmax: float | str | None = "p99",
    share_scale: bool = False,
    frameon: bool = False,
    scalebar: bool = True,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Figure:
    """Observed and predicted maps of some genes side by side, Pearson r in the title.

    One row per gene and section: the observed ``log1p(normalize_total)`` expression on the
    left, the prediction (e.g. from :func:`sigmma_sc.tl.predict_expression`) on the right, both
    over the H&E. ``r`` is Pearson's correlation over the units of that row (the per-gene score
    of :func:`sigmma_sc.tl.evaluate`). Each map has its own colour bar unless ``share_scale``:
    predictions are smoother than counts, so separate scales compare patterns, shared scales
    compare levels.

    Parameters
    ----------
    pred
        Predicted expression, units x genes on the log1p scale; ``obs_names`` matching the
        observed table's units.
    observed
        SpatialData with the observed counts and the H&E (or an AnnData with
        ``obsm["spatial"]`` in microns: maps without H&E).
    genes
        Gene(s) to draw, present in both.
    table_key
        Table of ``observed``.
    sections
        Section(s) to draw (default: every section holding predicted units).
    img
        Draw the H&E.
    img_alpha
        Opacity of the H&E.
    size
        Unit diameter as a multiple of the true diameter.
    cmap
        Colormap.
    vmin, vmax
        Colour limits (numbers or percentiles such as ``"p99"``), per map.
    share_scale
        Use the observed map's limits for the prediction too.
    frameon
        Draw micron ticks.
    scalebar
        Draw a scale bar.
    save
        Write the figure to this path.
    show
        Show the figure (default: only when not saving and the backend is interactive).

    Returns
    -------
    The figure.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> pred = sg.tl.predict_expression(model, test_sdata)
    >>> fig = sg.pl.predicted_vs_observed(pred, test_sdata, genes=["ERBB2", "GRB7"])
    """
    from anndata import AnnData

    from sigmma_sc.tl._metrics import pearson_per_gene

    slide = _slide(observed, table_key) if not isinstance(observed, AnnData) else u.table_slide(observed, table_key)
    genes = [genes] if isinstance(genes, str) else list(genes)
    missing = [g for g in genes if g not in pred.var_names or g not in slide.table.var_names]
    if missing:
        raise KeyError(f"genes {missing} are not in both the prediction and the observed table.")
    pos = pd.Index(slide.table.obs_names).get_indexer(pred.obs_names)
    if (pos < 0).any():
        raise ValueError(
            f"{int((pos < 0).sum())} predicted units are not units of the observed table (e.g. "
            f"{list(pred.obs_names[pos < 0][:3])}); predict on the same SpatialData you compare with."
        )
    obs_sub = slide.subset(pos)
    observed_x = obs_sub.expression(genes)
    x = pred[:, genes].X
    predicted_x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
    present = [slide.sections[c] for c in dict.fromkeys(obs_sub.unit_section.tolist())]
    secs = present if sections is None else _sections(obs_sub, sections)
    rows = [(g, s) for g in genes for s in secs]
    all_units = _Layer(obs_sub.xy_um, obs_sub.unit_section, u.ColorValues("none", None, ""), None)
    fig, axs = u.panel_grid(2 * len(rows), ncols=2, panel_size=_panel_size(obs_sub, all_units, secs, None), wspace=0.3)
    kwargs = dict(
        img=img,
        img_alpha=img_alpha,
        alpha=1.0,
        size=size,
        palette=None,
        cmap=cmap,
        groups=None,
        na_color=u.NA_COLOR,
        legend_loc=None,
        colorbar=True,
        scalebar=scalebar,
        frameon=frameon,
        crop_coord=None,
        outline=None,
    )
    for i, (g, s) in enumerate(rows):
        j = genes.index(g)
        in_sec = obs_sub.unit_section == slide.sections.index(s)
        r = pearson_per_gene(observed_x[in_sec, j : j + 1], predicted_x[in_sec, j : j + 1])[0]
        obs_vals = observed_x[:, j].astype(np.float64)
        lo, hi = u.percentile_limits(obs_vals[in_sec], vmin, vmax)
        where = f" – {s}" if len(secs) > 1 else ""
        for k, (vals, label, name) in enumerate(
            ((obs_vals, f"{g} (log1p)", "observed"), (predicted_x[:, j], f"{g} predicted (log1p)", "predicted"))
        ):
            lay = _Layer(obs_sub.xy_um, obs_sub.unit_section, u.ColorValues("continuous", vals, label), None)
            limits = {"vmin": lo, "vmax": hi} if share_scale and k == 1 else {"vmin": vmin, "vmax": vmax}
            rtxt = f", r = {r:.2f}" if k == 1 and np.isfinite(r) else (", r undefined (constant)" if k == 1 else "")
            map_panel(axs[2 * i + k], obs_sub, s, lay, title=f"{g} {name}{rtxt}{where}", **kwargs, **limits)
    u.savefig_or_show(fig, save=save, show=show)
    return fig
