"""Slide -> model inputs: image-feature scaling, per-level inputs, the expression matrix, genes and the reference.

One owner for everything between a validated slide (:mod:`sigmma_sc.io`) with its hierarchy and
raw image features (:mod:`sigmma_sc.pp`) and the arrays the model trains on. Feature scaling is a
property of the model's inputs (a model keeps its training statistics and applies them to every
slide it embeds), so it lives here, not in :mod:`sigmma_sc.pp`; the baselines import it from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sigmma_sc import pp
from sigmma_sc._constants import Choices, Defaults, Keys
from sigmma_sc._logging import logger
from sigmma_sc.io import SlideData, log1p_normalize

from ._data import LevelInput

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

#: Fewer modelled genes than this leave the expression encoders little to align: warn and name the fix.
FEW_GENES = 50
#: Floor of a channel's standard deviation, relative to its median over channels (:func:`feature_scaling`).
STD_FLOOR = 0.1


# ---------------------------------------------------------------------------------------------
# image-feature scaling (pure numpy)
# ---------------------------------------------------------------------------------------------
def feature_scaling(train: np.ndarray, *, std_floor: float = STD_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and floored standard deviation of training features.

    A channel that barely varies in the training units gets a tiny standard deviation, and new
    units then have z-scores of 10^4 that swamp any distance or linear model; the standard
    deviation is therefore floored at ``std_floor`` times its median over channels.

    Parameters
    ----------
    train
        ``(n, d)`` training features.
    std_floor
        Floor of the per-channel standard deviation, relative to its median over channels.

    Returns
    -------
    ``(mean, std)``, each ``(d,)`` float64.

    Examples
    --------
    >>> import numpy as np
    >>> mu, sd = feature_scaling(np.array([[0.0, 1.0], [2.0, 1.0]]))
    >>> mu.tolist(), sd.tolist()
    ([1.0, 1.0], [1.0, 0.1])
    """
    train = np.asarray(train)
    if train.size <= _EXACT_ELEMENTS:
        train = train.astype(np.float64, copy=False)
        mu, sd = train.mean(axis=0), train.std(axis=0)
    else:
        mu, sd = _chunked_mean_std(train)
    return mu, _floored(sd, std_floor)


def _floored(sd: np.ndarray, std_floor: float) -> np.ndarray:
    positive = sd[sd > 0]
    floor = std_floor * float(np.median(positive)) if positive.size else 1.0
    return np.maximum(sd, max(floor, 1e-12))


# Up to this many values (512 MB as float64) the statistics come from numpy's exact-order mean /
# std (the figures in benchmarks/README.md); larger inputs (whole Xenium / Visium HD slides at
# 1,280 channels) are read in row blocks so memory stays at one block.
_EXACT_ELEMENTS = 1 << 26
_BLOCK_ROWS = 16_384


def _chunked_mean_std(x: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    # Two passes in float64 (mean, then squared deviations): as accurate as numpy's, one block in
    # memory. ``rows``: statistics of those rows only, read block by block (no copy of the subset).
    n = x.shape[0] if rows is None else len(rows)

    def block(r0: int) -> np.ndarray:
        sel = slice(r0, r0 + _BLOCK_ROWS) if rows is None else rows[r0 : r0 + _BLOCK_ROWS]
        return np.array(x[sel], dtype=np.float64)  # a fresh copy: the second pass works in place

    total = np.zeros(x.shape[1], dtype=np.float64)
    for r0 in range(0, n, _BLOCK_ROWS):
        total += block(r0).sum(axis=0)
    mu = total / n
    sq = np.zeros_like(mu)
    for r0 in range(0, n, _BLOCK_ROWS):
        d = block(r0)
        np.subtract(d, mu, out=d)
        np.square(d, out=d)
        sq += d.sum(axis=0)
    return mu, np.sqrt(sq / n)


def apply_feature_scaling(
    x: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    *,
    clip: float | None = Defaults.FEATURE_Z_CLIP,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Z-scores of features under saved statistics, clipped to ``[-clip, clip]``.

    Parameters
    ----------
    x
        ``(m, d)`` features.
    mean, std
        ``(d,)`` statistics from :func:`feature_scaling`.
    clip
        Absolute clip of the z-scores (``None``: no clip).
    out
        ``(m, d)`` float32 array to write into (default: a new one). Rows are scaled by blocks, so
        the temporaries are one block, never the whole input.

    Returns
    -------
    ``(m, d)`` float32.

    Examples
    --------
    >>> import numpy as np
    >>> apply_feature_scaling(np.array([[3.0, 100.0]]), np.zeros(2), np.ones(2)).tolist()
    [[3.0, 5.0]]
    """
    if out is None:
        out = np.empty(np.shape(x), dtype=np.float32)
    for r0 in range(0, len(out), _BLOCK_ROWS):
        z = (np.asarray(x[r0 : r0 + _BLOCK_ROWS], dtype=np.float64) - mean) / std
        if clip is not None:
            z = np.clip(z, -clip, clip)
        out[r0 : r0 + _BLOCK_ROWS] = z
    return out


class ScaledFeatures:
    """Image features z-scored on read: the model's input without a scaled copy of the slide.

    Indexing returns float32 rows ``clip((raw[rows] - mean[g]) / std[g])`` with ``g`` the row's
    group (its section, or one group for training statistics), computed in float64 block by block
    as :func:`apply_feature_scaling` does, so the values are the same bit for bit. The batches of
    training and inference scale only the rows they draw: memory follows the batch, and the raw
    features (the table's cache) are the only per-node copy.

    Parameters
    ----------
    raw
        ``(n, d)`` raw features (not copied).
    group
        ``(n,)`` row of ``mean`` / ``std`` for each node.
    mean, std
        ``(n_groups, d)`` statistics.
    clip
        Absolute clip of the z-scores (``None``: no clip).

    Examples
    --------
    >>> import numpy as np
    >>> x = ScaledFeatures(np.array([[0.0], [2.0], [10.0]]), np.array([0, 0, 1]), np.array([[1.0], [10.0]]), np.ones((2, 1)))
    >>> x.shape, x[np.array([0, 2])].ravel().tolist(), np.asarray(x).ravel().tolist()
    ((3, 1), [-1.0, 0.0], [-1.0, 1.0, 0.0])
    """

    _ROWS = 4096  # rows scaled at once: float64 temporaries of ~40 MB at 1,280 channels

    def __init__(
        self,
        raw: np.ndarray,
        group: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
        *,
        clip: float | None = Defaults.FEATURE_Z_CLIP,
    ) -> None:
        self.raw = raw
        self.group = np.asarray(group, dtype=np.intp).reshape(-1)
        self.mean = np.atleast_2d(mean)
        self.std = np.atleast_2d(std)
        self.clip = clip
        if len(self.group) != len(raw):
            raise ValueError(f"group has {len(self.group)} codes for {len(raw)} feature rows.")

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, d)``, as the raw features."""
        return tuple(self.raw.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        """Always float32."""
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.raw)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[slice(None)]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, idx: Any) -> np.ndarray:
        n = len(self.raw)
        if isinstance(idx, slice):
            rows = np.arange(*idx.indices(n))
        else:
            rows = np.asarray(idx)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            rows = rows.reshape(-1)
        out = np.empty((len(rows), self.raw.shape[1]), dtype=np.float32)
        for r0 in range(0, len(rows), self._ROWS):
            sel = rows[r0 : r0 + self._ROWS]
            # float64 as the statistics, in place: the values of ((x - mean) / std).clip() without its temporaries.
            z = np.array(self.raw[sel], dtype=np.float64)
            g = self.group[sel]
            codes = np.unique(g)
            if len(codes) == 1:
                np.subtract(z, self.mean[codes[0]], out=z)
                np.divide(z, self.std[codes[0]], out=z)
            else:
                for c in codes:
                    m = g == c
                    z[m] = (z[m] - self.mean[c]) / self.std[c]
            if self.clip is not None:
                np.clip(z, -self.clip, self.clip, out=z)
            out[r0 : r0 + self._ROWS] = z
        return out


def section_statistics(
    x: np.ndarray,
    section: np.ndarray,
    fallback: tuple[np.ndarray, np.ndarray],
    *,
    min_nodes: int = Defaults.FEATURE_NORM_MIN_NODES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Each section's :func:`feature_scaling` statistics, read without copying the slide.

    Parameters
    ----------
    x
        ``(n, d)`` features.
    section
        ``(n,)`` section code of each row.
    fallback
        ``(mean, std)`` for sections with fewer than ``min_nodes`` rows (no reliable statistics).
    min_nodes
        Smallest section standardised on its own.

    Returns
    -------
    ``(group, mean, std, small)``: ``(n,)`` row of each node into the ``(n_sections, d)`` statistics,
    and the codes of the sections that used the fallback.

    Examples
    --------
    >>> import numpy as np
    >>> group, mu, sd, small = section_statistics(np.array([[0.0], [2.0], [7.0]]), np.array([3, 3, 5]), (np.zeros(1), np.ones(1)), min_nodes=2)
    >>> group.tolist(), mu.ravel().tolist(), sd.ravel().tolist(), small
    ([0, 0, 1], [1.0, 0.0], [1.0, 1.0], [5])
    """
    section = np.asarray(section).reshape(-1)
    if len(section) != len(x):
        raise ValueError(f"section has {len(section)} codes for {len(x)} feature rows.")
    codes, group = np.unique(section, return_inverse=True)
    means, stds, small = [], [], []
    for i, code in enumerate(codes):
        rows = np.flatnonzero(group == i)
        if rows.size < min_nodes:
            mu, sd = fallback
            small.append(int(code))
        elif rows.size == len(x):
            mu, sd = feature_scaling(x)
        elif rows.size * x.shape[1] <= _EXACT_ELEMENTS:
            mu, sd = feature_scaling(x[rows])
        else:
            mu, sd = _chunked_mean_std(x, rows)
            sd = _floored(sd, STD_FLOOR)
        means.append(mu)
        stds.append(sd)
    return group, np.stack(means), np.stack(stds), small


def apply_section_scaling(
    x: np.ndarray,
    section: np.ndarray,
    fallback: tuple[np.ndarray, np.ndarray],
    *,
    min_nodes: int = Defaults.FEATURE_NORM_MIN_NODES,
    clip: float | None = Defaults.FEATURE_Z_CLIP,
) -> tuple[np.ndarray, list[int]]:
    """Z-score features within each section, removing a slide's stain and scanner shift.

    Every section is standardised with its own :func:`feature_scaling`; a section with fewer than
    ``min_nodes`` rows has no reliable statistics and uses ``fallback`` (the training statistics).
    The model reads the same values lazily (:class:`ScaledFeatures`); this returns them as an array.

    Parameters
    ----------
    x, section, fallback, min_nodes
        As in :func:`section_statistics`.
    clip
        Absolute clip of the z-scores (``None``: no clip).

    Returns
    -------
    ``((n, d) float32 z-scores, codes of the sections that used the fallback)``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0.0], [2.0], [10.0], [12.0]])
    >>> z, small = apply_section_scaling(x, np.array([0, 0, 1, 1]), (np.zeros(1), np.ones(1)), min_nodes=2)
    >>> z.ravel().tolist(), small
    ([-1.0, 1.0, -1.0, 1.0], [])
    """
    group, mean, std, small = section_statistics(x, section, fallback, min_nodes=min_nodes)
    return np.asarray(ScaledFeatures(x, group, mean, std, clip=clip)), small


def standardize_features(
    train: np.ndarray, *others: np.ndarray, clip: float | None = Defaults.FEATURE_Z_CLIP, std_floor: float = STD_FLOOR
) -> tuple[np.ndarray, ...]:
    """Z-score features with the training set's statistics, robust to near-constant channels.

    The standard deviation is floored (:func:`feature_scaling`) and the z-scores are clipped to
    ``[-clip, clip]`` (:func:`apply_feature_scaling`), so a channel nearly constant in training
    cannot dominate new units.

    Parameters
    ----------
    train
        ``(n, d)`` training features (statistics come from here).
    *others
        Further ``(m, d)`` arrays standardised with the training statistics.
    clip
        Absolute clip of the z-scores (``None``: no clip).
    std_floor
        Floor of the per-channel standard deviation, relative to its median over channels.

    Returns
    -------
    ``(train_z, *others_z)`` float32.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> tr, te = rng.normal(size=(100, 4)), rng.normal(size=(10, 4))
    >>> tr[:, 3] = 1.0
    >>> te[:, 3] = 2.0
    >>> ztr, zte = standardize_features(tr, te)
    >>> float(np.abs(zte).max()) <= 5.0
    True
    """
    mu, sd = feature_scaling(train, std_floor=std_floor)
    return tuple(apply_feature_scaling(x, mu, sd, clip=clip) for x in (train, *others))


def feature_stats(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and floored std of training features (:func:`feature_scaling`), as a model saves them (float32).

    Examples
    --------
    >>> import numpy as np
    >>> mu, sd = feature_stats(np.array([[0.0, 1.0], [2.0, 1.0]]))
    >>> mu.round(3).tolist(), bool(sd[1] > 0)
    ([1.0, 1.0], True)
    """
    mu, sd = feature_scaling(train)
    return mu.astype(np.float32), sd.astype(np.float32)


def check_channels(x: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> None:
    """Refuse features from another encoder than the model's (a channel-count mismatch).

    Examples
    --------
    >>> import numpy as np
    >>> check_channels(np.zeros((2, 3)), (np.zeros(3), np.ones(3)))
    """
    if x.shape[1] != stats[0].shape[0]:
        raise ValueError(
            f"image features have {x.shape[1]} channels but the model was trained on {stats[0].shape[0]}: "
            "the encoder differs from the model's."
        )


def apply_feature_stats(x: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Standardise and clip features with a model's saved statistics.

    Examples
    --------
    >>> import numpy as np
    >>> apply_feature_stats(np.array([[2.0]]), (np.zeros(1), np.ones(1))).tolist()
    [[2.0]]
    """
    check_channels(x, stats)
    return apply_feature_scaling(x, *stats)


def scale_features(
    x: np.ndarray,
    section: np.ndarray,
    stats: tuple[np.ndarray, np.ndarray],
    *,
    feature_norm: str,
    sections: Sequence[str],
    level: str,
) -> ScaledFeatures:
    """Model inputs from raw features: per-section z-scores (``"section"``) or the training statistics (``"global"``).

    The z-scores are computed when rows are read (:class:`ScaledFeatures`), never for the whole slide.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(80, dtype=float).reshape(40, 2)
    >>> z = scale_features(x, np.zeros(40, int), (np.zeros(2), np.ones(2)), feature_norm="section", sections=["A"], level="meso")
    >>> bool(abs(np.asarray(z).mean()) < 1e-6)
    True
    """
    if feature_norm not in Choices.FEATURE_NORMS:
        raise ValueError(f"feature_norm must be one of {Choices.FEATURE_NORMS}, got {feature_norm!r}.")
    check_channels(x, stats)
    if feature_norm == "global":
        return ScaledFeatures(x, np.zeros(len(x), dtype=np.intp), stats[0], stats[1])
    group, mean, std, small = section_statistics(x, section, stats)
    if small:
        names = [sections[c] for c in small]
        logger.warning(
            f"sections {names} have fewer than {Defaults.FEATURE_NORM_MIN_NODES} {level} nodes: their "
            "image features are standardised with the training statistics, not their own"
        )
    return ScaledFeatures(x, group, mean, std)


# ---------------------------------------------------------------------------------------------
# a slide's inputs
# ---------------------------------------------------------------------------------------------
def slide_features(
    sdata: SpatialData,
    *,
    table_key: str,
    levels: Sequence[str],
    encoder: Any,
    feature_method: str = Defaults.FEATURE_METHOD,
    stain_normalize: str | None = None,
    hierarchy_kwargs: dict[str, Any] | None = None,
) -> tuple[SlideData, pp.Hierarchy, dict[str, np.ndarray], pp.FeatureKey]:
    """Return the validated slide, its hierarchy and its raw image features per level, computed when missing.

    Returns
    -------
    ``(slide, hierarchy, {level: (n_nodes, dim) raw features}, feature key)``; levels the hierarchy
    lacks are left out.
    """
    slide, hier = pp.ensure_hierarchy(sdata, table_key=table_key, require_image=False, **(hierarchy_kwargs or {}))
    use = [lv for lv in levels if lv in hier.levels]
    key = pp.image_features(
        sdata,
        table_key=table_key,
        encoder=encoder,
        method=feature_method,
        levels=use,
        stain_normalize=stain_normalize,
    )
    feats = pp.get_features(sdata, key=key, table_key=table_key)
    return slide, hier, {lv: feats[lv] for lv in use if lv in feats}, key


def level_inputs(
    hier: pp.Hierarchy,
    feats: dict[str, np.ndarray],
    stats: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    feature_norm: str = Defaults.FEATURE_NORM,
) -> dict[str, LevelInput]:
    """Model inputs of every hierarchy level: graph, parents, members and scaled image features.

    ``feature_norm="section"`` z-scores each section's features with its own statistics (the
    training statistics for sections under ``Defaults.FEATURE_NORM_MIN_NODES`` nodes);
    ``"global"`` uses the training statistics everywhere.
    """
    out = {}
    for name, lv in hier.levels.items():
        f = None
        if name in feats and name in stats:
            f = scale_features(
                feats[name], lv.section, stats[name], feature_norm=feature_norm, sections=hier.sections, level=name
            )
        out[name] = LevelInput(
            name=name, n=lv.n_nodes, edges=lv.edges, parent=lv.parent, features=f, members=lv.members
        )
    return out


def has_expression_matrix(table: AnnData) -> bool:
    """Whether a table carries any expression (H&E-only tables have no genes or no ``X``)."""
    return table.n_vars > 0 and (table.X is not None or Keys.COUNTS_LAYER in table.layers)


def expression_matrix(slide: SlideData) -> sp.csr_matrix:
    """Raw counts, or the log1p-normalised ``X`` of tables flagged ``log_normalized``."""
    if slide.log_normalized:
        return sp.csr_matrix(slide.table.X, dtype=np.float32)
    return slide.counts()


def _requested_genes(genes: Any, var_names: pd.Index, var: pd.DataFrame | None) -> list[str]:
    # A user's gene choice: a list of var names, or the name of a boolean var column.
    if isinstance(genes, str):
        if var is None:
            raise ValueError(f"genes={genes!r} names a var column; pass the table's var (not only its names).")
        if genes not in var.columns:
            hint = f" ({genes!r} is a gene: pass genes=[{genes!r}] for a list)" if genes in var_names else ""
            raise KeyError(
                f"genes={genes!r}: the table's var has no such column{hint}; boolean columns: "
                f"{[c for c in var.columns if pd.api.types.is_bool_dtype(var[c])]}. Run e.g. "
                "scanpy.pp.highly_variable_genes(adata) first, or pass a list of gene names."
            )
        col = var[genes]
        if not pd.api.types.is_bool_dtype(col) or col.isna().any():
            raise TypeError(
                f"genes={genes!r}: var[{genes!r}] is {col.dtype}, not a boolean column (True for the genes to "
                "model); pass a boolean column or a list of gene names."
            )
        chosen = [str(g) for g in var_names[col.to_numpy(dtype=bool)]]
        if not chosen:
            raise ValueError(f"genes={genes!r}: var[{genes!r}] is False for every gene; no gene to model.")
        return chosen
    if isinstance(genes, pd.Series | pd.Index | np.ndarray) or isinstance(genes, Sequence):
        chosen = list(dict.fromkeys(str(g) for g in genes))
        if not chosen:
            raise ValueError(
                "genes=[] names no gene; pass gene names or a boolean var column such as 'highly_variable'."
            )
        unknown = [g for g in chosen if g not in var_names]
        if unknown:
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise KeyError(
                f"genes=: {len(unknown)} of the {len(chosen)} genes are not in the table's var_names: "
                f"{unknown[:10]}{more}."
            )
        return chosen
    raise TypeError(
        f"genes must be None, a list of gene names or the name of a boolean var column; got {type(genes).__name__}."
    )


def select_genes(
    counts: sp.spmatrix | np.ndarray | None,
    var_names: pd.Index | list[str] | pd.DataFrame,
    *,
    n_genes: int = Defaults.N_GENES,
    log_normalized: bool = False,
    min_detected: float = Defaults.MIN_DETECTED,
    genes: Sequence[str] | str | None = None,
) -> list[str]:
    """Pick the genes a model is trained on: the most variable of the training units, or the user's choice.

    By default, genes detected (non-zero) in at least ``min_detected`` of the units are ranked by
    the variance of their log1p-normalised expression; the top ``n_genes`` are kept, in decreasing
    variance. Unlike scanpy's ``seurat`` flavour, this does not favour low-count noise genes on
    legacy ST data. With ``genes`` the user's choice is returned instead (validated).

    Parameters
    ----------
    counts
        ``(n_units, n_vars)`` raw counts of the training units, or log1p-normalised values when
        ``log_normalized``. May be ``None`` when ``genes`` is given.
    var_names
        Gene names, one per column, or the table's ``var`` (its index are the names), which a
        column name in ``genes`` needs.
    n_genes
        How many genes to keep; capped at the number of detected genes.
    log_normalized
        ``counts`` already holds log1p-normalised values (never log-transform twice).
    min_detected
        Minimum fraction of units in which a gene must be non-zero.
    genes
        The user's choice, which replaces the rule (``n_genes`` and ``min_detected`` do not apply):
        a list of gene names (kept in that order, duplicates dropped), or the name of a boolean
        ``var`` column such as ``"highly_variable"`` (:func:`scanpy.pp.highly_variable_genes`),
        whose ``True`` genes are kept in table order.

    Returns
    -------
    Selected gene names, most variable first (or in the order given).

    Raises
    ------
    KeyError
        ``genes`` names genes not in ``var_names``, or a column ``var`` lacks.
    TypeError
        The named column is not boolean.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.poisson([5.0, 0.5, 20.0], size=(100, 3))
    >>> select_genes(x, ["a", "b", "c"], n_genes=2)
    ['b', 'a']
    >>> import pandas as pd
    >>> var = pd.DataFrame({"highly_variable": [True, False, True]}, index=["a", "b", "c"])
    >>> select_genes(x, var, genes="highly_variable")
    ['a', 'c']
    """
    var_df = var_names if isinstance(var_names, pd.DataFrame) else None
    var_names = pd.Index(var_df.index if var_df is not None else var_names).astype(str)
    if counts is not None and counts.shape[1] != len(var_names):
        raise ValueError(f"counts has {counts.shape[1]} columns but {len(var_names)} gene names were given.")
    if genes is not None:
        return _requested_genes(genes, var_names, var_df)
    if counts is None:
        raise ValueError("select_genes needs the counts of the training units unless genes= is given.")
    if n_genes < 1:
        raise ValueError(f"n_genes must be >= 1, got {n_genes}.")
    x = sp.csr_matrix(counts, dtype=np.float32) if not sp.issparse(counts) else sp.csr_matrix(counts)
    if x.shape[0] == 0:
        raise ValueError("select_genes needs at least one training unit.")
    detected = np.asarray((x > 0).sum(axis=0)).ravel() / x.shape[0]
    keep = np.flatnonzero(detected >= min_detected)
    if keep.size == 0:
        raise ValueError(
            f"no gene is detected in >= {min_detected:.0%} of the {x.shape[0]} training units; "
            "check that the table holds counts (not an empty or H&E-only table)."
        )
    logx = x if log_normalized else log1p_normalize(x)
    logx = logx[:, keep]
    mean = np.asarray(logx.mean(axis=0)).ravel()
    mean_sq = np.asarray(logx.multiply(logx).mean(axis=0)).ravel()
    var = mean_sq - mean**2
    # Stable order: ties broken by the original gene order.
    order = np.lexsort((keep, -var))
    return [str(g) for g in var_names[keep[order[:n_genes]]]]


def default_min_detected(counts: sp.spmatrix | np.ndarray, *, n_genes: int = Defaults.N_GENES) -> float:
    """Return the detection rule of the modelled genes, adapted to how sparse the units are.

    Genes detected in ``Defaults.MIN_DETECTED`` (10%) of the units are modelled when at least
    ``min(n_genes, Defaults.MIN_DETECTED_GENES)`` of them pass (spots: her2st passes thousands).
    Sparser units (fine bins, cells) lower the threshold to the detection rate of that many-th gene,
    never below ``Defaults.MIN_DETECTED_FLOOR`` (1%): Visium HD kidney 16 µm bins pass 17 genes at
    10% and 453 at 1%. The rule reads the counts, not the technology's name, so any table gets it.

    Parameters
    ----------
    counts
        ``(n_units, n_vars)`` counts (or log1p values: only non-zeros are counted) of the training units.
    n_genes
        Genes the model asks for.

    Returns
    -------
    The share of units a gene must be non-zero in.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> dense = rng.poisson(2.0, size=(200, 600))  # spot-like: every gene in most units
    >>> sparse = rng.poisson(0.03, size=(200, 600))  # bin-like: ~3% of units per gene
    >>> default_min_detected(dense), round(default_min_detected(sparse), 3)
    (0.1, 0.02)
    """
    x = sp.csr_matrix(counts)
    if x.shape[0] == 0:
        return float(Defaults.MIN_DETECTED)
    detected = np.sort(np.asarray((x != 0).sum(axis=0)).ravel() / x.shape[0])[::-1]
    target = min(int(n_genes), int(Defaults.MIN_DETECTED_GENES))
    at_target = float(detected[target - 1]) if len(detected) >= target else 0.0
    return float(np.clip(at_target, Defaults.MIN_DETECTED_FLOOR, Defaults.MIN_DETECTED))


def model_genes(
    slide: SlideData,
    matrix: sp.csr_matrix,
    *,
    n_genes: int,
    min_detected: float,
    genes: Sequence[str] | str | None = None,
) -> list[str]:
    """Choose the genes a model is trained on (:func:`select_genes`), warning when too few pass the rule.

    ``genes`` (a list, or a boolean ``var`` column) replaces the rule.
    """
    if genes is not None:
        chosen = select_genes(matrix, slide.table.var, genes=genes)
        idx = slide.table.var_names.get_indexer(chosen)
        silent = [g for g, n in zip(chosen, np.asarray((matrix[:, idx] != 0).sum(axis=0)).ravel()) if n == 0]
        if silent:
            logger.warning(
                f"{len(silent)} of the {len(chosen)} chosen genes are zero in every training unit: {silent[:10]}"
            )
        source = f"var[{genes!r}]" if isinstance(genes, str) else "the genes given"
        logger.info(f"modelling {len(chosen)} genes from {source}")
        return chosen
    genes = select_genes(
        matrix, slide.table.var_names, n_genes=n_genes, log_normalized=slide.log_normalized, min_detected=min_detected
    )
    detectable = int(np.count_nonzero(np.asarray((matrix != 0).sum(axis=0)).ravel()))
    if len(genes) < min(n_genes, FEW_GENES, detectable):
        logger.warning(
            f"only {len(genes)} genes are detected in >= {min_detected:.0%} of the training units (asked for "
            f"{n_genes}): sparse units need a lower min_detected, e.g. tl.fit(min_detected=0.005)."
        )
    elif len(genes) < n_genes:
        logger.info(f"{len(genes)} genes pass the detection filter (asked for {n_genes}): using them all")
    return genes


def build_reference(
    slide: SlideData, genes: list[str], emb: dict[str, np.ndarray | None], *, validation: np.ndarray | None = None
) -> AnnData:
    """Return the training units as a retrieval reference: expression of ``genes`` (log1p) and the embeddings.

    ``validation``: units of the subgraphs training held out, kept in ``obs["sigmma_validation"]``.
    """
    import anndata as ad

    obs = pd.DataFrame(index=pd.Index(slide.table.obs_names.astype(str)))
    obs[Keys.SECTION] = pd.Categorical(np.asarray(slide.sections, dtype=object)[slide.unit_section])
    if validation is not None:
        obs[Keys.VALIDATION] = np.asarray(validation, dtype=bool)
    ref = ad.AnnData(
        X=slide.expression(genes).astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(genes)),
    )
    ref.obsm[Keys.SPATIAL] = np.asarray(slide.xy_um, dtype=np.float64)
    ref.obsm[Keys.X_SIGMMA_IMG] = emb["img"]
    ref.obsm[Keys.X_SIGMMA_EXPR] = emb["expr"]
    ref.obsm[Keys.X_SIGMMA] = emb["joint"]
    return ref
