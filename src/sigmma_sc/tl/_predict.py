"""Gene-expression prediction from H&E, by retrieval (BLEEP / Loki style) or a ridge head on the image embedding.

Whichever predicts held-out reference units better is used (:mod:`sigmma_sc.tl._readout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._constants import Defaults, Keys
from .._logging import logger
from ..io import get_table, log1p_normalize, validate
from ..model import Sigmma
from ._readout import Readout, check_readout_options, choose_readout, default_readout, heldout_groups, support
from ._retrieve import embeddings_of, read_only

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData


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


_RIDGE_NEEDS_IMAGES = (
    "method='ridge' fits a head on the reference's image embeddings, and the reference AnnData has no "
    f"obsm[{Keys.X_SIGMMA_IMG!r}]: pass model.reference, a table written by tl.fit, or a SpatialData."
)


@dataclass
class ReferenceData:
    """A prediction reference as the readouts use it.

    Attributes
    ----------
    expr_emb
        ``(m, d)`` expression-side embeddings (the retrieval gallery).
    img_emb
        ``(m, d)`` image-side embeddings (queries of the held-out choice and the ridge's inputs), or
        ``None`` for an AnnData reference without ``obsm["X_sigmma_img"]``.
    expression
        ``(m, n_genes)`` log1p expression over ``model.genes`` (dense or sparse).
    groups
        ``(m,)`` hold-out groups (:func:`sigmma_sc.tl._readout.heldout_groups`).
    validation
        ``(m,)`` units training held out (``obs["sigmma_validation"]`` of ``model.reference``), or ``None``.
    """

    expr_emb: np.ndarray
    img_emb: np.ndarray | None
    expression: Any
    groups: np.ndarray
    validation: np.ndarray | None = None


def _anndata_groups(adata: AnnData) -> np.ndarray:
    sections = adata.obs[Keys.SECTION].to_numpy() if Keys.SECTION in adata.obs else None
    xy = np.asarray(adata.obsm[Keys.SPATIAL], dtype=np.float64) if Keys.SPATIAL in adata.obsm else None
    if sections is None and xy is None:
        return np.zeros(adata.n_obs, np.int64)
    return heldout_groups(sections, xy)


def reference_expression(
    model: Sigmma,
    reference: Any,
    *,
    table_key: str = Keys.TABLE,
    max_missing_genes: float = Defaults.MAX_MISSING_GENES,
) -> ReferenceData:
    """Embeddings, log1p expression over ``model.genes`` and hold-out groups of a prediction reference.

    Parameters
    ----------
    model
        Fitted model.
    reference
        ``None`` (``model.reference``: the training units), an AnnData embedded by the model
        (``obsm["X_sigmma_expr"]``, and ``obsm["X_sigmma_img"]`` for the held-out choice of the
        readout; ``X`` log1p-normalised, or raw counts when its ``uns["sigmma_dataset"]`` says
        ``log_normalized=False``, as in a table written by :func:`sigmma_sc.tl.fit`), or a
        SpatialData with counts (embedded now).
    table_key
        Table of a SpatialData reference.
    max_missing_genes
        Share of the model's genes the reference may lack; they are read as zeros (no counts).

    Returns
    -------
    :class:`ReferenceData`.

    Examples
    --------
    >>> ref = reference_expression(model, None)  # the training units
    >>> ref.expr_emb.shape, ref.expression.shape, ref.img_emb.shape
    ((200, 48), (200, 40), (200, 48))
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
        img = embeddings_of(model, reference, "img", table_key=table_key, what="reference")
        # Genes the reference lacks (checked by the embedding) have no counts: zeros.
        present, _ = split_genes(genes, slide.table.var_names)
        pos = pd.Index(present).get_indexer(genes)
        sections = np.asarray(slide.sections, dtype=object)[slide.unit_section]
        return ReferenceData(
            emb, img, take_columns(slide.expression(present), pos), heldout_groups(sections, slide.xy_um)
        )
    emb = embeddings_of(model, reference, "expr", what="reference")
    img = np.asarray(reference.obsm[Keys.X_SIGMMA_IMG], np.float32) if Keys.X_SIGMMA_IMG in reference.obsm else None
    check_missing_genes(genes, reference.var_names, max_missing_genes=max_missing_genes, what="the reference AnnData")
    pos = pd.Index(reference.var_names).get_indexer(genes)
    info = reference.uns.get(Keys.DATASET, {})
    if isinstance(info, dict) and Keys.LOG_NORMALIZED in info and not bool(info[Keys.LOG_NORMALIZED]):
        counts = reference.layers[Keys.COUNTS_LAYER] if Keys.COUNTS_LAYER in reference.layers else reference.X
        # Totals over every gene of the table, as in training, before keeping the model genes.
        expression = take_columns(log1p_normalize(sp.csr_matrix(counts)), pos)
    else:
        expression = take_columns(reference.X, pos)
    validation = reference.obs[Keys.VALIDATION].to_numpy(dtype=bool) if Keys.VALIDATION in reference.obs else None
    return ReferenceData(emb, img, expression, _anndata_groups(reference), validation)


def reference_readout(
    ref: ReferenceData,
    *,
    method: str = "auto",
    k: int | None = None,
    temperature: float | None = None,
    seed: int = Defaults.SEED,
) -> Readout:
    """Choose the readout of a reference (:func:`sigmma_sc.tl._readout.choose_readout` on its held-out units).

    A reference without image embeddings cannot hold units out: retrieval with ``k`` (default
    ``Defaults.READOUT_K``) and ``temperature`` (default ``Defaults.READOUT_TEMPERATURE``).

    Examples
    --------
    >>> reference_readout(reference_expression(model, None)).method in ("knn", "ridge")
    True
    """
    check_readout_options(method, k, temperature)
    if ref.img_emb is None:
        if method in ("ridge", "blend"):
            raise ValueError(_RIDGE_NEEDS_IMAGES)
        return Readout(
            method="knn",
            k=int(k or Defaults.READOUT_K),
            temperature=float(temperature or Defaults.READOUT_TEMPERATURE),
            gene_r=np.full(ref.expression.shape[1], np.nan),
        )
    return choose_readout(
        ref.img_emb,
        ref.expr_emb,
        ref.expression,
        ref.groups,
        method=method,
        k=k,
        temperature=temperature,
        eligible=ref.validation,
        seed=seed,
    )


def readout_record(readout: Readout, *, arrays: bool = True) -> dict[str, Any]:
    """Return the ``uns["sigmma"]["params"]`` entries of a readout: its parameters and every candidate's held-out r.

    Examples
    --------
    >>> readout_record(Readout(method="knn", k=50, temperature=0.1))["k"]
    50
    """
    out = readout.params()
    if len(readout.candidates):
        c = readout.candidates
        names = [
            Readout(
                method=r.method,
                k=getattr(r, "k", None),
                temperature=getattr(r, "temperature", None),
                alpha=getattr(r, "alpha", None),
            ).describe()
            for r in c.itertuples()
        ]
        r = c["heldout_r"].to_numpy(dtype=np.float64)
        # Arrays for uns (anndata writes them), lists for JSON protocols.
        out["candidates"] = {"name": names, "heldout_r": r if arrays else [float(v) for v in r]}
    return out


def predict_expression(
    model: Sigmma,
    sdata: SpatialData,
    *,
    reference: AnnData | SpatialData | None = None,
    method: str | None = None,
    k: int | None = None,
    temperature: float | None = None,
    table_key: str = Keys.TABLE,
    max_missing_genes: float = Defaults.MAX_MISSING_GENES,
    inplace: bool = False,
) -> AnnData:
    """Predict gene expression of every unit of a slide from its H&E alone.

    The query's image views are embedded by the model and read out into expression in one of two
    ways, whose parameters are chosen on the reference itself: up to 1,000 reference units that
    training held out are predicted from the reference units of the other sections (the other
    spatial quadrants for a one-section reference) with each candidate, and scored by the mean
    per-gene Pearson r.

    - ``"knn"``: the ``k`` reference units whose expression embeddings are most similar (cosine)
      are retrieved and their log1p expression averaged with softmax weights
      ``exp(cosine / temperature)``; ``k`` in (10, 30, 100, 300, 1000) and ``temperature`` in
      (0.05, 0.1, 0.3, 1) unless given.
    - ``"ridge"``: a linear head from the image embedding to expression, fitted on the reference's
      image-side embeddings (penalty chosen the same way).
    - ``"blend"``: the mean of the two predictions, each with its parameters chosen as above.

    ``method=None`` takes the kind measured best for the model's units
    (:func:`sigmma_sc.tl._readout.default_readout`: the blend for spots, where her2st
    leave-one-section-out gives r 0.462 vs 0.456 for retrieval and 0.445 for the ridge, and for
    Visium HD bins; the ridge for cells); ``"auto"`` lets the held-out
    units choose the kind too, which is noisier (on her2st it chose the ridge in 4 of 5 folds, r
    0.441): see ``benchmarks/README.md``, "Readout". The query needs no counts and no genes: any it
    has are ignored.

    Parameters
    ----------
    model
        Fitted :class:`sigmma_sc.Sigmma`.
    sdata
        Query slide(s): H&E image(s) and the units to predict (table ``table_key``).
    reference
        Expression library: ``None`` for ``model.reference`` (the training units), an AnnData
        embedded by the model (``obsm["X_sigmma_expr"]`` plus expression over ``model.genes``;
        without ``obsm["X_sigmma_img"]`` nothing can be held out and retrieval with ``k=50``,
        ``temperature=0.1`` is used), or a SpatialData with counts (embedded now).
    method
        ``None`` (by the model's unit kind: the blend for spots, the ridge head for cells and
        bins; retrieval when the reference has no image embeddings, or when ``k`` or
        ``temperature`` is given), ``"knn"``, ``"ridge"``, ``"blend"`` or ``"auto"`` (the kind
        chosen on the held-out units too).
    k
        Reference units averaged per query (fixes the retrieval's ``k`` instead of choosing it).
    temperature
        Softmax temperature on cosine similarities (> 0; fixed instead of chosen); large values
        approach the plain mean.
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
    (float32), ``obs`` copied from the query table plus ``obs["sigmma_confidence"]`` (mean cosine
    similarity of the unit's image embedding to its 10 nearest reference expression embeddings:
    low values mean no reference unit resembles it), ``var["sigmma_heldout_r"]`` (the gene's
    Pearson r on the held-out reference units: how far to trust that gene's prediction; NaN when
    it could not be measured), ``obsm["spatial"]`` copied (microns), ``uns["sigmma_dataset"]``
    copied with ``log_normalized=True``, and the readout (method, ``k`` / ``temperature`` or
    ``alpha``, every candidate's held-out r) in ``uns["sigmma"]["params"]``.

    Examples
    --------
    Trained on four her2st sections, predicting the fifth (minutes on a CPU):

    >>> import sigmma_sc as sg
    >>> train = sg.datasets.her2st(sections=["C2", "C3", "C4", "C5"])  # doctest: +SKIP
    >>> query = sg.datasets.her2st(sections=["C6"])  # doctest: +SKIP
    >>> model = sg.tl.fit(train)  # doctest: +SKIP
    >>> pred = sg.tl.predict_expression(model, query)  # doctest: +SKIP
    >>> pred[:, "ERBB2"].X[:5]  # doctest: +SKIP

    With ``model`` fitted on 200 synthetic cells, predicting ``test``, 200 other cells (see
    :class:`sigmma_sc.Sigmma`):

    >>> pred = sg.tl.predict_expression(model, test, method="knn", k=10)
    >>> pred.shape, pred.X.dtype, pred.uns["sigmma"]["params"]["n_reference"]
    ((200, 40), dtype('float32'), 200)
    >>> "sigmma_heldout_r" in pred.var, "sigmma_confidence" in pred.obs
    (True, True)
    """
    import anndata as ad

    check_readout_options(method, k, temperature)
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
        if method in ("ridge", "blend") and Keys.X_SIGMMA_IMG not in ref_table.obsm:
            raise ValueError(_RIDGE_NEEDS_IMAGES)
    if len(split_genes(model.genes, ref_table.var_names)[1]) > max_missing_genes * len(model.genes):
        check_missing_genes(model.genes, ref_table.var_names, max_missing_genes=max_missing_genes, what="the reference")
    queries = embeddings_of(
        model, read_only(sdata, table_key=table_key, inplace=inplace), "img", table_key=table_key, what="query"
    )
    reference = None if reference is None else read_only(reference, table_key=table_key, inplace=inplace)
    ref = reference_expression(model, reference, table_key=table_key, max_missing_genes=max_missing_genes)
    if ref.expr_emb.shape[1] != queries.shape[1]:
        raise ValueError(
            f"The reference embeddings have {ref.expr_emb.shape[1]} dimensions but the model embeds "
            f"{queries.shape[1]}; embed the reference with the same model."
        )
    if k is not None and k > len(ref.expr_emb):
        logger.warning(f"k={k} exceeds the {len(ref.expr_emb)} reference units; averaging all of them.")
    if method is None:
        method = default_readout(
            str(model.params.get("unit_kind", "spot")),
            technology=model.params.get("technology"),
            k=k,
            temperature=temperature,
            has_images=ref.img_emb is not None,
        )
    readout = reference_readout(ref, method=method, k=k, temperature=temperature)
    logger.info(
        "predict_expression: "
        + ", ".join(
            f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in readout.params().items()
        )
    )
    pred = readout.predict(queries, ref.expr_emb, ref.expression)

    uns: dict[str, Any] = {Keys.UNS: {Keys.PARAMS: {**readout_record(readout), "n_reference": len(ref.expr_emb)}}}
    info = table.uns.get(Keys.DATASET)
    if isinstance(info, dict):
        uns[Keys.DATASET] = {**info, Keys.LOG_NORMALIZED: True}
    obs = table.obs.copy()
    obs[Keys.CONFIDENCE] = support(queries, ref.expr_emb)
    out = ad.AnnData(
        X=pred,
        obs=obs,
        var=pd.DataFrame(
            {Keys.HELDOUT_R: np.asarray(readout.gene_r, dtype=np.float64)},
            index=pd.Index(list(model.genes), dtype=str),
        ),
        uns=uns,
    )
    if Keys.SPATIAL in table.obsm:
        out.obsm[Keys.SPATIAL] = np.array(table.obsm[Keys.SPATIAL], copy=True)
    return out
