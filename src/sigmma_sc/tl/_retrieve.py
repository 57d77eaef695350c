"""Cross-modal retrieval with a fitted model: image -> expression and expression -> image."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import Defaults, Keys
from ..model import Sigmma
from ..pp import light_copy

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

#: Retrieval directions: the query modality first.
DIRECTIONS: tuple[str, ...] = ("img2expr", "expr2img")
# Bytes one block of the search may hold: its float64 products, their float32 rounding and argpartition's int64
# positions (20 bytes per query x gallery pair), whatever the gallery size.
_BLOCK_BYTES = 256 * 2**20
# At most this many queries per block (more gallery per block when there are fewer).
_MAX_QUERY_BLOCK = 1024


def _unit_rows(x: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Rows scaled to unit length in a new float32 array (norms in float64); zero or NaN rows become 0."""
    out = np.zeros(x.shape, dtype=np.float32)
    for start in range(0, x.shape[0], chunk):
        rows = x[start : start + chunk]
        norm = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))[:, None]
        np.divide(rows, norm, out=out[start : start + chunk], where=norm > 0, casting="unsafe")
    return out


def _top_positions(s: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest entries of each row of ``s``, ties to the lower position, in position order.

    ``s`` holds no NaN. One ``argpartition`` per block; rows whose ``k``-th score is tied with
    entries left out are redone exactly (rare: duplicate or zero embeddings).
    """
    w = s.shape[1]
    if k >= w:
        return np.broadcast_to(np.arange(w), s.shape).copy()
    pos = np.argpartition(s, w - k, axis=1)[:, w - k :].copy()
    kth = np.take_along_axis(s, pos, axis=1).min(axis=1, keepdims=True)
    kept_ties = (np.take_along_axis(s, pos, axis=1) == kth).sum(axis=1)
    for r in np.flatnonzero((s == kth).sum(axis=1) > kept_ties):
        above = np.flatnonzero(s[r] > kth[r])
        tied = np.flatnonzero(s[r] == kth[r])[: k - len(above)]
        pos[r] = np.concatenate([above, tied])
    pos.sort(axis=1)
    return pos


def nearest(
    queries: np.ndarray, gallery: np.ndarray, k: int, *, block_bytes: int = _BLOCK_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery rows by cosine similarity for every query row, in float32 blocks of bounded size.

    Queries and gallery are scaled to unit length once (float32); each block of queries is scored
    against a block of the gallery and the best ``k`` are kept with ``argpartition``, merged over the
    gallery blocks, so memory is the inputs, their unit-length copies, the ``(n, k)`` output and one
    block (about ``block_bytes`` when ``k`` is small next to it), never a full similarity matrix.
    Ties go to the lower gallery index (see :func:`sigmma_sc.tl._metrics.top_k`); scores are the
    float32 cosines (as float64), NaN where an input row holds an infinity (ranked last).

    Parameters
    ----------
    queries
        ``(n, d)`` embeddings.
    gallery
        ``(m, d)`` embeddings.
    k
        Neighbours per query, ``1 <= k <= m``.
    block_bytes
        Memory one block may hold (float64 products, their float32 rounding and int64 positions:
        20 bytes a pair).

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
    k = int(k)
    (n, m), pairs = (queries.shape[0], gallery.shape[0]), max(1, int(block_bytes) // 20)
    q, g = _unit_rows(queries), _unit_rows(gallery)
    # Queries per block leave room for k running candidates; the gallery block fills the rest.
    bq = max(1, min(n, _MAX_QUERY_BLOCK, pairs // (2 * k)))
    bg = min(m, max(1, pairs // bq - k))
    idx = np.empty((n, k), dtype=np.int64)
    scores = np.empty((n, k), dtype=np.float64)
    for q0 in range(0, n, bq):
        qb = q[q0 : q0 + bq].astype(np.float64)
        best_i = np.empty((len(qb), 0), dtype=np.int64)
        best_s = np.empty((len(qb), 0), dtype=np.float32)
        for g0 in range(0, m, bg):
            # Products accumulated in float64, then rounded to float32: BLAS picks kernels by block
            # shape and position, and in float32 two copies of one gallery row could score an ulp
            # apart, breaking "ties to the lower index"; float64 noise does not survive the rounding.
            s = (qb @ g[g0 : g0 + bg].T.astype(np.float64)).astype(np.float32)
            np.copyto(s, -np.inf, where=np.isnan(s))  # NaN (an infinite input) ranks last
            pos = _top_positions(s, k)
            blk_s, blk_i = np.take_along_axis(s, pos, axis=1), pos + g0
            del s, pos
            if best_i.shape[1]:  # earlier blocks hold lower indices: concatenation stays in index order
                blk_s, blk_i = np.concatenate([best_s, blk_s], axis=1), np.concatenate([best_i, blk_i], axis=1)
                pos = _top_positions(blk_s, k)
                blk_s, blk_i = np.take_along_axis(blk_s, pos, axis=1), np.take_along_axis(blk_i, pos, axis=1)
            best_s, best_i = blk_s, blk_i
        # Candidates are in gallery order, so a stable sort on the score keeps ties by lower index.
        order = np.argsort(-best_s, axis=1, kind="stable")
        idx[q0 : q0 + bq] = np.take_along_axis(best_i, order, axis=1)
        scores[q0 : q0 + bq] = np.take_along_axis(best_s, order, axis=1)
    scores[np.isneginf(scores)] = np.nan
    return idx, scores


def read_only(data: Any, *, table_key: str = Keys.TABLE, inplace: bool = False) -> Any:
    """Return what a read-only function embeds: ``data`` itself with ``inplace=True`` or for an AnnData, else a light copy.

    Embedding a SpatialData computes its hierarchy and image features when its table lacks them;
    on a :func:`sigmma_sc.pp.light_copy` they stay out of the user's object (and are dropped with
    the copy). ``inplace=True`` keeps them in ``data``'s table, so later calls reuse them.

    Examples
    --------
    >>> read_only(test)["table"] is test["table"], read_only(test, inplace=True) is test
    (False, True)
    """
    from anndata import AnnData

    if inplace or isinstance(data, AnnData):
        return data
    return light_copy(data, table_key=table_key)


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
    inplace: bool = False,
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
    inplace
        Read only by default: the hierarchy and image features that embedding computes are built
        on a light copy of ``sdata`` (and of a SpatialData ``gallery``) and dropped. ``True``
        caches them in the tables, so later calls on the same objects skip that work.

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
    sdata = read_only(sdata, table_key=table_key, inplace=inplace)
    gallery = None if gallery is None else read_only(gallery, table_key=table_key, inplace=inplace)
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
