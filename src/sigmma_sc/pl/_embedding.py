"""UMAP of the joint (or any ``obsm``) embedding, scanpy style."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sigmma_sc._constants import Keys
from sigmma_sc._logging import logger

from . import _docs as d
from . import _utils as u

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

# obs columns added when several bases are stacked into one UMAP.
_STACK_COLS = ("embedding", "level", "modality")


def _umap(rep: np.ndarray, *, n_neighbors: int, random_state: int) -> np.ndarray:
    """2-D UMAP of ``rep`` through scanpy (neighbors + umap) on a throw-away AnnData."""
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(rep))]), obsm={"rep": rep})
    k = int(max(2, min(n_neighbors, len(rep) - 1)))
    sc.pp.neighbors(tmp, use_rep="rep", n_neighbors=k, random_state=random_state)
    sc.tl.umap(tmp, random_state=random_state)
    return np.asarray(tmp.obsm["X_umap"], dtype=np.float64)


def _parse_basis(key: str) -> tuple[str, str]:
    """``X_sigmma_meso_img`` -> ``("meso", "img")``; the joint keys map to level ``"all"``."""
    rest = key.removeprefix(Keys.X_SIGMMA).strip("_")
    parts = rest.split("_") if rest else []
    level = parts[0] if len(parts) == 2 else "all"
    modality = parts[-1] if parts else "joint"
    return level, modality


def _coordinates(
    adata: AnnData, bases: list[str], *, n_neighbors: int, random_state: int, key_added: str | None
) -> tuple[np.ndarray, pd.DataFrame]:
    """2-D coordinates of every (unit, basis) pair and the obs to colour them with."""
    if key_added is not None and len(bases) > 1:
        raise ValueError("key_added stores one UMAP per unit; it cannot be used with several bases.")
    missing = [b for b in bases if b not in adata.obsm]
    if missing:
        raise KeyError(
            f"obsm has no {missing}; it has {list(adata.obsm)}. Run sg.tl.fit(sdata) first, or pass basis= an "
            "existing obsm key."
        )
    obs = []
    for b in bases:
        o = adata.obs.copy()
        level, modality = _parse_basis(b)
        o[_STACK_COLS[0]], o[_STACK_COLS[1]], o[_STACK_COLS[2]] = b, level, modality
        obs.append(o)
    obs_all = pd.concat(obs, axis=0, ignore_index=True) if len(bases) > 1 else obs[0]
    for col in _STACK_COLS:
        obs_all[col] = pd.Categorical(obs_all[col], categories=list(dict.fromkeys(obs_all[col])))
    if len(bases) == 1:
        rep = np.asarray(adata.obsm[bases[0]])
        if rep.shape[1] == 2:
            return rep.astype(np.float64), obs_all
        cached = f"{bases[0]}_umap"
        if cached in adata.obsm:
            return np.asarray(adata.obsm[cached], dtype=np.float64), obs_all
    rep = np.concatenate([np.asarray(adata.obsm[b], dtype=np.float32) for b in bases], axis=0)
    logger.info(f"computing neighbors + UMAP of {bases} on a copy ({len(rep)} points)")
    xy = _umap(rep, n_neighbors=n_neighbors, random_state=random_state)
    if key_added is not None:
        adata.obsm[key_added] = xy
    return xy, obs_all


@d.shared_docs
def embedding(
    data: AnnData | SpatialData,
    *,
    basis: str | Sequence[str] = Keys.X_SIGMMA,
    color: str | Sequence[str] | None = Keys.SECTION,
    table_key: str = Keys.TABLE,
    layer: str | None = None,
    n_neighbors: int = 15,
    random_state: int = 0,
    key_added: str | None = None,
    size: float | None = None,
    alpha: float = 0.9,
    cmap: str | Any | None = "viridis",
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    palette: str | Sequence[Any] | dict[str, Any] | None = None,
    groups: Sequence[str] | None = None,
    na_color: Any = u.NA_COLOR,
    title: str | Sequence[str] | None = None,
    ncols: int = 4,
    wspace: float | None = None,
    hspace: float | None = None,
    frameon: bool = False,
    legend_loc: str | None = "right margin",
    ax: Axes | None = None,
    return_fig: bool = False,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Axes | Figure:
    """Scatter plot of a UMAP of the SIGMMA embedding, coloured like :func:`scanpy.pl.umap`.

    The UMAP is computed with :func:`scanpy.pp.neighbors` and :func:`scanpy.tl.umap` on a
    throw-away copy: the user's AnnData is never modified unless ``key_added`` is given. A
    2-D basis is drawn as it is, and ``obsm[f"{basis}_umap"]`` is used when present.

    Several bases (e.g. ``["X_sigmma_meso_img", "X_sigmma_meso_expr"]``) are stacked into one
    UMAP and can be coloured by the added obs columns ``"embedding"``, ``"level"`` and
    ``"modality"``: aligned modalities mix, levels separate by scale.

    Parameters
    ----------
    data
        AnnData (e.g. ``sdata["table"]`` after :func:`sigmma_sc.tl.fit`) or SpatialData.
    basis
        ``obsm`` key, or a list of keys to stack.
    color
        ``obs`` column(s) or gene(s); one panel each. Genes of a sigmma-sc table (raw counts,
        ``uns["sigmma_dataset"]``) are shown as ``log1p(normalize_total(counts, 1e4))``; otherwise
        ``X`` (or ``layer``) is read as stored.
    table_key
        Table to use when ``data`` is a SpatialData.
    layer
        Layer for gene colours.
    n_neighbors
        Neighbours of the kNN graph behind the UMAP.
    random_state
        Seed of neighbors and UMAP.
    key_added
        Store the computed UMAP in ``obsm[key_added]`` (one basis only). Use
        ``f"{basis}_umap"`` to reuse it in later calls.
    size
        Marker size in points² (default ``120000 / n_points``, clipped to ``[1, 60]``, as scanpy).
    alpha
        Marker opacity.
    {cmap}
    {palette}
    title
        Panel title(s); default the colour key.
    {panels}
    frameon
        Draw axes with ``UMAP1`` / ``UMAP2`` labels.
    {legend_loc}
    {ax_save_show}

    {returns_panels}

    Examples
    --------
    Any ``obsm`` key works; a 2-D one is drawn as it is (no UMAP):

    >>> import scanpy as sc
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.synthetic(300, n_genes=20, n_sections=2, seed=0)
    >>> sc.pp.pca(sdata["table"], n_comps=2)
    >>> fig = sg.pl.embedding(sdata, basis="X_pca", color=["section", "cell_type"])

    After training (minutes on a CPU), the SIGMMA embeddings, modalities stacked:

    >>> model = sg.tl.fit(sdata)  # doctest: +SKIP
    >>> ax = sg.pl.embedding(sdata, basis=["X_sigmma_meso_img", "X_sigmma_meso_expr"], color="modality")  # doctest: +SKIP

    The same with ``model``, fitted on ``train`` (200 synthetic cells, see :class:`sigmma_sc.Sigmma`):

    >>> ax = sg.pl.embedding(train, basis=["X_sigmma_meso_img", "X_sigmma_meso_expr"], color="modality")
    """
    adata = u.as_table(data, table_key)
    bases = [basis] if isinstance(basis, str) else list(basis)
    colors: list[str | None] = [color] if color is None or isinstance(color, str) else list(color)
    xy, obs = _coordinates(adata, bases, n_neighbors=n_neighbors, random_state=random_state, key_added=key_added)
    n = len(xy)
    s = float(np.clip(120000 / max(n, 1), 1, 60)) if size is None else size
    titles = [title] * len(colors) if title is None or isinstance(title, str) else list(title)
    if len(titles) != len(colors):
        raise ValueError(f"title has {len(titles)} entries for {len(colors)} colours.")
    if ax is not None and len(colors) > 1:
        raise ValueError(f"ax= draws one panel but {len(colors)} colours were asked.")
    if ax is not None or len(colors) == 1:
        axs = [u.single_axes(ax, figsize=(5.0, 4.5))]
    else:
        wspace = 0.45 if wspace is None else wspace
        _, axs = u.panel_grid(len(colors), ncols=ncols, panel_size=(5.0, 4.5), wspace=wspace, hspace=hspace)
    style = u.ColorStyle(palette, cmap, vmin, vmax, groups, na_color)
    rng = np.random.default_rng(random_state)
    for a, c, t in zip(axs, colors, titles):
        cv = _color_values(adata, obs, c, layer=layer, n_bases=len(bases))
        if cv.kind == "none":
            rgba, key = np.tile(np.array([[0.4, 0.4, 0.4, 1.0]]), (n, 1)), None
        else:
            rgba, key = u.unit_colors(cv, style, uns_colors=adata.uns.get(f"{c}_colors"))
        # Categories in random order (no group hides another); continuous values high on top.
        order = rng.permutation(n) if cv.kind != "continuous" else np.argsort(np.nan_to_num(cv.values, nan=-np.inf))
        a.scatter(xy[order, 0], xy[order, 1], c=rgba[order], s=s, alpha=alpha, linewidths=0, rasterized=n > 5000)
        a.set_title(c if t is None else t, fontsize=11)
        a.set_aspect("equal", adjustable="datalim")
        if frameon:
            a.set_xlabel("UMAP1")
            a.set_ylabel("UMAP2")
            a.set_xticks([])
            a.set_yticks([])
        else:
            a.set_axis_off()
        if cv.kind == "categorical":
            u.add_legend(a, key, title=None, loc=legend_loc)
        elif cv.kind == "continuous":
            u.add_colorbar(a, key, cv.label)
    return u.finish(axs, save=save, show=show, return_fig=return_fig)


def _color_values(adata: AnnData, obs: pd.DataFrame, key: str | None, *, layer: str | None, n_bases: int) -> Any:
    """Colour values over the stacked points: obs columns from ``obs``, genes tiled over the bases."""
    if key is None:
        return u.ColorValues("none", None, "")
    from_obs = u.obs_color(obs, key)
    if from_obs is not None:
        return from_obs
    # sigmma tables hold raw counts: genes are shown log1p-normalised, as in the spatial maps.
    expression = u.table_slide(adata).expression if Keys.DATASET in adata.uns and layer is None else None
    cv = u.resolve_color(adata, key, layer=layer, expression=expression)
    return u.ColorValues(cv.kind, np.tile(cv.values, n_bases), cv.label)
