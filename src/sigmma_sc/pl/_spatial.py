"""Maps over the H&E: obs columns, genes or predicted genes; one panel per colour key and section."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sigmma_sc._constants import Keys
from sigmma_sc.io import SlideData, validate
from sigmma_sc.tl import pearson_per_gene

from . import _docs as d
from . import _utils as u

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

# Padding around the units of a section, in unit diameters: the tissue edge stays visible.
_PAD_DIAMETERS = 1.5
_PANEL = (5.0, 5.0)
# Rendered panel width in pixels (5 in at 150 dpi) and the unit size from which units get a rim.
_PANEL_PX = 750
_OUTLINE_MIN_PX = 10
# scanpy's image names -> pyramid level when the SpatialData has no element of that name.
_LEVEL_NAMES = {"hires": 0, "lowres": -1}
# Space between panels (fraction of a panel): default, and when a legend sits between two panels.
_WSPACE, _WSPACE_LEGEND = 0.35, 0.6


@dataclass
class _Layer:
    """What one map draws: units (positions, section codes) and their resolved colours."""

    xy: np.ndarray
    section: np.ndarray
    color: u.ColorValues
    uns_colors: Sequence[Any] | None


@dataclass(frozen=True)
class MapStyle:
    """How a map is drawn, apart from what it shows (shared by every panel of a figure)."""

    colors: u.ColorStyle = field(default_factory=u.ColorStyle)
    img: bool = True
    level: int | None = None
    img_alpha: float = 1.0
    alpha: float = 1.0
    size: float = 1.0
    colorbar: bool = True
    scalebar: bool = True
    frameon: bool = False
    outline: bool | None = None
    crop_coord: tuple[float, float, float, float] | None = None

    def with_limits(self, values: np.ndarray | None) -> MapStyle:
        """Return the style with ``vmin`` / ``vmax`` resolved to numbers over ``values`` (``None``: unchanged)."""
        if values is None:
            return self
        lo, hi = u.color_limits(values, self.colors.vmin, self.colors.vmax)
        return replace(self, colors=replace(self.colors, vmin=lo, vmax=hi))


def _image_choice(data: Any, img_key: Any) -> tuple[str | dict[str, str] | None, int | None]:
    """Resolve ``img_key`` to ``(image element(s) for io.validate, pyramid level)``."""
    if img_key is None:
        return None, None
    if isinstance(img_key, Mapping):
        return dict(img_key), None
    if isinstance(img_key, (int, np.integer)) and not isinstance(img_key, bool):
        return None, int(img_key)
    names = list(getattr(data, "images", None) or {})
    if isinstance(img_key, str):
        if img_key in names:
            return img_key, None
        scale = re.fullmatch(r"scale(\d+)", img_key)
        if scale:
            return None, int(scale[1])
        if img_key in _LEVEL_NAMES:
            named = [n for n in names if n.endswith(f"_{img_key}_image")]
            return (named[0], None) if len(named) == 1 else (None, _LEVEL_NAMES[img_key])
    raise KeyError(
        f"img_key={img_key!r} is neither an image element (sdata.images has {names}) nor a pyramid level "
        "(an int, 'scaleN', 'hires' or 'lowres')."
    )


def _open(data: SpatialData | AnnData, table_key: str, image_key: str | dict[str, str] | None) -> SlideData:
    """Validate a SpatialData, or describe an AnnData with ``obsm["spatial"]`` in microns (no H&E)."""
    if hasattr(data, "tables"):
        return validate(data, table_key=table_key, image_key=image_key)
    return u.table_slide(data, table_key)


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
    style: MapStyle,
    *,
    title: str,
    legend_loc: str | None = None,
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
    diameter = slide.unit_diameter_um * style.size
    bbox = style.crop_coord or u.bbox_of(xy, pad=_PAD_DIAMETERS * slide.unit_diameter_um)
    if style.img and section in slide.images:
        u.draw_he(ax, slide.images[section], bbox, alpha=style.img_alpha, level=style.level)
    if lay.color.kind == "none":
        u.draw_units(ax, xy, diameter, "none", edgecolor="black", linewidth=0.6, alpha=style.alpha)
    else:
        vals = lay.color.values[mask]
        sub = u.ColorValues(lay.color.kind, vals, lay.color.label)
        rgba, key = u.unit_colors(sub, style.colors, uns_colors=lay.uns_colors, present=legend_present)
        # High values on top so hot spots are not hidden under their neighbours (cells overlap).
        order = (
            np.argsort(np.nan_to_num(np.asarray(vals, dtype=float), nan=-np.inf)) if sub.kind == "continuous" else None
        )
        outline = style.outline
        if outline is None:
            # A thin white rim separates adjacent spots and lifts them off the purple H&E; on
            # dense small units (cells, Visium HD bins) it would only paint a white lattice.
            span = max(bbox[1] - bbox[0], bbox[3] - bbox[2])
            outline = diameter / span * _PANEL_PX >= _OUTLINE_MIN_PX
        edge = "white" if outline else "none"
        u.draw_units(ax, xy, diameter, rgba, alpha=style.alpha, edgecolor=edge, linewidth=0.3, order=order)
        if sub.kind == "categorical":
            u.add_legend(ax, key, title=lay.color.label, loc=legend_loc)
        elif style.colorbar:
            u.add_colorbar(ax, key, lay.color.label)
    u.set_view(ax, bbox, frameon=style.frameon)
    if style.scalebar:
        u.add_scalebar(ax)
    ax.set_title(title, fontsize=11)
    return bbox


@d.shared_docs
def spatial(
    sdata: SpatialData | AnnData,
    *,
    color: str | Sequence[str | None] | None = None,
    table_key: str = Keys.TABLE,
    library_id: str | Sequence[str] | None = None,
    sections: str | Sequence[str] | None = None,
    adata: AnnData | None = None,
    layer: str | None = None,
    img: bool = True,
    img_key: int | str | Mapping[str, str] | None = None,
    img_alpha: float = 1.0,
    alpha: float = 1.0,
    size: float = 1.0,
    palette: str | Sequence[Any] | dict[str, Any] | None = None,
    groups: Sequence[str] | None = None,
    na_color: Any = u.NA_COLOR,
    cmap: str | Any | None = "viridis",
    vmin: float | str | None = None,
    vmax: float | str | None = "p99",
    share_scale: bool = True,
    title: str | Sequence[str] | None = None,
    ncols: int = 4,
    wspace: float | None = None,
    hspace: float | None = None,
    frameon: bool = False,
    scalebar: bool = True,
    legend_loc: str | None = "right margin",
    colorbar: bool = True,
    outline: bool | None = None,
    crop_coord: tuple[float, float, float, float] | None = None,
    ax: Axes | None = None,
    return_fig: bool = False,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Axes | Figure:
    """Units coloured by obs columns, genes or predicted genes, over the H&E of each section.

    Units (spots, cells, bins) are drawn as discs of their true diameter in microns on the
    section's H&E. Categorical keys get a legend (scanpy colours from ``uns["<key>_colors"]``
    when present), continuous keys a colour bar; every panel has a scale bar in microns. As in
    :func:`scanpy.pl.spatial`, ``color`` may be a list: one panel per key and section (key by
    key, ``ncols`` panels a row).

    Parameters
    ----------
    sdata
        SpatialData with an H&E per section (see :func:`sigmma_sc.io.validate`), or an AnnData
        with ``obsm["spatial"]`` in microns (maps without H&E).
    color
        ``obs`` column(s) (categorical or numeric) or gene(s); a list draws one panel per key.
        Genes of the table are shown as ``log1p(normalize_total(counts, 1e4))``; with ``adata=``
        they are read from ``adata.X`` as stored (predictions are already on the log1p scale).
        ``None`` draws unit outlines.
    {table_key}
    {library_id}
    adata
        Take ``color`` from this AnnData instead of the table, e.g. the output of
        :func:`sigmma_sc.tl.predict_expression`. Its ``obs_names`` are matched to the table's
        units; units not in the table are placed by ``obsm["spatial"]`` (microns) and
        ``obs["section"]``.
    layer
        Read genes from this layer as stored (no normalisation).
    {img}
    alpha
        Opacity of the units.
    {size}
    {palette}
    {cmap}
    {share_scale}
    title
        Panel title(s): one string (prefixed to each panel's default) or one per panel. Default:
        the section for one key, the key for one section, else both.
    {panels}
    {map_frame}
    {legend_loc}
    colorbar
        Draw a colour bar for continuous values.
    outline
        Thin white rim around each unit (default: when units are drawn at least ~10 pixels wide).
    crop_coord
        View ``(x0, x1, y0, y1)`` in microns (default: the section's units plus a margin).
    {ax_save_show}

    {returns_panels}

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.synthetic(300, n_genes=20, n_sections=2, seed=0)
    >>> fig = sg.pl.spatial(sdata, color=["cell_type", "gene0"], library_id="S0")
    >>> [a.get_title() for a in fig.axes]  # two maps, then the gene's colour bar
    ['cell_type', 'gene0', '']
    >>> ax = sg.pl.spatial(sdata, color="gene0", library_id="S1", img_key="lowres")

    Both sections of ``gene0`` on one colour scale (``share_scale=False``: one scale each):

    >>> fig = sg.pl.spatial(sdata, color="gene0", ncols=2)

    Real Visium spots over their H&E (a crop of the 10x adult mouse brain):

    >>> sdata = sg.datasets.visium_mouse_brain()
    >>> ax = sg.pl.spatial(sdata, color="Ttr", size=0.8, return_fig=True)
    """
    image_key, level = _image_choice(sdata, img_key)
    slide = _open(sdata, table_key, image_key)
    colors: list[str | None] = [color] if color is None or isinstance(color, str) else list(color)
    if not colors:
        raise ValueError("color is an empty list; pass a key, a list of keys or None.")
    layers = [_layer(slide, c, adata=adata, layer=layer) for c in colors]
    secs = _sections(slide, _library(library_id, sections), layers)
    n = len(colors) * len(secs)
    titles = _titles(title, colors, secs)
    if ax is not None and n > 1:
        raise ValueError(
            f"ax= draws one panel (one section, one colour) but {n} were asked ({len(colors)} colour(s) x "
            f"{len(secs)} section(s) {secs}); pass library_id='{secs[0]}' and one colour."
        )
    ncols = max(1, min(ncols, n))
    # The legend of a categorical key sits right of its group's first panel in the last column
    # (or its last panel): one legend per key, beside the maps it explains.
    legend_at = {}
    for i in range(len(colors)):
        group = range(i * len(secs), (i + 1) * len(secs))
        legend_at[i] = next(j for j in group if j % ncols == ncols - 1 or j == group[-1])
    inner_legend = legend_loc == "right margin" and any(
        layers[i].color.kind == "categorical" and j % ncols != ncols - 1 for i, j in legend_at.items()
    )
    panel_size = _panel_size(slide, layers[0], secs, crop_coord)
    if ax is not None or n == 1:
        axs = [u.single_axes(ax, figsize=panel_size)]
    else:
        wspace = wspace if wspace is not None else _WSPACE_LEGEND if inner_legend else _WSPACE
        _, axs = u.panel_grid(n, ncols=ncols, panel_size=panel_size, wspace=wspace, hspace=hspace)
    style = MapStyle(
        u.ColorStyle(palette, cmap, vmin, vmax, groups, na_color),
        img=img,
        level=level,
        img_alpha=img_alpha,
        alpha=alpha,
        size=size,
        colorbar=colorbar,
        scalebar=scalebar,
        frameon=frameon,
        outline=outline,
        crop_coord=crop_coord,
    )
    drawn_codes = [slide.sections.index(s) for s in secs]
    for i, lay in enumerate(layers):
        drawn = np.isin(lay.section, drawn_codes)
        continuous = lay.color.kind == "continuous"
        # One colour scale over every section of this key (numbers resolved once), unless asked otherwise.
        key_style = style.with_limits(lay.color.values[drawn] if continuous and share_scale else None)
        present = None
        if lay.color.kind == "categorical":  # the legend lists what any panel of this key shows
            present = set(pd.Series(np.asarray(lay.color.values)[drawn]).dropna().astype(str))
        for k, s in enumerate(secs):
            j = i * len(secs) + k
            loc = legend_loc if j == legend_at[i] else None
            map_panel(axs[j], slide, s, lay, key_style, title=titles[j], legend_loc=loc, legend_present=present)
    return u.finish(axs, save=save, show=show, return_fig=return_fig)


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


def _library(library_id: str | Sequence[str] | None, sections: str | Sequence[str] | None) -> Any:
    """``library_id`` (scanpy's name) or ``sections`` (this package's): the same argument."""
    if library_id is not None and sections is not None:
        raise ValueError("library_id and sections are the same argument (the sections to draw); pass one of them.")
    return library_id if library_id is not None else sections


def _sections(slide: SlideData, sections: str | Sequence[str] | None, layers: Sequence[_Layer]) -> list[str]:
    """Sections to draw: those asked for (checked), else every section that has units in a layer."""
    if sections is None:
        with_units = set().union(*(np.unique(lay.section).tolist() for lay in layers))
        return [s for i, s in enumerate(slide.sections) if i in with_units]
    secs = [sections] if isinstance(sections, str) else list(sections)
    unknown = [s for s in secs if s not in slide.sections]
    if unknown:
        raise KeyError(f"library_id / sections {unknown} not in the data; sections are {slide.sections}.")
    return secs


def _titles(title: str | Sequence[str] | None, colors: Sequence[str | None], secs: list[str]) -> list[str]:
    """Panel titles, key by key then section by section (the order panels are drawn in)."""
    default = [
        s if len(colors) == 1 else str(c or "units") if len(secs) == 1 else f"{c or 'units'} – {s}"
        for c in colors
        for s in secs
    ]
    if title is None:
        return default
    if isinstance(title, str):
        return [title] if len(default) == 1 else [f"{title} – {t}" for t in default]
    titles = list(title)
    if len(titles) != len(default):
        raise ValueError(f"title has {len(titles)} entries for {len(default)} panels ({default}).")
    return titles


@d.shared_docs
def predicted_vs_observed(
    pred: AnnData,
    observed: SpatialData | AnnData,
    *,
    genes: str | Sequence[str],
    table_key: str = Keys.TABLE,
    library_id: str | Sequence[str] | None = None,
    sections: str | Sequence[str] | None = None,
    img: bool = True,
    img_key: int | str | Mapping[str, str] | None = None,
    img_alpha: float = 1.0,
    size: float = 1.0,
    cmap: str | Any | None = "viridis",
    vmin: float | str | None = None,
    vmax: float | str | None = "p99",
    share_scale: bool = True,
    frameon: bool = False,
    scalebar: bool = True,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Figure:
    """Observed and predicted maps of some genes side by side, Pearson r in the title.

    One row per gene and section: the observed ``log1p(normalize_total)`` expression on the
    left, the prediction (e.g. from :func:`sigmma_sc.tl.predict_expression`) on the right, both
    over the H&E. ``r`` is Pearson's correlation over the units of that row (the per-gene score
    of :func:`sigmma_sc.tl.evaluate`). All maps of a gene share one colour scale by default, so
    a prediction that is too flat looks too flat; ``share_scale=False`` gives each map its own
    (predictions are smoother than counts: separate scales compare patterns, as r does).

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
    {library_id}
    {img}
    {size}
    {cmap}
    {share_scale}
    {map_frame}
    {save_show}

    {returns_figure}

    Examples
    --------
    A stand-in prediction (the observed expression of two genes plus noise) on a small synthetic
    tissue; in practice ``pred = sg.tl.predict_expression(model, sdata)``:

    >>> import anndata as ad
    >>> import numpy as np
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.synthetic(300, n_genes=20, n_sections=2, seed=0)
    >>> observed = sg.io.validate(sdata).expression(["gene0", "gene1"])
    >>> noisy = observed + np.random.default_rng(0).normal(0, 0.3, observed.shape)
    >>> pred = ad.AnnData(noisy, obs=sdata["table"].obs[[]])
    >>> pred.var_names = ["gene0", "gene1"]
    >>> fig = sg.pl.predicted_vs_observed(pred, sdata, genes=["gene0", "gene1"], library_id="S0")
    >>> fig.axes[1].get_title().startswith("gene0 predicted, r = ")
    True
    """
    image_key, level = _image_choice(observed, img_key)
    slide = _open(observed, table_key, image_key)
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
    all_units = _Layer(obs_sub.xy_um, obs_sub.unit_section, u.ColorValues("none", None, ""), None)
    secs = _sections(obs_sub, _library(library_id, sections), [all_units])
    _, axs = u.panel_grid(
        2 * len(genes) * len(secs), ncols=2, panel_size=_panel_size(obs_sub, all_units, secs, None), wspace=0.3
    )
    colors = u.ColorStyle(cmap=cmap, vmin=vmin, vmax=vmax)
    style = MapStyle(colors, img=img, level=level, img_alpha=img_alpha, size=size, scalebar=scalebar, frameon=frameon)
    drawn = np.isin(obs_sub.unit_section, [slide.sections.index(s) for s in secs])
    where = {s: f" – {s}" if len(secs) > 1 else "" for s in secs}
    panels = iter(axs)
    for j, g in enumerate(genes):
        maps = (
            (observed_x[:, j], f"{g} (log1p)", f"{g} observed"),
            (predicted_x[:, j], f"{g} predicted (log1p)", f"{g} predicted"),
        )
        # Observed and predicted maps of a gene, over every section drawn, on one scale.
        gene_style = style.with_limits(np.concatenate([v[drawn] for v, _, _ in maps]) if share_scale else None)
        for s in secs:
            in_sec = obs_sub.unit_section == slide.sections.index(s)
            r = pearson_per_gene(observed_x[in_sec, j : j + 1], predicted_x[in_sec, j : j + 1])[0]
            score = f", r = {r:.2f}" if np.isfinite(r) else ", r undefined (constant)"
            for k, (vals, label, name) in enumerate(maps):
                lay = _Layer(obs_sub.xy_um, obs_sub.unit_section, u.ColorValues("continuous", vals, label), None)
                title = f"{name}{score if k == 1 else ''}{where[s]}"
                map_panel(next(panels), obs_sub, s, lay, gene_style, title=title)
    return u.finish(axs, save=save, show=show, return_fig=True)
