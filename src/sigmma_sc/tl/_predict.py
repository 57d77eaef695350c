"""Gene-expression prediction from H&E by retrieval of reference expression embeddings (BLEEP / Loki style)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._constants import Defaults, Keys
from .._logging import logger
from ..io import get_table, log1p_normalize, validate
from ..model import Sigmma
from ._retrieve import embeddings_of, nearest, read_only

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

#: Softmax temperature on cosine similarities of the k retrieved reference units.
DEFAULT_TEMPERATURE: float = 0.1


def neighbour_weights(scores: np.ndarray, *, temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """Weights of the retrieved reference units: softmax over ``cosine / temperature`` per query.

    A small temperature trusts the closest matches; a large one approaches the plain mean of the
    ``k`` neighbours (BLEEP's average). Weights are positive and sum to one per row.

    Parameters
    ----------
    scores
        ``(n, k)`` cosine similarities of each query's neighbours.
    temperature
        Softmax temperature, > 0.

    Returns
    -------
    ``(n, k)`` float64 weights.

    Examples
    --------
    >>> import numpy as np
    >>> neighbour_weights(np.array([[0.5, 0.5]]))
    array([[0.5, 0.5]])
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    logits = np.asarray(scores, dtype=np.float64) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


def weighted_average(
    queries: np.ndarray,
    ref_embeddings: np.ndarray,
    ref_expression: np.ndarray,
    *,
    k: int,
    temperature: float = DEFAULT_TEMPERATURE,
) -> np.ndarray:
    """Similarity-weighted mean expression of the ``k`` nearest reference units of each query.

    Parameters
    ----------
    queries
        ``(n, d)`` image embeddings of the query units.
    ref_embeddings
        ``(m, d)`` expression embeddings of the reference units.
    ref_expression
        ``(m, n_genes)`` log1p expression of the reference units (dense or sparse).
    k
        Neighbours averaged (capped at ``m``).
    temperature
        See :func:`neighbour_weights`.

    Returns
    -------
    ``(n, n_genes)`` float32 predictions on the reference's log1p scale.

    Examples
    --------
    >>> import numpy as np
    >>> ref = np.eye(3)
    >>> weighted_average(np.array([[1.0, 0.0, 0.0]]), ref, 10 * ref, k=1)
    array([[10.,  0.,  0.]], dtype=float32)
    """
    k = int(min(k, len(ref_embeddings)))
    idx, scores = nearest(queries, ref_embeddings, k)
    w = neighbour_weights(scores, temperature=temperature)
    ref = sp.csr_matrix(ref_expression) if sp.issparse(ref_expression) else np.asarray(ref_expression)
    out = np.zeros((len(idx), ref.shape[1]), dtype=np.float64)
    # One pass per neighbour rank keeps memory at (n, n_genes) instead of (n, k, n_genes).
    for j in range(k):
        rows = ref[idx[:, j]]
        rows = rows.toarray() if sp.issparse(rows) else rows
        out += w[:, j, None] * rows
    return out.astype(np.float32)


def split_genes(genes: Any, var_names: Any) -> tuple[list[str], list[str]]:
    """Split genes into those a table holds and those it lacks, each in the order of ``genes``.

    Parameters
    ----------
    genes
        Wanted genes (e.g. ``model.genes``).
    var_names
        The table's genes.

    Returns
    -------
    ``(present, missing)``.

    Examples
    --------
    >>> split_genes(["a", "b", "c"], ["c", "a"])
    (['a', 'c'], ['b'])
    """
    genes = [str(g) for g in genes]
    pos = pd.Index(var_names).get_indexer(genes)
    return [g for g, p in zip(genes, pos) if p >= 0], [g for g, p in zip(genes, pos) if p < 0]


def check_missing_genes(
    genes: Any, var_names: Any, *, max_missing_genes: float = Defaults.MAX_MISSING_GENES, what: str = "the table"
) -> list[str]:
    """Model genes a table lacks: a warning for a few (read as zeros), an error above ``max_missing_genes``.

    Parameters
    ----------
    genes
        The model's genes.
    var_names
        The table's genes.
    max_missing_genes
        Largest share of ``genes`` that may be missing.
    what
        Name of the table in messages.

    Returns
    -------
    The missing genes, in model order.

    Examples
    --------
    >>> check_missing_genes(["a", "b"], ["a", "b", "c"])
    []
    """
    genes = list(genes)
    _, missing = split_genes(genes, var_names)
    if missing:
        share = len(missing) / max(len(genes), 1)
        if share > max_missing_genes:
            raise KeyError(
                f"{what} lacks {len(missing)} of the model's {len(genes)} genes ({share:.1%}, e.g. {missing[:5]}), "
                f"more than max_missing_genes={max_missing_genes:.1%}: the gene panel does not match the model. "
                "Pass a table whose var_names include model.genes, or raise max_missing_genes= to read the "
                "missing genes as zeros."
            )
        logger.warning(
            f"{what} lacks {len(missing)} of the model's {len(genes)} genes ({share:.1%}, e.g. {missing[:5]}): "
            "read as zeros (no counts)"
        )
    return missing


def take_columns(mat: Any, pos: np.ndarray) -> Any:
    """Columns ``pos`` of a dense or sparse matrix; ``-1`` gives an all-zero column.

    Examples
    --------
    >>> import numpy as np
    >>> take_columns(np.array([[1.0, 2.0]]), np.array([1, -1, 0]))
    array([[2., 0., 1.]])
    """
    pos = np.asarray(pos, dtype=np.int64)
    if (pos < 0).any():
        if sp.issparse(mat):
            mat = sp.csr_matrix(mat)
            mat = sp.hstack([mat, sp.csr_matrix((mat.shape[0], 1), dtype=mat.dtype)], format="csr")
        else:
            mat = np.asarray(mat)
            mat = np.hstack([mat, np.zeros((mat.shape[0], 1), dtype=mat.dtype)])
        pos = np.where(pos < 0, mat.shape[1] - 1, pos)
    return mat[:, pos]


def reference_expression(
    model: Sigmma,
    reference: Any,
    *,
    table_key: str = Keys.TABLE,
    max_missing_genes: float = Defaults.MAX_MISSING_GENES,
) -> tuple[np.ndarray, Any]:
    """Expression embeddings and log1p expression over ``model.genes`` of a prediction reference.

    Parameters
    ----------
    model
        Fitted model.
    reference
        ``None`` (``model.reference``: the training units), an AnnData embedded by the model
        (``obsm["X_sigmma_expr"]``; ``X`` log1p-normalised, or raw counts when its
        ``uns["sigmma_dataset"]`` says ``log_normalized=False``, as in a table written by
        :func:`sigmma_sc.tl.fit`), or a SpatialData with counts (embedded now).
    table_key
        Table of a SpatialData reference.
    max_missing_genes
        Share of the model's genes the reference may lack; they are read as zeros (no counts).

    Returns
    -------
    ``(embeddings (m, d), expression (m, n_genes))``.

    Examples
    --------
    >>> emb, expr = reference_expression(model, None)  # the training units
    >>> emb.shape, expr.shape
    ((200, 48), (200, 40))
    """
    from anndata import AnnData

    genes = list(model.genes)
    if reference is None:
        reference = model.reference
    if not isinstance(reference, AnnData):
        slide = validate(reference, table_key=table_key, require_counts=True, allow_empty_genes=True)
        emb = embeddings_of(
            model, reference, "expr", table_key=table_key, what="reference", max_missing_genes=max_missing_genes
        )
        # Genes the reference lacks (checked by the embedding) have no counts: zeros.
        present, _ = split_genes(genes, slide.table.var_names)
        pos = pd.Index(present).get_indexer(genes)
        return emb, take_columns(slide.expression(present), pos)
    emb = embeddings_of(model, reference, "expr", what="reference")
    check_missing_genes(genes, reference.var_names, max_missing_genes=max_missing_genes, what="the reference AnnData")
    pos = pd.Index(reference.var_names).get_indexer(genes)
    info = reference.uns.get(Keys.DATASET, {})
    if isinstance(info, dict) and Keys.LOG_NORMALIZED in info and not bool(info[Keys.LOG_NORMALIZED]):
        counts = reference.layers[Keys.COUNTS_LAYER] if Keys.COUNTS_LAYER in reference.layers else reference.X
        # Totals over every gene of the table, as in training, before keeping the model genes.
        return emb, take_columns(log1p_normalize(sp.csr_matrix(counts)), pos)
    return emb, take_columns(reference.X, pos)


def predict_expression(
    model: Sigmma,
    sdata: SpatialData,
    *,
    reference: AnnData | SpatialData | None = None,
    k: int = 50,
    temperature: float = DEFAULT_TEMPERATURE,
    table_key: str = Keys.TABLE,
    max_missing_genes: float = Defaults.MAX_MISSING_GENES,
    inplace: bool = False,
) -> AnnData:
    """Predict gene expression of every unit of a slide from its H&E alone.

    The query's image views are embedded by the model; the ``k`` reference units whose expression
    embeddings are most similar (cosine) are retrieved and their log1p expression averaged with
    softmax weights ``exp(cosine / temperature)`` (normalised per query). The query needs no
    counts and no genes: any it has are ignored.

    Parameters
    ----------
    model
        Fitted :class:`sigmma_sc.Sigmma`.
    sdata
        Query slide(s): H&E image(s) and the units to predict (table ``table_key``).
    reference
        Expression library: ``None`` for ``model.reference`` (the training units), an AnnData
        embedded by the model (``obsm["X_sigmma_expr"]`` plus expression over ``model.genes``), or a
        SpatialData with counts (embedded now).
    k
        Reference units averaged per query.
    temperature
        Softmax temperature on cosine similarities (> 0); large values approach the plain mean.
    table_key
        Table of ``sdata``.
    max_missing_genes
        Share of the model's genes the reference may lack (read as zeros, with a warning; a
        reference section loaded on its own drops genes without counts).
    inplace
        Read only by default: ``sdata`` (and a SpatialData ``reference``) are left exactly as they
        were; the hierarchy and image features the embedding needs are computed on a light copy
        and dropped. ``True`` caches them in the tables, so later calls (``retrieve``,
        ``evaluate`` on the same section) skip that work.

    Returns
    -------
    AnnData: query units x ``model.genes``, ``X`` = predicted log1p(normalize_total) expression
    (float32), ``obs`` copied from the query table, ``obsm["spatial"]`` copied (microns),
    ``uns["sigmma_dataset"]`` copied with ``log_normalized=True`` and the parameters in
    ``uns["sigmma"]["params"]``.

    Examples
    --------
    Trained on four her2st sections, predicting the fifth (minutes on a CPU):

    >>> import sigmma_sc as sg
    >>> train = sg.datasets.her2st(sections=["C2", "C3", "C4", "C5"])  # doctest: +SKIP
    >>> query = sg.datasets.her2st(sections=["C6"])  # doctest: +SKIP
    >>> model = sg.tl.fit(train)  # doctest: +SKIP
    >>> pred = sg.tl.predict_expression(model, query, k=50)  # doctest: +SKIP
    >>> pred[:, "ERBB2"].X[:5]  # doctest: +SKIP

    With ``model`` fitted on 200 synthetic cells, predicting ``test``, 200 other cells (see
    :class:`sigmma_sc.Sigmma`):

    >>> pred = sg.tl.predict_expression(model, test, k=10)
    >>> pred.shape, pred.X.dtype, pred.uns["sigmma"]["params"]["n_reference"]
    ((200, 40), dtype('float32'), 200)
    """
    import anndata as ad

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    if not 0.0 <= max_missing_genes <= 1.0:
        raise ValueError(f"max_missing_genes must be a share between 0 and 1, got {max_missing_genes!r}.")
    table = get_table(sdata, table_key)
    # The reference before the query: embedding the query is the expensive step.
    if reference is None and model.reference is None:
        raise ValueError(
            "the model holds no reference (training units; models saved before references existed lack it): "
            "pass reference= (an AnnData embedded by the model, or a SpatialData with counts)."
        )
    if reference is not None and not isinstance(reference, ad.AnnData):
        ref_table = validate(reference, table_key=table_key, require_counts=True, allow_empty_genes=True).table
    else:
        ref_table = model.reference if reference is None else reference
        embeddings_of(model, ref_table, "expr", what="reference")  # an AnnData: the embedding must be in obsm
    if len(split_genes(model.genes, ref_table.var_names)[1]) > max_missing_genes * len(model.genes):
        check_missing_genes(model.genes, ref_table.var_names, max_missing_genes=max_missing_genes, what="the reference")
    queries = embeddings_of(
        model, read_only(sdata, table_key=table_key, inplace=inplace), "img", table_key=table_key, what="query"
    )
    reference = None if reference is None else read_only(reference, table_key=table_key, inplace=inplace)
    ref_emb, ref_expr = reference_expression(model, reference, table_key=table_key, max_missing_genes=max_missing_genes)
    if ref_emb.shape[1] != queries.shape[1]:
        raise ValueError(
            f"The reference embeddings have {ref_emb.shape[1]} dimensions but the model embeds {queries.shape[1]}; "
            "embed the reference with the same model."
        )
    if k > len(ref_emb):
        logger.warning(f"k={k} exceeds the {len(ref_emb)} reference units; averaging all of them.")
    pred = weighted_average(queries, ref_emb, ref_expr, k=k, temperature=temperature)

    uns: dict[str, Any] = {
        Keys.UNS: {
            Keys.PARAMS: {
                "k": int(min(k, len(ref_emb))),
                "temperature": float(temperature),
                "n_reference": len(ref_emb),
            }
        }
    }
    info = table.uns.get(Keys.DATASET)
    if isinstance(info, dict):
        uns[Keys.DATASET] = {**info, Keys.LOG_NORMALIZED: True}
    out = ad.AnnData(
        X=pred,
        obs=table.obs.copy(),
        var=pd.DataFrame(index=pd.Index(list(model.genes), dtype=str)),
        uns=uns,
    )
    if Keys.SPATIAL in table.obsm:
        out.obsm[Keys.SPATIAL] = np.array(table.obsm[Keys.SPATIAL], copy=True)
    return out
