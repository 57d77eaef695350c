"""Evaluation metrics on plain arrays: per-gene Pearson r, Recall@k, ranks, gene sets and subsamples.

Everything here is pure numpy so the numbers can be checked by hand; :func:`sigmma_sc.tl.evaluate`
wires them to models and data.

Conventions
-----------
- A gene whose observed or predicted values are constant over the units scored has no Pearson r:
  it gets ``NaN`` and is left out of every mean (a constant prediction carries no ranking
  information, and counting it as 0 would reward nothing in particular).
- Retrieval scores a query against every gallery item; the true match of query ``i`` is gallery
  item ``i``. A tie between the true match and another item counts at its **worst** rank
  (the true item is placed after every item with an equal score), so ties never flatter a method.
  A ``NaN`` score ranks below every number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Relative floor under which a centred column counts as constant (float64 round-off of a constant).
_CONST_RTOL = 1e-12


def pearson_per_gene(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson correlation between observed and predicted values of each gene, over units.

    Parameters
    ----------
    y_true
        Observed values, ``(n_units, n_genes)``.
    y_pred
        Predicted values, same shape.

    Returns
    -------
    ``(n_genes,)`` float64: r per gene; ``NaN`` where the observed or the predicted column is
    constant (including fewer than two units).

    Examples
    --------
    >>> import numpy as np
    >>> y = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    >>> pearson_per_gene(y, 2 * y + 1)
    array([ 1., nan])
    """
    a = np.asarray(y_true, dtype=np.float64)
    b = np.asarray(y_pred, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"y_true and y_pred must be 2-D arrays of the same shape (units x genes), got {a.shape} and {b.shape}."
        )
    if a.shape[0] < 2:
        return np.full(a.shape[1], np.nan)
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    ssa = np.einsum("ij,ij->j", a, a)
    ssb = np.einsum("ij,ij->j", b, b)
    cross = np.einsum("ij,ij->j", a, b)
    scale_a = _CONST_RTOL * np.maximum(1.0, np.abs(np.asarray(y_true, dtype=np.float64)).max(axis=0) ** 2)
    scale_b = _CONST_RTOL * np.maximum(1.0, np.abs(np.asarray(y_pred, dtype=np.float64)).max(axis=0) ** 2)
    valid = (ssa > scale_a) & (ssb > scale_b)
    r = np.full(a.shape[1], np.nan)
    r[valid] = cross[valid] / np.sqrt(ssa[valid] * ssb[valid])
    return np.clip(r, -1.0, 1.0)


def _nanmean(x: np.ndarray) -> float:
    # np.nanmean warns on all-NaN input; an empty mean is simply NaN here.
    x = np.asarray(x, dtype=np.float64)
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if finite.size else float("nan")


def mean_pearson(y_true: np.ndarray, y_pred: np.ndarray, *, groups: np.ndarray | None = None) -> float:
    """Mean over genes of the per-gene Pearson r, pooled over units or averaged over groups.

    Parameters
    ----------
    y_true, y_pred
        Observed and predicted values, as in :func:`pearson_per_gene`.
    groups
        Optional ``(n_units,)`` labels (e.g. slide names). ``None``: one r per gene over all units
        pooled. Given: the gene-mean r is computed within each group, then averaged over groups
        (groups whose genes are all constant are left out).

    Returns
    -------
    The mean r; genes with ``NaN`` r (constant columns) are excluded; ``NaN`` when none is left.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.normal(size=(20, 3))
    >>> mean_pearson(y, y)
    1.0
    >>> mean_pearson(y, -y, groups=np.repeat(["a", "b"], 10))
    -1.0
    """
    if groups is None:
        return _nanmean(pearson_per_gene(y_true, y_pred))
    groups = np.asarray(groups)
    if groups.shape[0] != np.shape(y_true)[0]:
        raise ValueError(f"groups has {groups.shape[0]} labels but y_true has {np.shape(y_true)[0]} units.")
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    per_group = [mean_pearson(y_true[groups == g], y_pred[groups == g]) for g in _unique_in_order(groups)]
    return _nanmean(np.asarray(per_group))


def _unique_in_order(values: np.ndarray) -> list:
    _, first = np.unique(values, return_index=True)
    return [values[i] for i in np.sort(first)]


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity between every row of ``a`` and every row of ``b``.

    Parameters
    ----------
    a
        ``(n, d)`` queries.
    b
        ``(m, d)`` gallery.

    Returns
    -------
    ``(n, m)`` float64 similarities; a zero row has similarity 0 to everything.

    Examples
    --------
    >>> import numpy as np
    >>> cosine_similarity(np.array([[1.0, 0.0]]), np.array([[2.0, 0.0], [0.0, 3.0]]))
    array([[1., 0.]])
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    a = np.divide(a, na, out=np.zeros_like(a), where=na > 0)
    b = np.divide(b, nb, out=np.zeros_like(b), where=nb > 0)
    return a @ b.T


def zscore_columns(x: np.ndarray) -> np.ndarray:
    """Z-score each column (gene) over the rows (units); constant columns become 0.

    Examples
    --------
    >>> import numpy as np
    >>> zscore_columns(np.array([[1.0, 5.0], [3.0, 5.0]]))
    array([[-1.,  0.],
           [ 1.,  0.]])
    """
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    return np.divide(x - mu, sd, out=np.zeros_like(x), where=sd > 0)


def profile_similarity(predicted: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Correlation between predicted and observed expression profiles, for retrieval by regression models.

    Each gene is z-scored over the units of its own matrix (so a model's missing intercept or
    shrunken scale does not matter), then every predicted profile is correlated (Pearson, across
    genes) with every observed profile.

    Parameters
    ----------
    predicted
        ``(n, n_genes)`` predicted expression of the queries.
    observed
        ``(m, n_genes)`` observed expression of the gallery.

    Returns
    -------
    ``(n, m)`` correlations: row ``i`` scores query ``i`` against every gallery unit.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.random.default_rng(0).normal(size=(5, 8))
    >>> s = profile_similarity(3 * y + 1, y)
    >>> bool((s.argmax(axis=1) == np.arange(5)).all())
    True
    """
    zp = zscore_columns(predicted)
    zo = zscore_columns(observed)
    # Pearson across genes = cosine of the row-centred profiles.
    return cosine_similarity(zp - zp.mean(axis=1, keepdims=True), zo - zo.mean(axis=1, keepdims=True))


def retrieval_ranks(similarity: np.ndarray) -> np.ndarray:
    """1-based rank of the true match of each query; query ``i``'s true match is gallery item ``i``.

    Ties count at their worst rank: every other item scoring exactly the true match's score is
    placed before it. ``NaN`` scores rank below every number (a ``NaN`` true score ranks last).

    Parameters
    ----------
    similarity
        ``(n, n)`` scores, higher is better.

    Returns
    -------
    ``(n,)`` int64 ranks in ``1..n``.

    Examples
    --------
    >>> import numpy as np
    >>> retrieval_ranks(np.array([[0.9, 0.1], [0.5, 0.5]]))
    array([1, 2])
    """
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(
            f"similarity must be square (queries x their gallery, true match on the diagonal), got {s.shape}."
        )
    s = np.where(np.isnan(s), -np.inf, s)
    true = np.diag(s).copy()
    # Counts the true item itself and every tie; a NaN true score (now -inf) therefore ranks last.
    return (s >= true[:, None]).sum(axis=1).astype(np.int64)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Fraction of queries whose true match is within the top ``k``.

    Examples
    --------
    >>> import numpy as np
    >>> recall_at_k(np.array([1, 3, 10]), 5)
    0.6666666666666666
    """
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return float("nan")
    return float(np.mean(ranks <= k))


def chance_recall(k: int, n: int) -> float:
    """Recall@k of a random ranking over a gallery of ``n`` items: ``min(k, n) / n``.

    Examples
    --------
    >>> chance_recall(5, 1000)
    0.005
    """
    if n <= 0:
        raise ValueError(f"The gallery must hold at least one item, got n={n}.")
    return min(k, n) / n


def retrieval_summary(similarity: np.ndarray, *, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k, median rank and chance levels of one retrieval direction.

    Parameters
    ----------
    similarity
        ``(n, n)`` query x gallery scores with the true match on the diagonal.
    ks
        Cut-offs for Recall@k.

    Returns
    -------
    ``{"r{k}": ..., "chance_r{k}": ..., "median_rank": ..., "n_gallery": n}``.

    Examples
    --------
    >>> import numpy as np
    >>> retrieval_summary(np.eye(4), ks=(1,))["r1"]
    1.0
    """
    ranks = retrieval_ranks(similarity)
    n = ranks.shape[0]
    out: dict[str, float] = {}
    for k in ks:
        out[f"r{k}"] = recall_at_k(ranks, k)
        out[f"chance_r{k}"] = chance_recall(k, n)
    out["median_rank"] = float(np.median(ranks))
    out["n_gallery"] = float(n)
    return out


def top_k(similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery items per query, ties broken by the lower gallery index.

    Parameters
    ----------
    similarity
        ``(n, m)`` scores, higher is better (``NaN`` ranks last).
    k
        Items to keep, at most ``m``.

    Returns
    -------
    ``(indices, scores)``, both ``(n, k)``, best first.

    Examples
    --------
    >>> import numpy as np
    >>> top_k(np.array([[0.2, 0.9, 0.9]]), 2)
    (array([[1, 2]]), array([[0.9, 0.9]]))
    """
    raw = np.asarray(similarity, dtype=np.float64)
    if raw.ndim != 2 or not 1 <= k <= raw.shape[1]:
        raise ValueError(f"k must be between 1 and the gallery size {raw.shape[-1]}, got k={k}.")
    s = np.where(np.isnan(raw), -np.inf, raw)
    n, m = s.shape
    if k < m:
        # Keep exactly k items per row without a full sort: every item above the k-th largest
        # score, then the tied items at that score in gallery order.
        kth = -np.partition(-s, k - 1, axis=1)[:, k - 1 : k]
        above = s > kth
        ties = s == kth
        room = k - above.sum(axis=1, keepdims=True)
        keep = above | (ties & (np.cumsum(ties, axis=1) <= room))
        cand = np.nonzero(keep)[1].reshape(n, k)
    else:
        cand = np.broadcast_to(np.arange(m), (n, m))
    cand_scores = np.take_along_axis(s, cand, axis=1)
    # Candidates are in gallery order, so a stable sort on the score keeps ties by lower index.
    order = np.argsort(-cand_scores, axis=1, kind="stable")
    idx = np.take_along_axis(cand, order, axis=1).astype(np.int64)
    return idx, np.take_along_axis(raw, idx, axis=1)


def subsample(n: int, *, max_n: int = 1000, seed: int = 0) -> np.ndarray:
    """Draw a fixed, seeded subsample of ``max_n`` of ``n`` units (all units, in order, when ``n <= max_n``).

    Retrieval metrics depend on the gallery size; capping it keeps figures comparable across folds.

    Examples
    --------
    >>> subsample(5, max_n=10)
    array([0, 1, 2, 3, 4])
    >>> len(subsample(5000, max_n=1000, seed=0))
    1000
    """
    if n <= max_n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_n, replace=False)).astype(np.int64)


def top_expressed_genes(expression, *, n: int = 50) -> np.ndarray:
    """Return the ``n`` genes with the highest mean log1p expression (HEST's highly expressed genes).

    The highly *variable* genes of the evaluation come from the model's own gene selection
    (:func:`sigmma_sc.model._data.select_genes`), so training and evaluation share one rule.

    Parameters
    ----------
    expression
        ``(n_units, n_genes)`` log1p-normalised expression (dense or scipy sparse) of the training units.
    n
        Genes to return (all when fewer exist).

    Returns
    -------
    ``(min(n, n_genes),)`` int64 gene indices, highest mean first; ties go to the lower index.

    Examples
    --------
    >>> import numpy as np
    >>> top_expressed_genes(np.array([[0.0, 1.0, 5.0], [0.0, 3.0, 5.1]]), n=2)
    array([2, 1])
    """
    mean = np.asarray(expression.mean(axis=0), dtype=np.float64).ravel()
    return np.argsort(-mean, kind="stable")[:n].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Integration across batches (sections, patients): is a unit's neighbourhood, and its cluster,
# shared with other batches? scib-metrics' iLISI / kBET answer the same question with more
# machinery (and jax); two counts on a kNN graph are enough, and can be checked by hand.
# ---------------------------------------------------------------------------------------------
def other_batch_share(neighbors: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """Share of each unit's nearest neighbours that come from another batch.

    Parameters
    ----------
    neighbors
        ``(n, k)`` int indices of each unit's ``k`` nearest neighbours (itself excluded).
    batches
        ``(n,)`` batch label of each unit (a section, a patient).

    Returns
    -------
    ``(n,)`` float64 in ``[0, 1]``. Its mean is 0 for batches that never mix and, for batches mixed
    at random, about :func:`uniform_other_batch_share`.

    Examples
    --------
    >>> import numpy as np
    >>> other_batch_share(np.array([[1, 2], [0, 2], [0, 1]]), np.array(["a", "a", "b"]))
    array([0.5, 0.5, 1. ])
    """
    nb = np.asarray(neighbors)
    b = np.asarray(batches)
    if nb.ndim != 2 or nb.shape[0] != b.shape[0]:
        raise ValueError(f"neighbors must be (n_units, k) with n_units = len(batches) = {b.shape[0]}, got {nb.shape}.")
    return (b[nb] != b[:, None]).mean(axis=1)


def uniform_other_batch_share(batches: np.ndarray) -> float:
    """Mean :func:`other_batch_share` expected when neighbours ignore batches (drawn uniformly from the others).

    Examples
    --------
    >>> uniform_other_batch_share(np.array([0, 0, 1, 1]))
    0.6666666666666666
    """
    _, counts = np.unique(np.asarray(batches), return_counts=True)
    n = counts.sum()
    if n < 2:
        return float("nan")
    # A unit of a batch of size c has n - c other-batch units among its n - 1 candidates.
    return float(np.sum(counts * (n - counts)) / (n * (n - 1)))


def shared_cluster_share(
    clusters: np.ndarray, batches: np.ndarray, *, min_units: int = 5, min_batches: int = 3
) -> float:
    """Share of units whose cluster is shared: it holds at least ``min_units`` units in each of at least ``min_batches`` batches.

    A clustering of well integrated serial sections puts each compartment of every section into
    the same clusters; a clustering that separates sections makes clusters private to one.

    Parameters
    ----------
    clusters
        ``(n,)`` cluster label of each unit.
    batches
        ``(n,)`` batch label of each unit.
    min_units, min_batches
        What makes a cluster shared. ``min_batches`` is capped at the number of batches.

    Examples
    --------
    >>> import numpy as np
    >>> clusters = np.array([0] * 10 + [1] * 10)
    >>> batches = np.array(["a", "b"] * 5 + ["a"] * 10)
    >>> shared_cluster_share(clusters, batches, min_units=5, min_batches=2)
    0.5
    """
    c = np.asarray(clusters)
    b = np.asarray(batches)
    if c.shape != b.shape or c.ndim != 1:
        raise ValueError(f"clusters and batches must be 1-D of the same length, got {c.shape} and {b.shape}.")
    if c.size == 0:
        return float("nan")
    c_codes, c_idx = np.unique(c, return_inverse=True)
    b_codes, b_idx = np.unique(b, return_inverse=True)
    table = np.zeros((c_codes.size, b_codes.size), dtype=np.int64)
    np.add.at(table, (c_idx, b_idx), 1)
    need = min(int(min_batches), b_codes.size)
    shared = (table >= int(min_units)).sum(axis=1) >= need
    return float(shared[c_idx].mean())
