"""``tl.integration_metrics``: how well an embedding mixes sections (or patients) while keeping tissue structure."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sigmma_sc._constants import Defaults, Keys
from sigmma_sc._settings import settings
from sigmma_sc.io import get_table

from ._metrics import other_batch_share, shared_cluster_share, uniform_other_batch_share

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData


def integration_metrics(
    sdata: SpatialData | AnnData,
    *,
    use_rep: str = Keys.X_SIGMMA,
    batch_key: str = Keys.SECTION,
    labels_key: str | None = None,
    table_key: str = Keys.TABLE,
    n_neighbors: int = Defaults.INTEGRATION_NEIGHBORS,
    resolution: float = Defaults.INTEGRATION_RESOLUTION,
    min_units: int = Defaults.SHARED_CLUSTER_MIN_UNITS,
    min_batches: int = Defaults.SHARED_CLUSTER_MIN_BATCHES,
    seed: int | None = None,
) -> dict[str, float]:
    """Measure how well an embedding mixes batches (sections, patients) and, given true labels, keeps them apart.

    Two batch-mixing scores, both read on the embedding alone:

    - ``knn_other_batch``: mean share of each unit's ``n_neighbors`` nearest neighbours (Euclidean
      in ``use_rep``; cosine order for unit-length embeddings such as ``X_sigmma``) that come from
      another batch; ``knn_other_batch_uniform`` is its value when neighbours ignore batches.
    - ``shared_clusters``: share of units whose Leiden cluster (``resolution``, on scanpy's
      ``n_neighbors`` graph, as ``sc.pp.neighbors(use_rep=...); sc.tl.leiden(...)`` would make)
      holds at least ``min_units`` units in each of at least ``min_batches`` batches: the clusters
      a user would call the same compartment across sections.

    With ``labels_key`` (known compartments, e.g. the niches of :func:`sigmma_sc.datasets.synthetic`),
    ``ari``: adjusted Rand index of the Leiden clusters against them, so mixing bought by blurring
    the tissue shows up. Nothing is written into ``sdata``.

    Parameters
    ----------
    sdata
        SpatialData with a table, or the table (AnnData).
    use_rep
        ``obsm`` key of the embedding (``X_sigmma``, ``X_sigmma_img``, ``X_pca``, ...).
    batch_key
        ``obs`` column of the batches (default: the section of each unit).
    labels_key
        ``obs`` column of the true compartments, or ``None``.
    table_key
        Table of the units when ``sdata`` is a SpatialData object.
    n_neighbors
        Neighbours of the kNN share and of the Leiden graph.
    resolution
        Leiden resolution.
    min_units, min_batches
        What makes a cluster shared (see :func:`sigmma_sc.tl._metrics.shared_cluster_share`).
    seed
        Leiden's random state (default: ``sigmma_sc.settings.seed``).

    Returns
    -------
    ``{"knn_other_batch", "knn_other_batch_uniform", "shared_clusters", "n_clusters", "n_batches"}``
    and ``"ari"`` with ``labels_key``.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> import sigmma_sc as sg
    >>> rng = np.random.default_rng(0)
    >>> adata = ad.AnnData(np.zeros((120, 1)))
    >>> adata.obs["section"] = np.repeat(["A", "B", "C"], 40)
    >>> adata.obsm["X_mixed"] = rng.normal(size=(120, 5))
    >>> m = sg.tl.integration_metrics(adata, use_rep="X_mixed", min_units=3)
    >>> m["knn_other_batch"] > 0.5, m["knn_other_batch_uniform"] > 0.66
    (True, True)
    """
    adata = get_table(sdata, table_key)
    if use_rep not in adata.obsm:
        raise KeyError(
            f"use_rep={use_rep!r} is not in obsm (keys: {sorted(adata.obsm)}); run sigmma_sc.tl.fit or pass "
            "another embedding's key."
        )
    for name, key in (("batch_key", batch_key), ("labels_key", labels_key)):
        if key is not None and key not in adata.obs:
            raise KeyError(f"{name}={key!r} is not an obs column (columns: {list(adata.obs.columns)}).")
    x = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"obsm[{use_rep!r}] must be a finite 2-D array, got shape {x.shape} with non-finite values.")
    n = x.shape[0]
    if not 1 <= int(n_neighbors) < n:
        raise ValueError(f"n_neighbors must be in [1, {n - 1}] for {n} units, got {n_neighbors}.")
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}.")
    if min_units < 1 or min_batches < 1:
        raise ValueError(f"min_units and min_batches must be >= 1, got {min_units} and {min_batches}.")
    batches = adata.obs[batch_key].astype(str).to_numpy()
    seed = settings.seed if seed is None else int(seed)

    import anndata as ad
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import NearestNeighbors

    k = int(n_neighbors)
    # k + 1 neighbours: each unit is its own nearest one (duplicated rows may swap with it).
    idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)
    self_col = idx == np.arange(n)[:, None]
    keep = ~self_col
    keep[~self_col.any(axis=1), -1] = False
    neighbours = idx[keep].reshape(n, k)

    light = ad.AnnData(np.zeros((n, 0), dtype=np.float32))
    light.obsm["rep"] = x
    sc.pp.neighbors(light, use_rep="rep", n_neighbors=k, random_state=seed)
    sc.tl.leiden(light, resolution=resolution, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
    clusters = light.obs["leiden"].to_numpy()

    out = {
        "knn_other_batch": float(other_batch_share(neighbours, batches).mean()),
        "knn_other_batch_uniform": uniform_other_batch_share(batches),
        "shared_clusters": shared_cluster_share(clusters, batches, min_units=min_units, min_batches=min_batches),
        "n_clusters": float(np.unique(clusters).size),
        "n_batches": float(np.unique(batches).size),
    }
    if labels_key is not None:
        out["ari"] = float(adjusted_rand_score(adata.obs[labels_key].astype(str).to_numpy(), clusters))
    return out
