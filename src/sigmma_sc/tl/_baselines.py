"""Baselines that :func:`sigmma_sc.tl.evaluate` runs beside SIGMMA on the same split.

- ``ridge``: the HEST-Benchmark linear probe (Jaume et al., NeurIPS 2024, ``hest.bench``):
  frozen features of each unit's meso view -> standardisation -> ``PCA(256)`` fit on the
  training units -> ``Ridge(alpha=100 / (d * n_genes), fit_intercept=False, solver="lsqr")``
  with ``d`` the PCA dimension and ``n_genes`` the number of targets, on uncentred log1p targets
  (as HEST does; Pearson r is blind to the missing intercept). One deviation: HEST's
  ``StandardScaler`` is replaced by :func:`sigmma_sc.pp.standardize_features` (standard deviation
  floored, z-scores clipped to ±5). Dense CNN features have channels that are almost constant on
  the training units; ``StandardScaler`` turns them into test z-scores of ~1e13 and the probe
  collapses (her2st C2-C5 -> C6: mean r 0.02 instead of 0.28).
- ``ridge_cv``: ``RidgeCV`` (alphas 1e0..1e6, generalised cross-validation; computed by
  :func:`ridge_cv_sets`, one decomposition for every gene set) on the concatenated
  frozen features of every hierarchy level plus the mean of those features over each unit's
  spatial-graph neighbours, standardised with z-scores clipped by
  :func:`sigmma_sc.pp.standardize_features` (fit on the training units).
- ``single_scale``: :func:`sigmma_sc.tl.fit` with ``levels=("meso",)`` and ``graph=False``
  (BLEEP-like CLIP of the spot / niche view), with the model's encoder and genes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import pp
from .._constants import Defaults, Keys, Levels
from .._logging import logger
from ..io import get_table
from ..model import Sigmma, apply_section_scaling, feature_scaling, standardize_features
from ._fit import fit, light_copy

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: Alphas searched by ``ridge_cv`` (log-spaced, two per decade).
RIDGE_CV_ALPHAS: np.ndarray = np.logspace(0, 6, 13)
#: PCA dimension of the HEST probe.
PROBE_COMPONENTS: int = 256
#: Baseline names understood by :func:`sigmma_sc.tl.evaluate`.
BASELINES: tuple[str, ...] = ("ridge", "ridge_cv", "single_scale")


def _as_2d_float(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (units x features), got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values; impute or drop those units first.")
    return x


def ridge_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    *,
    n_components: int = PROBE_COMPONENTS,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """HEST-Benchmark linear probe: robust z-scores -> PCA -> ridge with ``alpha = 100 / (d * n_genes)``.

    Features are standardised with :func:`sigmma_sc.pp.standardize_features` (HEST uses
    ``StandardScaler``, which explodes on near-constant channels of dense CNN features; see the
    module notes).

    Parameters
    ----------
    x_train
        ``(n_train, n_features)`` frozen image features of the training units.
    y_train
        ``(n_train, n_genes)`` log1p expression targets (not centred, as in HEST).
    x_test
        ``(n_test, n_features)`` features of the test units.
    n_components
        PCA dimension ``d`` (capped by the training size and feature count).
    seed
        ``random_state`` of the PCA and the solver.

    Returns
    -------
    ``(predictions (n_test, n_genes), alpha)``. Without intercept and with centred PCA scores the
    predictions are centred near 0: compare them by correlation, not by absolute level.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(100, 20))
    >>> y = x[:, :3] @ rng.normal(size=(3, 4))
    >>> pred, alpha = ridge_probe(x[:80], y[:80], x[80:], n_components=10)
    >>> pred.shape, alpha
    ((20, 4), 2.5)
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge

    x_train = _as_2d_float(x_train, "x_train")
    x_test = _as_2d_float(x_test, "x_test")
    y_train = _as_2d_float(y_train, "y_train")
    d = int(min(n_components, x_train.shape[0], x_train.shape[1]))
    s_train, s_test = standardized_pair(x_train, x_test)
    pca = PCA(n_components=d, random_state=seed)
    z_train = pca.fit_transform(s_train)
    z_test = pca.transform(s_test)
    alpha = 100.0 / (d * y_train.shape[1])
    reg = Ridge(alpha=alpha, fit_intercept=False, solver="lsqr", random_state=seed, max_iter=1000)
    reg.fit(z_train, y_train)
    return np.asarray(reg.predict(z_test), dtype=np.float64).reshape(len(z_test), -1), alpha


def ridge_cv_sets(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    target_sets: dict[str, np.ndarray],
    *,
    alphas: np.ndarray = RIDGE_CV_ALPHAS,
    chunk: int = 4096,
) -> dict[str, tuple[np.ndarray, float]]:
    """Ridge regressions with the penalty chosen by leave-one-out cross-validation, one per target set.

    What ``sklearn.linear_model.RidgeCV(alphas, fit_intercept=True)`` computes (its generalised
    cross-validation is the exact leave-one-out error of a ridge with an unpenalised intercept),
    one penalty per target set (HEST's choice: it depends on the targets), from one decomposition
    of the design shared by every set and penalty: the eigenvectors of the centred ``X^T X``,
    accumulated ``chunk`` units at a time. Memory is ``features^2`` plus a chunk, not a copy of the
    design per penalty; on 120,000 Visium HD bins x 7,680 columns and four gene sets sklearn took
    33 min and 20 GB (one SVD per set).

    Parameters
    ----------
    x_train
        ``(n_train, n_features)`` standardised features.
    y_train
        ``(n_train, n_genes)`` log1p expression.
    x_test
        ``(n_test, n_features)`` standardised features.
    target_sets
        Name -> column indices of ``y_train`` fitted together (one penalty each).
    alphas
        Penalties searched (positive).
    chunk
        Units per block of the accumulation.

    Returns
    -------
    Name -> ``(predictions (n_test, len(columns)), chosen alpha)``.

    Examples
    --------
    >>> import numpy as np
    >>> gen = np.random.default_rng(1)
    >>> feats = gen.normal(size=(120, 20))
    >>> genes = feats[:, :3] @ gen.normal(size=(3, 4)) + gen.normal(size=(120, 4))
    >>> out = ridge_cv_sets(feats[:90], genes[:90], feats[90:], {"a": np.arange(4), "b": np.array([0])})
    >>> out["a"][0].shape, out["b"][0].shape
    ((30, 4), (30, 1))
    """
    x_train = _as_2d_float(x_train, "x_train")
    x_test = _as_2d_float(x_test, "x_test")
    y_train = _as_2d_float(y_train, "y_train")
    alphas = np.asarray(alphas, dtype=np.float64)
    if not len(alphas) or not (alphas > 0).all():
        raise ValueError(f"alphas must be positive penalties, got {alphas!r}.")
    n, p = x_train.shape
    if len(y_train) != n:
        raise ValueError(f"x_train has {n} units but y_train {len(y_train)}.")
    if x_test.shape[1] != p:
        raise ValueError(f"x_test has {x_test.shape[1]} features but x_train {p}.")
    if n <= p:
        # Fewer units than features: sklearn's own GCV works on the small n x n kernel.
        from sklearn.linear_model import RidgeCV

        out = {}
        for name, cols in target_sets.items():
            reg = RidgeCV(alphas=alphas, fit_intercept=True).fit(x_train, y_train[:, np.asarray(cols, dtype=np.int64)])
            out[name] = (np.asarray(reg.predict(x_test), dtype=np.float64).reshape(len(x_test), -1), float(reg.alpha_))
        return out
    mean_x, mean_y = x_train.mean(axis=0), y_train.mean(axis=0)
    gram = np.zeros((p, p))
    cross = np.zeros((p, y_train.shape[1]))
    for lo in range(0, n, chunk):
        xc = x_train[lo : lo + chunk] - mean_x
        gram += xc.T @ xc
        cross += xc.T @ (y_train[lo : lo + chunk] - mean_y)
    eig, vecs = np.linalg.eigh(gram)
    eig = np.clip(eig, 0.0, None)
    del gram
    proj = vecs.T @ cross  # (p, genes): V^T Xc^T yc
    inv = 1.0 / (eig[None, :] + alphas[:, None])  # (alphas, p)
    # Squared leave-one-out residuals per penalty and gene: (y - y_hat) / (1 - h), with h the
    # diagonal of the hat matrix, 1/n of it from the intercept.
    sse = np.zeros((len(alphas), y_train.shape[1]))
    for lo in range(0, n, chunk):
        z = (x_train[lo : lo + chunk] - mean_x) @ vecs
        resid = y_train[lo : lo + chunk] - mean_y
        hat = (z**2) @ inv.T + 1.0 / n  # (chunk, alphas)
        for a in range(len(alphas)):
            loo = (resid - z @ (inv[a][:, None] * proj)) / (1.0 - hat[:, a])[:, None]
            sse[a] += (loo**2).sum(axis=0)
    z_test = (x_test - mean_x) @ vecs
    out: dict[str, tuple[np.ndarray, float]] = {}
    for name, cols in target_sets.items():
        cols = np.asarray(cols, dtype=np.int64)
        best = int(np.argmin(sse[:, cols].sum(axis=1)))  # first of equals, as RidgeCV
        pred = mean_y[cols] + z_test @ (inv[best][:, None] * proj[:, cols])
        out[name] = (pred, float(alphas[best]))
    return out


def ridge_cv(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    *,
    alphas: np.ndarray = RIDGE_CV_ALPHAS,
) -> tuple[np.ndarray, float]:
    """Ridge regression with the penalty chosen by leave-one-out cross-validation on the training units.

    Features are expected standardised already (``ridge_cv`` in :func:`sigmma_sc.tl.evaluate`
    uses :func:`sigmma_sc.pp.standardize_features`); one alpha is chosen for all genes
    (:func:`ridge_cv_sets` with one set: every column of ``y_train``).

    Parameters
    ----------
    x_train, y_train, x_test, alphas
        As in :func:`ridge_cv_sets`.

    Returns
    -------
    ``(predictions (n_test, n_genes), chosen alpha)``.

    Examples
    --------
    >>> import numpy as np
    >>> gen = np.random.default_rng(1)
    >>> feats = gen.normal(size=(120, 20))
    >>> genes = feats[:, :3] @ gen.normal(size=(3, 4))
    >>> pred, alpha = ridge_cv(feats[:90], genes[:90], feats[90:])
    >>> pred.shape
    (30, 4)
    """
    y = _as_2d_float(y_train, "y_train")
    return ridge_cv_sets(x_train, y, x_test, {"all": np.arange(y.shape[1])}, alphas=alphas)["all"]


def neighbour_mean(
    values: np.ndarray, connectivities: sp.spmatrix | np.ndarray, *, rows: np.ndarray | None = None
) -> np.ndarray:
    """Mean of ``values`` over each unit's graph neighbours (the unit itself when it has none).

    Parameters
    ----------
    values
        ``(n_units, n_features)``.
    connectivities
        ``(n_units, n_units)`` adjacency (any non-zero is an edge; weights are ignored), e.g.
        ``obsp["spatial_connectivities"]``.
    rows
        Only these units (their neighbours may be any unit); ``None``: all.

    Returns
    -------
    ``(len(rows) or n_units, n_features)``, the dtype of ``values`` (float32 or float64).

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    >>> neighbour_mean(np.array([[1.0], [2.0], [4.0]]), a).ravel()
    array([2. , 2.5, 2. ])
    >>> neighbour_mean(np.array([[1.0], [2.0], [4.0]]), a, rows=np.array([1])).ravel()
    array([2.5])
    """
    values = np.asarray(values)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    adj = sp.csr_matrix(connectivities, dtype=values.dtype)
    if adj.shape != (values.shape[0], values.shape[0]):
        raise ValueError(f"connectivities has shape {adj.shape}, expected ({values.shape[0]}, {values.shape[0]}).")
    adj.data[:] = 1.0
    adj.setdiag(0)
    adj.eliminate_zeros()
    rows = np.arange(values.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    adj = adj[rows]
    deg = np.asarray(adj.sum(axis=1)).ravel()
    out = values[rows].copy()
    has = deg > 0
    out[has] = (adj[has] @ values) / deg[has, None]
    return out


def unit_level_features(hierarchy: Any, features: dict[str, np.ndarray], level: str) -> np.ndarray:
    """Features of ``level`` per table unit, following the hierarchy.

    Levels at or above the unit level are looked up through ``Hierarchy.unit_nodes``; a level
    finer than the unit level (nuclei under a spot) is averaged per unit with
    ``Hierarchy.children_mean``. Units without any finer node (a spot without nuclei) get the
    mean over the units that have one.

    Parameters
    ----------
    hierarchy
        A :class:`sigmma_sc.pp.Hierarchy`.
    features
        ``{level: (n_nodes, n_features)}`` as returned by :func:`sigmma_sc.pp.get_features`.
    level
        Level name.

    Returns
    -------
    ``(n_units, n_features)`` float32 (a million units x 1,280 channels is 5 GB in float64).

    Examples
    --------
    On ``train``, 200 synthetic cells with the hierarchy and features of ``model``'s fit (see
    :class:`sigmma_sc.Sigmma`):

    >>> import sigmma_sc as sg
    >>> h = sg.pp.get_hierarchy(train)
    >>> feats = sg.pp.get_features(train, key=model.feature_key)
    >>> feats["macro"].shape, unit_level_features(h, feats, "macro").shape  # 9 regions, 200 cells
    ((9, 1280), (200, 1280))
    """
    if level not in features:
        raise KeyError(f"No image features for level {level!r}; the feature set holds {sorted(features)}.")
    order = list(Levels.ALL)
    values = np.asarray(features[level], dtype=np.float32)
    if order.index(level) >= order.index(hierarchy.unit_level):
        return values[np.asarray(hierarchy.unit_nodes(level))]
    # Table units are the unit-level nodes, in order.
    pooled = np.asarray(hierarchy.children_mean(level, values), dtype=np.float32)
    n_children = np.bincount(hierarchy.ancestors(level, hierarchy.unit_level), minlength=len(pooled))
    missing = n_children == 0
    if missing.any():
        fill = pooled[~missing].mean(axis=0) if (~missing).any() else np.zeros(pooled.shape[1])
        pooled[missing] = fill
    return pooled


def multiscale_features(
    hierarchy: Any,
    features: dict[str, np.ndarray],
    connectivities: sp.spmatrix | np.ndarray | None,
    *,
    rows: np.ndarray | None = None,
    levels: Sequence[str] | None = None,
) -> np.ndarray:
    """Per unit: features of every level (fine to coarse) concatenated, plus their neighbour mean.

    Parameters
    ----------
    hierarchy
        A :class:`sigmma_sc.pp.Hierarchy`.
    features
        ``{level: (n_nodes, n_features)}``.
    connectivities
        Unit graph (``obsp["spatial_connectivities"]``); ``None`` leaves out the neighbour block.
    rows
        Only these units (a training subsample: the full matrix of 150k Visium HD bins x 7,680
        columns does not fit in memory); ``None``: all.
    levels
        Only these levels (a model's ``levels``: a cache may hold more, e.g. from another fit of
        the same slide); ``None``: every level the hierarchy and the features have.

    Returns
    -------
    ``(len(rows) or n_units, n_levels * n_features * (2 if connectivities is not None else 1))`` float32.

    Examples
    --------
    On ``train``, 200 synthetic cells with the hierarchy and features of ``model``'s fit:

    >>> import sigmma_sc as sg
    >>> hier = sg.pp.get_hierarchy(train)
    >>> feats = sg.pp.get_features(train, key=model.feature_key)
    >>> multiscale_features(hier, feats, train["table"].obsp["spatial_connectivities"]).shape  # 3 levels x 1280 x 2
    (200, 7680)
    """
    wanted = Levels.ALL if levels is None else tuple(levels)
    levels = [lv for lv in Levels.ALL if lv in wanted and lv in hierarchy.levels and lv in features]
    own = np.concatenate([unit_level_features(hierarchy, features, lv) for lv in levels], axis=1)
    idx = np.arange(len(own)) if rows is None else np.asarray(rows, dtype=np.int64)
    if connectivities is None:
        return own[idx]
    return np.concatenate([own[idx], neighbour_mean(own, connectivities, rows=idx)], axis=1)


def baseline_features(
    sdata: SpatialData,
    *,
    kind: str,
    feature_key: str | None,
    table_key: str = Keys.TABLE,
    rows: np.ndarray | None = None,
    levels: Sequence[str] | None = None,
) -> np.ndarray:
    """Return the unit features a ridge baseline reads from a SpatialData with hierarchy and features.

    Parameters
    ----------
    sdata
        Data with ``pp.build_hierarchy`` and ``pp.image_features`` already run (``Sigmma.get_embeddings``
        runs them when missing).
    kind
        ``"meso"`` (the HEST probe's single view) or ``"multiscale"`` (every level + neighbour mean).
    feature_key
        Feature cache key (the model's ``feature_key``); ``None`` takes the newest.
    table_key
        Table holding the units.
    rows
        Only these units (``None``: all).
    levels
        ``"multiscale"``: only these levels (the model's), see :func:`multiscale_features`.

    Returns
    -------
    ``(len(rows) or n_units, n_features)`` float32.

    Examples
    --------
    >>> baseline_features(train, kind="multiscale", feature_key=model.feature_key).shape
    (200, 7680)
    >>> baseline_features(train, kind="meso", feature_key=model.feature_key, rows=[0, 1]).shape
    (2, 1280)
    """
    hierarchy = pp.get_hierarchy(sdata, table_key=table_key)
    features = pp.get_features(sdata, key=feature_key, table_key=table_key)
    if kind == "meso":
        x = unit_level_features(hierarchy, features, Levels.MESO)
        return x if rows is None else x[np.asarray(rows, dtype=np.int64)]
    if kind == "multiscale":
        table = get_table(sdata, table_key)
        # The unit graph the hierarchy was built on (the package's, or the user's when asked for).
        stored = table.uns.get(Keys.UNS, {}).get(Keys.HIERARCHY, {})
        key = str(stored.get(Keys.UNIT_GRAPH, Keys.CONNECTIVITIES))
        conn = table.obsp.get(key)
        if conn is None:
            logger.warning(f"Table {table_key!r} has no obsp[{key!r}]: ridge_cv runs without neighbour features.")
        return multiscale_features(hierarchy, features, conn, rows=rows, levels=levels)
    raise ValueError(f"kind must be 'meso' or 'multiscale', got {kind!r}.")


def standardized_pair(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score train and test features with the training statistics, clipped as everywhere in the package.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = standardized_pair(rng.normal(size=(50, 3)), 10 * rng.normal(size=(10, 3)))
    >>> a.std(axis=0).round(3).tolist(), float(np.abs(b).max())  # test values clipped at 5
    ([1.0, 1.0, 1.0], 5.0)
    """
    return standardize_features(x_train, x_test)


def per_section_z(x: np.ndarray, section: np.ndarray) -> np.ndarray:
    """Z-score each section's rows with that section's own statistics, as SIGMMA scales its inputs by default.

    Sections under ``Defaults.FEATURE_NORM_MIN_NODES`` rows use the statistics of all rows.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.concatenate([np.arange(40.0), 100 + 3 * np.arange(40.0)])[:, None]
    >>> z = per_section_z(x, np.repeat([0, 1], 40))
    >>> np.allclose(z[:40], z[40:])  # the shift and scale between the sections are gone
    True
    """
    return apply_section_scaling(x, section, feature_scaling(x))[0]


def fit_single_scale(model: Sigmma, train_sdata: SpatialData, *, seed: int, **fit_kwargs: Any) -> Sigmma:
    """Single-scale, graph-free CLIP on the same encoder and genes as ``model`` (BLEEP-like).

    ``tl.fit(levels=("meso",), graph=False)``: the spot (or niche) view aligned with its
    expression, nothing else. Fits on a :func:`light_copy` of ``train_sdata`` so the SIGMMA
    embeddings in the user's table stay as they are.

    Parameters
    ----------
    model
        The SIGMMA model whose encoder and genes are reused.
    train_sdata
        Its training data.
    seed
        Training seed.
    **fit_kwargs
        Further :func:`sigmma_sc.tl.fit` arguments (e.g. ``max_epochs``).

    Returns
    -------
    The fitted single-scale model.

    Examples
    --------
    >>> base = fit_single_scale(model, train, seed=0, max_epochs=1, embed_dim=16, hidden_dim=32)
    >>> base
    Sigmma(levels=('meso',), graph=False, genes=40, embed_dim=16, encoder='efficientnet_lite0', epochs=1)
    >>> base.genes == model.genes
    True
    """
    kwargs = dict(fit_kwargs)
    table_key = kwargs.get("table_key", Keys.TABLE)
    # The model's genes in its order, so the baseline is compared on exactly what SIGMMA models; a
    # table without them (not the model's training data) falls back to the model's rule.
    has_genes = pd.Index(get_table(train_sdata, table_key).var_names).isin(model.genes).sum() == len(model.genes)
    genes = {"genes": list(model.genes)} if has_genes else {"n_genes": len(model.genes)}
    kwargs.update(levels=(Levels.MESO,), graph=False, encoder=model.encoder, seed=seed, **genes)
    kwargs.setdefault("feature_norm", model.params.get("feature_norm", "global"))
    kwargs.setdefault("min_detected", model.params.get("min_detected", Defaults.MIN_DETECTED))
    base = fit(light_copy(train_sdata, table_key=table_key), **kwargs)
    if list(base.genes) != list(model.genes):
        logger.warning(
            f"single_scale selected {len(set(base.genes) ^ set(model.genes))} genes different from the model's: "
            "train_sdata is probably not the model's training data."
        )
    return base
