"""Retrieval gallery: a query unit, its top-k cross-modal matches, their H&E and expression."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sigmma_sc._constants import Defaults, Keys
from sigmma_sc.io import SlideData, validate
from sigmma_sc.pp import iter_crops
from sigmma_sc.tl import retrieve

from . import _docs as d
from . import _utils as u

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

    from sigmma_sc.model import Sigmma

_PATCH_PX = 192


def _unit_index(slide: SlideData, query: int | str) -> int:
    if isinstance(query, str):
        pos = pd.Index(slide.table.obs_names).get_indexer([query])[0]
        if pos < 0:
            raise KeyError(f"query={query!r} is not a unit (obs_name) of table {slide.table_key!r}.")
        return int(pos)
    q = int(query)
    if not 0 <= q < slide.n_units:
        raise IndexError(f"query={q} is out of range: the table has {slide.n_units} units.")
    return q


def _patch(slide: SlideData, unit: int, fov_um: float) -> np.ndarray:
    """Read the H&E view of one unit (white when its section has no image)."""
    section = slide.sections[int(slide.unit_section[unit])]
    if section not in slide.images:
        return np.full((_PATCH_PX, _PATCH_PX, 3), 255, dtype=np.uint8)
    _, crops = next(iter_crops(slide.images[section], slide.xy_um[[unit]], fov_um, size_px=_PATCH_PX, batch_size=1))
    return crops[0]


def _expression(data: SlideData | AnnData, rows: np.ndarray, genes: list[str]) -> np.ndarray | None:
    """log1p expression of some units for the model genes (``None`` without counts)."""
    from anndata import AnnData

    if isinstance(data, AnnData):  # an embedded gallery such as model.reference: X is log1p(genes)
        x = data[rows][:, genes].X
        return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
    missing = [g for g in genes if g not in data.table.var_names]
    if missing or (data.table.n_vars == 0):
        return None
    try:
        return data.subset(rows).expression(genes).astype(np.float64)
    except (KeyError, ValueError):  # H&E-only table: no expression to show
        return None


@d.shared_docs
def retrieval(
    model: Sigmma,
    sdata: SpatialData,
    *,
    query: int | str,
    k: int = 5,
    direction: str = "img2expr",
    gallery: SpatialData | AnnData | None = None,
    table_key: str = Keys.TABLE,
    genes: list[str] | None = None,
    n_genes: int = 20,
    fov_um: float | None = None,
    cmap: str = "viridis",
    save: str | Path | None = None,
    show: bool | None = None,
) -> Figure:
    """Show a query unit and its top-``k`` cross-modal matches: H&E views and expression profiles.

    Runs :func:`sigmma_sc.tl.retrieve` and draws, on the top row, the H&E view of the query and
    of each match (titled with rank, unit and cosine similarity; a tick marks the query's own
    unit, the correct answer), and below a heatmap of the expression profiles (log1p) of the
    query and its matches over ``genes``.

    Parameters
    ----------
    model
        Fitted :class:`sigmma_sc.Sigmma`.
    sdata
        SpatialData holding the query unit.
    query
        The query unit: ``obs_name`` or row index of the table.
    k
        Matches shown.
    direction
        ``"img2expr"`` (the query's H&E finds expression profiles) or ``"expr2img"``.
    gallery
        Items searched (see :func:`sigmma_sc.tl.retrieve`): ``None`` the units of ``sdata``, a
        SpatialData, or an embedded AnnData such as ``model.reference`` (no H&E then: its
        matches show expression only).
    table_key
        Table of ``sdata`` (and of a SpatialData gallery).
    genes
        Genes of the heatmap (default: the ``n_genes`` model genes that vary most over the query
        and its matches).
    n_genes
        Genes shown when ``genes`` is not given.
    fov_um
        Side of the H&E views in microns (default: 1.5 unit diameters, at least
        ``Defaults.MESO_FOV_UM``).
    cmap
        Colormap of the heatmap.
    {save_show}

    {returns_figure}

    Examples
    --------
    Needs a fitted model (training takes minutes on a CPU):

    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.her2st(sections=["C2", "C3"])  # doctest: +SKIP
    >>> model = sg.tl.fit(sdata)  # doctest: +SKIP
    >>> fig = sg.pl.retrieval(model, sdata, query="C2_10", k=5)  # doctest: +SKIP

    With ``model`` fitted on 200 synthetic cells and ``test``, 200 other cells (see
    :class:`sigmma_sc.Sigmma`):

    >>> fig = sg.pl.retrieval(model, test, query="S1_0", k=5)
    >>> fig.axes[0].get_title().splitlines()
    ['query (H&E)', 'S1_0']
    """
    import matplotlib.pyplot as plt
    from anndata import AnnData

    slide = validate(sdata, table_key=table_key)
    q = _unit_index(slide, query)
    idx, scores = retrieve(model, sdata, direction=direction, k=k, gallery=gallery, table_key=table_key)
    hits, sims = idx[q], scores[q]
    if gallery is None:
        gal: SlideData | AnnData | None = slide
    elif isinstance(gallery, AnnData):
        gal = gallery
    else:
        gal = validate(gallery, table_key=table_key)
    fov = fov_um if fov_um is not None else max(Defaults.MESO_FOV_UM, 1.5 * slide.unit_diameter_um)
    model_genes = list(model.genes)
    q_expr = _expression(slide, np.array([q]), model_genes)
    m_expr = _expression(gal, hits, model_genes)
    rows = [x for x in (q_expr, m_expr) if x is not None]
    profile = np.concatenate(rows, axis=0) if rows else None
    if genes is None and profile is not None:
        # The most variable among well-expressed genes: sparse genes would make a noisy heatmap.
        pool = np.argsort(-profile.mean(axis=0), kind="stable")[: 5 * n_genes]
        top = pool[np.argsort(-profile[:, pool].var(axis=0), kind="stable")[:n_genes]]
        genes = [model_genes[i] for i in top]
    elif genes is not None:
        unknown = [g for g in genes if g not in model_genes]
        if unknown:
            raise KeyError(f"genes {unknown} are not model genes (model.genes).")

    q_name = str(slide.table.obs_names[q])
    gal_names = gal.table.obs_names if not isinstance(gal, AnnData) else gal.obs_names
    ncols = len(hits) + 1
    has_profile = profile is not None and bool(genes)
    heat_h = 0.3 * len(profile) + 1.2 if has_profile else 0.0  # rows of the heatmap + gene labels
    fig = plt.figure(figsize=(2.2 * ncols, 2.7 + heat_h))
    grid = fig.add_gridspec(
        2 if has_profile else 1, ncols, height_ratios=[2.7, heat_h] if has_profile else [1.0], hspace=0.35
    )
    what_q, what_m = ("H&E", "expression") if direction == "img2expr" else ("expression", "H&E")
    ax0 = fig.add_subplot(grid[0, 0])
    ax0.imshow(_patch(slide, q, fov))
    ax0.set_title(f"query ({what_q})\n{q_name}", fontsize=9, fontweight="bold")
    for j, (h, s) in enumerate(zip(hits, sims)):
        a = fig.add_subplot(grid[0, j + 1])
        name = str(gal_names[h])
        if isinstance(gal, AnnData):
            a.text(0.5, 0.5, "no H&E\n(embedded gallery)", ha="center", va="center", fontsize=8, color="0.4")
        else:
            a.imshow(_patch(gal, int(h), fov))
        own = gallery is None and int(h) == q
        a.set_title(
            f"#{j + 1} {name}{' ✓' if own else ''}\ncos {s:.2f}", fontsize=9, color="#1a7f37" if own else "black"
        )
    for a in fig.axes:
        a.set_xticks([])
        a.set_yticks([])
    # Scale of the views, once, under the query.
    ax0.set_xlabel(f"views: {u.format_um(fov)} wide", fontsize=8)
    if has_profile:
        gi = [model_genes.index(g) for g in genes]
        labels = [f"query {q_name}"] if q_expr is not None else []
        if m_expr is not None:
            labels += [f"#{j + 1} {gal_names[h]}" for j, h in enumerate(hits)]
        hm = fig.add_subplot(grid[1, :])
        im = hm.imshow(profile[:, gi], aspect="auto", cmap=cmap, interpolation="nearest")
        hm.grid(False)  # scanpy's figure params switch grids on, which would cut through the heatmap cells
        hm.set_yticks(np.arange(len(labels)))
        hm.set_yticklabels(labels, fontsize=8)
        hm.set_xticks(np.arange(len(genes)))
        hm.set_xticklabels(genes, rotation=90, fontsize=8)
        hm.set_title(
            f"{what_m} profiles of the matches (log1p)" if direction == "img2expr" else "expression profiles (log1p)",
            fontsize=9,
        )
        cb = fig.colorbar(im, ax=hm, fraction=0.03, pad=0.01)
        cb.set_label("log1p expression", fontsize=8)
    fig.suptitle(
        f"{'image → expression' if direction == 'img2expr' else 'expression → image'} retrieval, top {len(hits)}",
        fontsize=11,
    )
    return u.finish([ax0], save=save, show=show, return_fig=True)
