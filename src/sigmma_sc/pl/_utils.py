"""Drawing helpers shared by every ``sigmma_sc.pl`` function (private).

Everything that more than one plot needs lives here once: resolving a ``color`` key to values,
palettes, drawing units in microns over the H&E, colour bars, legends, scale bars, panel grids
and the scanpy-style ``save`` / ``show`` handling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sigmma_sc._constants import Keys
from sigmma_sc._logging import logger
from sigmma_sc.io import SectionImage, SlideData

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Matplotlib backends that cannot show a window: ``show`` is a no-op there (and would warn).
_NON_INTERACTIVE = {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template"}
# Pixels across a panel when the H&E is read from the pyramid: enough for a 6 inch panel at 200 dpi.
_HE_TARGET_PX = 1200
# Scale-bar lengths (microns) to choose from: the bar spans about a fifth of the view.
_NICE_UM = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000)
NA_COLOR = "#d3d3d3"


@dataclass
class ColorValues:
    """A ``color`` key resolved to per-unit values.

    Attributes
    ----------
    kind
        ``"categorical"``, ``"continuous"`` or ``"none"`` (no colour requested).
    values
        ``pd.Categorical`` (categorical) or float array (continuous); ``None`` for ``"none"``.
    label
        Text for the colour bar / legend title.
    """

    kind: str
    values: Any
    label: str


@dataclass(frozen=True)
class ColorStyle:
    """How values become colours: the scanpy arguments ``palette``, ``cmap``, ``vmin``, ``vmax``, ``groups``, ``na_color``."""

    palette: Any = None
    cmap: Any = "viridis"
    vmin: Any = None
    vmax: Any = None
    groups: Sequence[str] | None = None
    na_color: Any = NA_COLOR


def obs_color(obs: pd.DataFrame, key: str) -> ColorValues | None:
    """Read an ``obs`` column as colour values (``None`` when ``key`` is not a column)."""
    if key not in obs.columns:
        return None
    col = obs[key]
    if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object or col.dtype == bool:
        cat = col if isinstance(col.dtype, pd.CategoricalDtype) else col.astype(str).astype("category")
        return ColorValues("categorical", pd.Categorical(cat), key)
    return ColorValues("continuous", col.to_numpy(dtype=np.float64), key)


def stored_scale(values: np.ndarray) -> str:
    """Name the scale of values read as stored: ``counts`` (integers), ``log1p`` (small) or ``X``.

    log1p of counts normalised to 1e4 stays below ~10: larger values are not on that scale, and a
    colour bar must not claim they are.
    """
    finite = values[np.isfinite(values)]
    if finite.size and np.all(finite == np.round(finite)) and finite.max() > 1:
        return "counts"
    if finite.size == 0 or finite.max() <= 20:
        return "log1p"
    return "X"


def resolve_color(
    adata: AnnData,
    key: str | None,
    *,
    layer: str | None = None,
    expression: Any = None,
) -> ColorValues:
    """Turn ``color`` into values: an ``obs`` column first, then a gene (``var_names``).

    Parameters
    ----------
    adata
        Table holding the key.
    key
        ``obs`` column or gene name; ``None`` for no colour.
    layer
        Read genes from this layer as stored instead of log1p-normalised expression.
    expression
        Callable ``genes -> (n, len(genes))`` array giving log1p-normalised expression
        (``SlideData.expression``); ``None`` reads ``adata.X`` as stored (e.g. predictions, which
        are already on the log1p scale).

    Returns
    -------
    The resolved values.
    """
    if key is None:
        return ColorValues("none", None, "")
    from_obs = obs_color(adata.obs, key)
    if from_obs is not None:
        return from_obs
    if key in adata.var_names:
        if layer is not None:
            if layer not in adata.layers:
                raise KeyError(f"layer {layer!r} not in the table; layers are {list(adata.layers)}.")
            x = adata[:, key].layers[layer]
            label = f"{key} ({layer})"
        elif expression is not None:
            x = expression([key])
            label = f"{key} (log1p)"
        else:
            x = adata[:, key].X
            label = None
        x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        values = np.asarray(x, dtype=np.float64).ravel()
        return ColorValues("continuous", values, label or f"{key} ({stored_scale(values)})")
    raise KeyError(
        f"color={key!r} is neither an obs column nor a gene of the table. "
        f"obs columns: {list(adata.obs.columns)[:20]}; pass a gene from var_names (e.g. {list(adata.var_names[:3])})."
    )


def palette_for(
    categories: Sequence[str],
    palette: str | Sequence[Any] | Mapping[str, Any] | None = None,
    *,
    uns_colors: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Colour of each category, scanpy-compatible.

    Precedence: an explicit ``palette`` (dict, list or colormap name), then colours stored by
    scanpy in ``uns[f"{key}_colors"]`` (so clusters keep the colours they have in scanpy plots),
    then scanpy's default palettes.

    Parameters
    ----------
    categories
        Category names, in order.
    palette
        Dict category -> colour, list of colours (cycled), or a matplotlib colormap name.
    uns_colors
        ``adata.uns[f"{key}_colors"]`` when present.

    Returns
    -------
    Dict category -> colour.
    """
    import matplotlib as mpl

    cats = [str(c) for c in categories]
    n = len(cats)
    if isinstance(palette, Mapping):
        missing = [c for c in cats if c not in palette]
        if missing:
            raise ValueError(f"palette has no colour for categories {missing[:5]}; give one colour per category.")
        return {c: palette[c] for c in cats}
    if isinstance(palette, str):
        cmap = mpl.colormaps[palette]
        if getattr(cmap, "N", 256) < 256:  # qualitative map: take its colours in order
            return {c: cmap(i % cmap.N) for i, c in enumerate(cats)}
        return {c: cmap(i / max(n - 1, 1)) for i, c in enumerate(cats)}
    if palette is not None:
        cols = list(palette)
        return {c: cols[i % len(cols)] for i, c in enumerate(cats)}
    if uns_colors is not None and len(uns_colors) == n:
        return dict(zip(cats, uns_colors))
    from scanpy.plotting import palettes

    base = palettes.default_20 if n <= 20 else palettes.default_28 if n <= 28 else palettes.default_102
    return {c: base[i % len(base)] for i, c in enumerate(cats)}


def percentile_limits(values: np.ndarray, vmin: Any, vmax: Any) -> tuple[float | None, float | None]:
    """Resolve scanpy-style limits: a number, ``None`` or ``"pNN"`` (the NN-th percentile)."""
    finite = values[np.isfinite(values)]

    def one(v: Any) -> float | None:
        if v is None or finite.size == 0:
            return None if v is None else float("nan")
        if isinstance(v, str):
            if not v.startswith("p"):
                raise ValueError(f"vmin / vmax as a string must look like 'p99' (a percentile), got {v!r}.")
            return float(np.percentile(finite, float(v[1:])))
        return float(v)

    return one(vmin), one(vmax)


def color_limits(values: np.ndarray, vmin: Any, vmax: Any) -> tuple[float, float]:
    """Resolve ``vmin`` / ``vmax`` over ``values`` to two numbers (``None``: the data's min / max).

    Panels sharing a colour scale pass the numbers computed over all their units.

    Examples
    --------
    >>> import numpy as np
    >>> color_limits(np.arange(101.0), None, "p90")
    (0.0, 90.0)
    """
    values = np.asarray(values, dtype=np.float64)
    lo, hi = percentile_limits(values, vmin, vmax)
    finite = values[np.isfinite(values)]
    if lo is None:
        lo = float(finite.min()) if finite.size else 0.0
    if hi is None:
        hi = float(finite.max()) if finite.size else 1.0
    if hi <= lo:  # a constant map: keep one colour, not a division by zero
        hi = lo + 1.0
    return lo, hi


def unit_colors(
    cv: ColorValues,
    style: ColorStyle | None = None,
    *,
    uns_colors: Sequence[Any] | None = None,
    present: set[str] | None = None,
) -> tuple[np.ndarray, Any]:
    """RGBA per unit plus what the legend / colour bar needs.

    ``uns_colors``: scanpy's stored category colours; ``present``: categories the legend lists
    (default: those among ``cv.values``).

    Returns
    -------
    ``(rgba, key)`` where ``key`` is a dict category -> colour (categorical), a
    ``ScalarMappable`` (continuous) or ``None``.
    """
    import matplotlib as mpl
    from matplotlib.colors import Normalize, to_rgba

    style = style or ColorStyle()
    groups, na_color = style.groups, style.na_color
    if cv.kind == "categorical":
        cats = [str(c) for c in cv.values.categories]
        colors = palette_for(cats, style.palette, uns_colors=uns_colors)
        if groups is not None:
            unknown = [g for g in groups if g not in colors]
            if unknown:
                raise ValueError(f"groups {unknown} are not categories of {cv.label!r}: {cats[:10]}.")
            colors = {c: (col if c in groups else na_color) for c, col in colors.items()}
        lut = np.array([to_rgba(colors[c]) for c in cats] + [to_rgba(na_color)])
        codes = np.asarray(cv.values.codes)
        rgba = lut[np.where(codes < 0, len(cats), codes)]
        # The legend lists only categories that are drawn (one section of five: not all five names).
        if present is None:
            present = set(np.asarray(cv.values.categories)[np.unique(codes[codes >= 0])].astype(str))
        shown = {c: colors[c] for c in cats if (groups is None or c in groups) and c in present}
        return rgba, shown
    values = np.asarray(cv.values, dtype=np.float64)
    lo, hi = color_limits(values, style.vmin, style.vmax)
    norm = Normalize(vmin=lo, vmax=hi, clip=True)
    cmap = style.cmap
    cm = mpl.colormaps[cmap] if isinstance(cmap, str) else (cmap or mpl.colormaps["viridis"])
    rgba = cm(norm(np.nan_to_num(values, nan=lo)))
    rgba[~np.isfinite(values)] = to_rgba(na_color)
    return rgba, mpl.cm.ScalarMappable(norm=norm, cmap=cm)


def draw_units(
    ax: Axes,
    xy: np.ndarray,
    diameter: float | np.ndarray,
    rgba: np.ndarray | Any,
    *,
    alpha: float = 1.0,
    edgecolor: Any = "none",
    linewidth: float = 0.0,
    zorder: float = 2,
    order: np.ndarray | None = None,
) -> Any:
    """Draw units as circles whose diameter is in data units (microns), so they scale with zoom.

    ``order`` draws units in that order (e.g. high values last, on top).
    """
    from matplotlib.collections import EllipseCollection

    xy = np.asarray(xy, dtype=np.float64)
    d = np.broadcast_to(np.asarray(diameter, dtype=np.float64), (len(xy),))
    if order is not None:
        xy, d = xy[order], d[order]
        if isinstance(rgba, np.ndarray) and rgba.ndim == 2:
            rgba = rgba[order]
    coll = EllipseCollection(
        d,
        d,
        np.zeros(len(xy)),
        units="xy",
        offsets=xy,
        offset_transform=ax.transData,
        facecolors=rgba,
        edgecolors=edgecolor,
        linewidths=linewidth,
        alpha=alpha,
        zorder=zorder,
    )
    ax.add_collection(coll)
    return coll


def draw_he(
    ax: Axes,
    image: SectionImage,
    bbox_um: tuple[float, float, float, float],
    *,
    alpha: float = 1.0,
    target_px: int = _HE_TARGET_PX,
    level: int | None = None,
) -> np.ndarray:
    """Draw the part of a section's H&E under ``bbox_um = (x0, x1, y0, y1)`` in microns.

    The pyramid level is ``level`` when given (negative counts from the coarsest), else the
    coarsest one that still gives about ``target_px`` pixels across the view, so a whole-slide
    panel reads a thumbnail and a zoom reads full resolution. The image is placed with the
    section's pixel -> micron affine, so mirrored or rotated images sit under their units.
    Returns the pixels drawn.
    """
    from matplotlib.transforms import Affine2D

    x0, x1, y0, y1 = bbox_um
    if level is None:
        level = image.best_level(max(x1 - x0, y1 - y0) / target_px)
    elif not -image.n_levels <= level < image.n_levels:
        raise ValueError(
            f"img_key={level} is not a pyramid level of image {image.element!r}: it has levels 0 to {image.n_levels - 1}."
        )
    level %= image.n_levels
    corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]])
    cr = image.um_to_px(corners, level=level)
    c0, r0 = np.floor(cr.min(axis=0)).astype(int)
    c1, r1 = np.ceil(cr.max(axis=0)).astype(int) + 1
    pix = image.read(r0, r1, c0, c1, level=level)
    # level pixel (col, row) -> microns: scale to full resolution, then the section's inverse affine.
    f = image.level_factors[level]
    m = image.um_from_px @ np.diag([f, f, 1.0])
    trans = Affine2D(m) + ax.transData
    ax.imshow(
        pix,
        extent=(c0 - 0.5, c1 - 0.5, r1 - 0.5, r0 - 0.5),
        origin="upper",
        transform=trans,
        alpha=alpha,
        interpolation="antialiased",
        zorder=0,
    )
    return pix


def set_view(ax: Axes, bbox_um: tuple[float, float, float, float], *, frameon: bool = False) -> None:
    """Limit the axes to ``bbox_um`` with image orientation (y grows downwards), equal aspect."""
    x0, x1, y0, y1 = bbox_um
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    if frameon:
        ax.set_xlabel("x (µm)")
        ax.set_ylabel("y (µm)")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)


def bbox_of(xy: np.ndarray, *, pad: float) -> tuple[float, float, float, float]:
    """Bounding box ``(x0, x1, y0, y1)`` of points, padded by ``pad`` microns on every side."""
    lo = np.nanmin(xy, axis=0) - pad
    hi = np.nanmax(xy, axis=0) + pad
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def nice_length(span_um: float) -> float:
    """Pick a round scale-bar length close to a fifth of ``span_um``."""
    target = span_um / 5.0
    return float(min(_NICE_UM, key=lambda v: abs(np.log(v / target))))


def format_um(length_um: float) -> str:
    """``500 µm``, ``1 mm``, ``2.5 mm``."""
    if length_um >= 1000:
        return f"{length_um / 1000:g} mm"
    return f"{length_um:g} µm"


def add_scalebar(ax: Axes, *, length_um: float | None = None, loc: str = "lower right") -> None:
    """Add a scale bar in microns (the axes' data units) on a light box, readable over H&E."""
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    x0, x1 = ax.get_xlim()
    length = length_um if length_um is not None else nice_length(abs(x1 - x0))
    bar = AnchoredSizeBar(
        ax.transData,
        length,
        format_um(length),
        loc,
        pad=0.4,
        borderpad=0.5,
        sep=3,
        color="black",
        frameon=True,
        size_vertical=abs(x1 - x0) / 150,
        fontproperties=FontProperties(size=8),
    )
    bar.patch.set_facecolor("white")
    bar.patch.set_alpha(0.8)
    bar.patch.set_edgecolor("none")
    ax.add_artist(bar)


def add_colorbar(ax: Axes, mappable: Any, label: str) -> Any:
    """Attach a slim colour bar to ``ax`` (its own axes, so panels keep their size)."""
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    cax = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.08)
    cb = ax.figure.colorbar(mappable, cax=cax)
    cb.set_label(label, fontsize=9)
    cb.ax.tick_params(labelsize=8)
    return cb


def add_legend(
    ax: Axes,
    colors: Mapping[str, Any],
    *,
    title: str | None,
    loc: str | None = "right margin",
    marker: str = "o",
    fontsize: float = 9,
) -> Any:
    """Categorical legend. ``loc``: ``"right margin"`` (scanpy default), ``None`` / ``"none"``, or a matplotlib loc."""
    from matplotlib.lines import Line2D

    if loc is None or loc == "none" or not colors:
        return None
    handles = [
        Line2D([], [], marker=marker, linestyle="", markerfacecolor=c, markeredgecolor="none", markersize=8, label=k)
        for k, c in colors.items()
    ]
    ncol = 1 if len(handles) <= 14 else 2 if len(handles) <= 30 else 3
    if loc == "right margin":
        return ax.legend(
            handles=handles,
            title=title,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            frameon=False,
            fontsize=fontsize,
            title_fontsize=fontsize,
            ncol=ncol,
        )
    return ax.legend(handles=handles, title=title, loc=loc, fontsize=fontsize, title_fontsize=fontsize, ncol=ncol)


def panel_grid(
    n: int,
    *,
    ncols: int,
    panel_size: tuple[float, float] = (4.5, 4.5),
    wspace: float | None = None,
    hspace: float | None = None,
) -> tuple[Figure, list[Axes]]:
    """Make a figure of ``n`` panels in rows of ``ncols``; unused grid cells are removed.

    ``wspace`` / ``hspace`` ``None``: 0.35 / 0.25 of a panel.
    """
    import matplotlib.pyplot as plt

    wspace = 0.35 if wspace is None else wspace
    hspace = 0.25 if hspace is None else hspace
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axs = plt.subplots(
        nrows,
        ncols,
        figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
        squeeze=False,
        gridspec_kw={"wspace": wspace, "hspace": hspace},
    )
    flat = list(axs.ravel())
    for extra in flat[n:]:
        extra.remove()
    return fig, flat[:n]


def single_axes(ax: Axes | None, *, figsize: tuple[float, float]) -> Axes:
    """Return the user's ``ax`` or a new figure's axes."""
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=figsize)
    return ax


def savefig_or_show(fig: Figure, *, save: str | Path | None, show: bool | None, dpi: int = 150) -> None:
    """scanpy-style output: write ``save`` (any matplotlib format by suffix), show when asked.

    ``show=None`` shows the figure only when nothing is saved and the backend can show windows
    (so scripts and tests on the Agg backend never warn).
    """
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    if save is not None:
        path = Path(save)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        if not path.suffix:
            path = path.with_suffix(".png")
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        logger.info(f"saved figure to {path}")
    if show is None:
        show = save is None and mpl.get_backend().lower() not in _NON_INTERACTIVE
    if show:
        plt.show()


def finish(
    axes: Sequence[Axes], *, save: str | Path | None, show: bool | None, return_fig: bool = False
) -> Axes | Figure:
    """Save / show the figure of ``axes``, then return what the pl functions return.

    The figure with ``return_fig``, the axes when every panel is one axes, else the figure.
    """
    fig = axes[0].figure
    savefig_or_show(fig, save=save, show=show)
    if return_fig or len({id(a) for a in axes}) > 1:
        return fig
    return axes[0]


def as_table(data: Any, table_key: str) -> AnnData:
    """Return the AnnData behind ``data``: itself, or ``sdata.tables[table_key]``."""
    from anndata import AnnData

    if isinstance(data, AnnData):
        return data
    tables = getattr(data, "tables", None)
    if tables is None:
        raise TypeError(f"expected an AnnData or a SpatialData, got {type(data).__name__}.")
    if table_key not in tables:
        raise KeyError(f"table {table_key!r} not in the SpatialData; tables are {list(tables)}. Pass table_key=.")
    return tables[table_key]


def table_slide(data: AnnData, table_key: str = Keys.TABLE) -> SlideData:
    """Describe a bare AnnData as a :class:`~sigmma_sc.io.SlideData` without image.

    Reuses :meth:`SlideData.expression` (log1p of normalised counts) for tables that are not in a
    SpatialData. Units are placed by ``obsm["spatial"]`` (microns) when present.
    """
    info = data.uns.get(Keys.DATASET, {})
    sec = data.obs[Keys.SECTION].astype(str) if Keys.SECTION in data.obs else pd.Series("section", index=data.obs_names)
    sections = list(dict.fromkeys(sec))
    xy = (
        np.asarray(data.obsm[Keys.SPATIAL], dtype=np.float64)
        if Keys.SPATIAL in data.obsm
        else np.zeros((data.n_obs, 2))
    )
    if Keys.UNIT_DIAMETER in info:
        diameter = float(info[Keys.UNIT_DIAMETER])
    elif Keys.SPATIAL not in data.obsm:
        diameter = 1.0
    else:  # no stated size: discs as wide as 80% of the median nearest-neighbour distance
        from scipy.spatial import cKDTree

        dist = cKDTree(xy).query(xy, k=2)[0][:, 1] if len(xy) > 1 else np.ones(1)
        diameter = 0.8 * float(np.median(dist))
    return SlideData(
        sdata=None,
        table=data,
        table_key=table_key,
        sections=sections,
        unit_section=pd.Categorical(sec, categories=sections).codes.astype(np.int64),
        xy_um=xy,
        images={},
        technology=str(info.get(Keys.TECHNOLOGY, "custom")),
        unit_kind=str(info.get(Keys.UNIT_KIND, "spot")),
        unit_diameter_um=diameter,
        log_normalized=bool(info.get(Keys.LOG_NORMALIZED, False)),
    )
