"""Cross-modal retrieval with a fitted model: image -> expression and expression -> image."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import Defaults, Keys
from ..io import get_table
from ..model import Sigmma
from ._metrics import cosine_similarity, top_k

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

#: Retrieval directions: the query modality first.
DIRECTIONS: tuple[str, ...] = ("img2expr", "expr2img")
# Queries scored per block: bounds the (block x gallery) similarity matrix in memory.
_BLOCK = 1024


def nearest(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery rows by cosine similarity for every query row, in blocks of queries.

    Ties go to the lower gallery index (see :func:`sigmma_sc.tl._metrics.top_k`).

    Parameters
    ----------
    queries
        ``(n, d)`` embeddings.
    gallery
        ``(m, d)`` embeddings.
    k
        Neighbours per query, ``1 <= k <= m``.

    Returns
    -------
    ``(indices, scores)``, both ``(n, k)``, most similar first.

    Examples
    --------
    >>> import numpy as np
    >>> nearest(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0], [1.0, 0.1]]), 1)[0]
    array([[1]])
    """
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"queries {queries.shape} and gallery {gallery.shape} must be 2-D with the same embedding size."
        )
    if not 1 <= k <= gallery.shape[0]:
        raise ValueError(f"k must be between 1 and the gallery size {gallery.shape[0]}, got k={k}.")
    idx = np.empty((queries.shape[0], k), dtype=np.int64)
    scores = np.empty((queries.shape[0], k), dtype=np.float64)
    for start in range(0, queries.shape[0], _BLOCK):
        stop = min(start + _BLOCK, queries.shape[0])
        idx[start:stop], scores[start:stop] = top_k(cosine_similarity(queries[start:stop], gallery), k)
    return idx, scores


def embeddings_of(
    model: Sigmma,
    data: Any,
    modality: str,
    *,
    table_key: str = Keys.TABLE,
    what: str = "data",
    max_missing_genes: float = Defaults.MAX_MISSING_GENES,
) -> np.ndarray:
    """Image or expression embeddings of the units of a SpatialData (embedded now) or an AnnData (from ``obsm``).

    Parameters
    ----------
    model
        Fitted model.
    data
        A SpatialData (embedded with ``model.get_embeddings``) or an AnnData already embedded by the
        model (``obsm["X_sigmma_img"]`` / ``obsm["X_sigmma_expr"]``, e.g. ``model.reference``).
    modality
        ``"img"`` or ``"expr"``.
    table_key
        Table of a SpatialData.
    what
        Name of ``data`` in error messages.
    max_missing_genes
        Share of the model's genes a SpatialData may lack for its expression embedding (see
        :meth:`sigmma_sc.Sigmma.get_embeddings`).

    Returns
    -------
    ``(n_units, embed_dim)`` float32.

    Examples
    --------
    >>> embeddings_of(model, model.reference, "expr").shape
    (200, 48)
    """
    from anndata import AnnData

    key = Keys.X_SIGMMA_IMG if modality == "img" else Keys.X_SIGMMA_EXPR
    if isinstance(data, AnnData):
        if key not in data.obsm:
            raise KeyError(
                f"{what} (an AnnData) has no obsm[{key!r}]; pass an AnnData embedded by this model "
                "(e.g. model.reference) or the SpatialData itself."
            )
        return np.asarray(data.obsm[key], dtype=np.float32)
    # An image-only request skips the expression side: H&E-only tables and tables with counts embed alike.
    emb = model.get_embeddings(
        data, table_key=table_key, expression=modality == "expr", max_missing_genes=max_missing_genes
    ).get(modality)
    if emb is None:
        raise ValueError(
            f"{what} has no expression counts in table {table_key!r}, so it has no expression embedding; "
            "use direction='img2expr' with an expression gallery, or pass data with counts."
        )
    return np.asarray(emb, dtype=np.float32)


def retrieve(
    model: Sigmma,
    sdata: SpatialData,
    *,
    direction: str = "img2expr",
    k: int = 10,
    gallery: SpatialData | AnnData | None = None,
    table_key: str = Keys.TABLE,
    max_missing_genes: float = Defaults.MAX_MISSING_GENES,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` cross-modal matches of every unit by cosine similarity of the model's embeddings.

    Parameters
    ----------
    model
        Fitted :class:`sigmma_sc.Sigmma`.
    sdata
        Query units. ``"img2expr"`` embeds their H&E views (no counts needed); ``"expr2img"``
        embeds their expression (counts needed).
    direction
        ``"img2expr"``: image queries against expression embeddings; ``"expr2img"``: the reverse.
    k
        Matches per query (capped at the gallery size).
    gallery
        Items searched: ``None`` (default) the other modality of the same units of ``sdata``; a
        SpatialData (embedded now); or an AnnData already embedded by the model, such as
        ``model.reference`` (``obsm["X_sigmma_expr"]`` / ``obsm["X_sigmma_img"]``).
    table_key
        Table of ``sdata`` (and of ``gallery`` when it is a SpatialData).
    max_missing_genes
        Share of the model's genes an embedded expression table may lack: they are embedded as
        zeros with a warning (a section loaded on its own drops genes without counts); more is an
        error. Image-only embedding needs no genes.

    Returns
    -------
    ``(indices, scores)``: ``(n_query, k)`` int64 row indices into the gallery's units and their
    cosine similarities, best first; ties go to the lower gallery index.

    Examples
    --------
    With ``model`` fitted on 200 synthetic cells and ``test``, 200 other cells (see
    :class:`sigmma_sc.Sigmma`):

    >>> import numpy as np
    >>> import sigmma_sc as sg
    >>> idx, scores = sg.tl.retrieve(model, test, direction="img2expr", k=10)
    >>> idx.shape, scores.shape
    ((200, 10), (200, 10))
    >>> hits = (idx == np.arange(len(idx))[:, None]).any(axis=1).mean()  # Recall@10
    >>> idx, _ = sg.tl.retrieve(model, test, direction="img2expr", gallery=model.reference)
    >>> int(idx.max()) < model.reference.n_obs  # rows of the training units
    True
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
    get_table(sdata, table_key)
    query_mod, gallery_mod = ("img", "expr") if direction == "img2expr" else ("expr", "img")
    # The expression of sdata is embedded only when it is used: image queries against another gallery need no genes.
    need_expr = query_mod == "expr" or gallery is None
    emb = model.get_embeddings(
        sdata, table_key=table_key, expression=None if need_expr else False, max_missing_genes=max_missing_genes
    )
    queries = emb.get(query_mod)
    if queries is None:
        raise ValueError(
            f"direction={direction!r} needs expression counts in table {table_key!r} of the query; it has none. "
            "Use direction='img2expr' for H&E-only data."
        )
    if gallery is None:
        items = emb.get(gallery_mod)
        if items is None:
            raise ValueError(
                f"The query table {table_key!r} has no expression counts, so it cannot be its own "
                "expression gallery; pass gallery=model.reference (or another embedded AnnData)."
            )
    else:
        items = embeddings_of(
            model, gallery, gallery_mod, table_key=table_key, what="gallery", max_missing_genes=max_missing_genes
        )
    k = int(min(k, len(items)))
    return nearest(np.asarray(queries), np.asarray(items), k)
