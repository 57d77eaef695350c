"""Slide data and counts: :class:`SlideData` (a validated view of a SpatialData object), the table and its counts.

Nothing here writes into the user's object: counts are copied, images are read lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from sigmma_sc._constants import Defaults, Keys

from ._geometry import Geometry
from ._image import SectionImage  # noqa: F401  (the inherited dataclass fields name it: Sphinx resolves it here)

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData


def log1p_normalize(
    counts: sparse.spmatrix | np.ndarray,
    *,
    target_sum: float = Defaults.TARGET_SUM,
    totals: np.ndarray | None = None,
) -> np.ndarray | sparse.csr_matrix:
    """``log1p(normalize_total(counts, target_sum))``, sparse in (CSR float32 out), dense in (float64 out).

    Units with no counts stay zero instead of dividing by zero.

    Parameters
    ----------
    counts
        ``(n_units, n_genes)`` raw counts.
    target_sum
        Library size every unit is scaled to.
    totals
        ``(n_units,)`` library sizes, when ``counts`` holds only some genes of the units (the
        normalisation is over all genes); default: the row sums of ``counts``.

    Returns
    -------
    The log-normalised matrix, the same shape as ``counts``.

    Examples
    --------
    >>> import numpy as np
    >>> import sigmma_sc as sg
    >>> sg.io.log1p_normalize(np.array([[1.0, 3.0], [0.0, 0.0]]), target_sum=4.0)
    array([[0.69314718, 1.38629436],
           [0.        , 0.        ]])
    """
    total = np.asarray(counts.sum(axis=1)).ravel() if totals is None else np.asarray(totals)
    total = total.astype(np.float64)
    scale = np.divide(target_sum, total, out=np.zeros_like(total), where=total > 0)
    if sparse.issparse(counts):
        # Scale in float64, store float32, log the stored values only (log1p(0) = 0). The float32
        # log is part of the results: gene ranking (select_genes) breaks near-ties on it.
        out = sparse.csr_matrix(sparse.diags(scale) @ counts, dtype=np.float32)
        out.data = np.log1p(out.data)
        return out
    return np.log1p(np.asarray(counts, dtype=np.float64) * scale[:, None])


# ---------------------------------------------------------------------------------------------
# SlideData
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class SlideData(Geometry):
    """A validated view of a SpatialData object: units, their microns, the section images.

    Built by :func:`validate`; nothing here copies the user's data.

    Attributes
    ----------
    sdata
        The user's SpatialData object (read only).
    table
        The user's table (not a copy: read only!).
    table_key
        Name of the table in ``sdata.tables``.
    sections
        Section names in order of first appearance in the table.
    unit_section
        ``(n_units,)`` int codes into ``sections``.
    xy_um
        ``(n_units, 2)`` float64 unit centres ``(x, y)`` in microns in the section's coordinate system.
    images
        ``{section: SectionImage}`` (empty for sections without image when ``require_image=False``).
    technology
        ``"st"``, ``"visium"``, ``"visium_hd"``, ``"xenium"``, ``"synthetic"`` or ``"custom"``.
    unit_kind
        ``"spot"`` (a unit holds many cells) or ``"cell"`` (a cell or a fine bin).
    unit_diameter_um
        Spot / cell diameter in microns.
    log_normalized
        ``X`` is already log1p-normalised: never log-transform again.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> slide = sg.io.validate(sg.datasets.xenium_lung(), require_counts=True)
    >>> slide.sections, slide.unit_kind, slide.xy_um.shape
    (['NCBI858'], 'cell', (200, 2))
    >>> slide.expression(slide.table.var_names[:50]).shape
    (200, 50)
    """

    sdata: SpatialData = field(repr=False)
    table: AnnData = field(repr=False)
    table_key: str
    counts_source: str | None = None  # "layers['counts']" or "X"; None: no raw counts
    _counts: sparse.csr_matrix | None = field(default=None, repr=False)
    _totals: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_units(self) -> int:
        """Number of units (table rows)."""
        return int(self.table.n_obs)

    def section_units(self, section: str) -> np.ndarray:
        """Return the indices of the units of one section.

        Parameters
        ----------
        section
            Section name.

        Returns
        -------
        int64 indices into the table's rows.

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> slide = sg.io.validate(sg.datasets.synthetic(300, n_genes=40, n_sections=2, seed=0))
        >>> idx = slide.section_units("S1")
        >>> idx[:3], len(idx)
        (array([150, 151, 152]), 150)
        """
        if section not in self.sections:
            raise KeyError(f"section {section!r} not in {self.sections}.")
        return np.flatnonzero(self.unit_section == self.sections.index(section))

    def subset(self, mask: np.ndarray) -> SlideData:
        """Restrict the slide to some units (boolean mask or integer indices).

        The table becomes an AnnData view (no copy); ``sections`` and the images are kept whole so
        section codes stay comparable with the full slide.

        Parameters
        ----------
        mask
            Boolean ``(n_units,)`` mask or integer indices.

        Returns
        -------
        A new :class:`SlideData`.

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> slide = sg.io.validate(sg.datasets.synthetic(300, n_genes=40, n_sections=2, seed=0))
        >>> s1 = slide.subset(slide.unit_section == slide.sections.index("S1"))
        >>> s1.n_units, s1.sections
        (150, ['S0', 'S1'])
        """
        idx = np.asarray(mask)
        if idx.dtype == bool:
            if idx.shape != (self.n_units,):
                raise ValueError(f"subset: boolean mask has shape {idx.shape}, expected ({self.n_units},).")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        return replace(
            self,
            table=self.table[idx],
            unit_section=self.unit_section[idx],
            xy_um=self.xy_um[idx],
            _counts=None if self._counts is None else self._counts[idx],
            _totals=None if self._totals is None else self._totals[idx],
        )

    def counts(self) -> sparse.csr_matrix:
        """Raw counts (``layers["counts"]`` else ``X``) as CSR ``float32``, validated.

        Returns
        -------
        ``(n_units, n_genes)`` CSR matrix; a new matrix, the table is untouched.

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> slide = sg.io.validate(sg.datasets.xenium_lung())
        >>> slide.counts().shape, float(slide.counts().sum())
        ((200, 314), 45623.0)
        """
        if self._counts is None:
            mat, source = _raw_counts(self.table, self.table_key, log_normalized=self.log_normalized)
            self._counts = mat
            self.counts_source = source
        return self._counts

    def expression(self, genes: Any) -> np.ndarray:
        """Log-normalised expression of some genes: ``log1p(normalize_total(counts, 1e4))``.

        Totals are taken over all genes before restricting to ``genes``. When the table is flagged
        ``log_normalized`` (no raw counts exist), ``X`` is returned as is for those genes.

        Parameters
        ----------
        genes
            Gene names (``var_names``), in the wanted order.

        Returns
        -------
        Dense ``(n_units, len(genes))`` float32.

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> slide = sg.io.validate(sg.datasets.xenium_lung())
        >>> x = slide.expression(["EPCAM", "PTPRC"])
        >>> x.shape, x.dtype
        ((200, 2), dtype('float32'))
        """
        genes = list(np.atleast_1d(np.asarray(genes, dtype=object)))
        var = pd.Index(self.table.var_names)
        pos = var.get_indexer(genes)
        if (pos < 0).any():
            missing = [g for g, p in zip(genes, pos) if p < 0]
            raise KeyError(
                f"{len(missing)} gene(s) not in table {self.table_key!r}: {missing[:10]}. "
                "Pick genes from table.var_names."
            )
        if self.log_normalized:
            x = self.table.X[:, pos]
            x = x.toarray() if sparse.issparse(x) else np.asarray(x)
            return x.astype(np.float32, copy=False)
        counts = self.counts()
        if self._totals is None:
            self._totals = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
        return log1p_normalize(counts[:, pos], totals=self._totals).toarray()


# ---------------------------------------------------------------------------------------------
# helpers: table
# ---------------------------------------------------------------------------------------------
def get_table(sdata: SpatialData | AnnData, table_key: str = Keys.TABLE) -> AnnData:
    """Return the table of a SpatialData object by name; an AnnData is returned as it is.

    The one place that finds a table: every function taking ``sdata`` and ``table_key`` uses it,
    so a wrong name always gives the same message with the fix.

    Parameters
    ----------
    sdata
        SpatialData object, or the table itself.
    table_key
        Name of the table in ``sdata.tables``.

    Returns
    -------
    The user's table (not a copy).

    Raises
    ------
    KeyError
        ``sdata`` has no table ``table_key``.
    TypeError
        ``sdata`` is neither a SpatialData object nor an AnnData.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> import sigmma_sc as sg
    >>> adata = ad.AnnData(np.ones((2, 3)))
    >>> sg.io.get_table(adata) is adata
    True
    """
    from anndata import AnnData

    if isinstance(sdata, AnnData):
        return sdata
    tables = getattr(sdata, "tables", None)
    if tables is None:
        raise TypeError(
            f"expected a spatialdata.SpatialData (or its table), got {type(sdata).__name__}. For a plain AnnData "
            "plus an image use sigmma_sc.io.from_anndata(adata, image, mpp=...)."
        )
    if table_key not in tables:
        raise KeyError(
            f"table {table_key!r} not found in sdata.tables (has {sorted(tables)}). Pass table_key= with one of "
            "those names, or add the table: sdata.tables['table'] = TableModel.parse(adata, region=..., "
            "region_key=..., instance_key=...)."
        )
    return tables[table_key]


def check_names(table: AnnData, table_key: str) -> None:
    if not table.obs_names.is_unique:
        dup = pd.Index(table.obs_names)[pd.Index(table.obs_names).duplicated()].unique()
        raise ValueError(
            f"table {table_key!r} has {len(dup)} duplicated obs name(s), e.g. {list(dup[:5])}. Make them unique "
            "(e.g. prefix the section: table.obs_names = section + '_' + table.obs_names, or "
            "table.obs_names_make_unique())."
        )
    if not table.var_names.is_unique:
        dup = pd.Index(table.var_names)[pd.Index(table.var_names).duplicated()].unique()
        raise ValueError(
            f"table {table_key!r} has {len(dup)} duplicated gene name(s), e.g. {list(dup[:5])}. Sum or drop the "
            "duplicates, or call table.var_names_make_unique()."
        )


def _matrix_values(mat: Any) -> np.ndarray:
    if sparse.issparse(mat):
        return np.asarray(mat.data) if hasattr(mat, "data") else mat.tocsr().data
    return np.asarray(mat).ravel()


def _raw_counts(table: AnnData, table_key: str, *, log_normalized: bool) -> tuple[sparse.csr_matrix, str]:
    """Raw counts as CSR float32 (a new matrix) after the value checks."""
    if Keys.COUNTS_LAYER in table.layers:
        mat, source = table.layers[Keys.COUNTS_LAYER], f"layers[{Keys.COUNTS_LAYER!r}]"
    elif log_normalized:
        raise ValueError(
            f"table {table_key!r} is flagged log-normalised (uns[{Keys.DATASET!r}][{Keys.LOG_NORMALIZED!r}]) and has "
            f"no layers[{Keys.COUNTS_LAYER!r}] with raw counts. Store raw integer counts in "
            f"table.layers[{Keys.COUNTS_LAYER!r}], or use slide.expression(), which uses X as is."
        )
    else:
        mat, source = table.X, "X"
    if mat is None:
        raise ValueError(f"table {table_key!r} has no expression matrix (X is None).")
    check_count_values(mat, f"table {table_key!r} {source}", log_normalized=False)
    csr = sparse.csr_matrix(mat, dtype=np.float32) if not sparse.issparse(mat) else mat.tocsr().astype(np.float32)
    if csr is mat:  # astype may return the same object for float32 CSR input: never hand out the user's matrix
        csr = csr.copy()
    return csr, source


def check_count_values(mat: Any, what: str, *, log_normalized: bool) -> None:
    vals = _matrix_values(mat)
    fix_log = (
        f" If these values are log-normalised on purpose, flag it: uns[{Keys.DATASET!r}][{Keys.LOG_NORMALIZED!r}] = "
        f"True, and keep raw counts in layers[{Keys.COUNTS_LAYER!r}] when you have them."
    )
    if vals.dtype.kind == "f":
        bad = ~np.isfinite(vals)
        if bad.any():
            raise ValueError(
                f"{what} contains {int(bad.sum())} NaN / infinite value(s). Raw counts must be finite non-negative "
                "integers: fill or drop the affected units / genes."
            )
    if log_normalized:
        return
    if vals.size and vals.min() < 0:
        raise ValueError(
            f"{what} contains {int((vals < 0).sum())} negative value(s) (min {vals.min():g}); raw counts are "
            "non-negative integers. Scaled or centred data (e.g. after sc.pp.scale) cannot be used as counts." + fix_log
        )
    if vals.dtype.kind == "f":
        frac = vals != np.rint(vals)
        if frac.any():
            raise ValueError(
                f"{what} contains {int(frac.sum())} non-integer value(s) (e.g. {vals[frac][0]:g}); raw integer counts "
                "are required here." + fix_log
            )


def check_empty(mat: Any, what: str, table_key: str, *, allow_empty_genes: bool) -> None:
    m = mat.tocsr() if sparse.issparse(mat) else np.asarray(mat)
    unit_tot = np.asarray(abs(m).sum(axis=1)).ravel()
    gene_tot = np.asarray(abs(m).sum(axis=0)).ravel()
    n_empty_units = int((unit_tot == 0).sum())
    if n_empty_units:
        raise ValueError(
            f"{n_empty_units} of {m.shape[0]} unit(s) in table {table_key!r} have no counts ({what} all zero). "
            f"Filter them first: table = sdata.tables[{table_key!r}]; sc.pp.filter_cells(table, min_counts=1); "
            f"sdata.tables[{table_key!r}] = table."
        )
    n_empty_genes = int((gene_tot == 0).sum())
    if n_empty_genes and not allow_empty_genes:
        raise ValueError(
            f"{n_empty_genes} of {m.shape[1]} gene(s) in table {table_key!r} have no counts in any unit ({what}). "
            f"Filter them first: table = sdata.tables[{table_key!r}]; sc.pp.filter_genes(table, min_counts=1); "
            f"sdata.tables[{table_key!r}] = table. (A held-out test section may legitimately miss genes: callers "
            "that only read it pass allow_empty_genes=True.)"
        )
