"""The one validation entry point: :func:`validate` turns a SpatialData object into a :class:`SlideData`.

Every public function of the package calls :func:`validate` first. It reads, checks and never
writes: the user's object is left exactly as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from sigmma_sc._constants import VISIUM_SPOT_DIAMETER_UM, Keys, ReaderKeys
from sigmma_sc._logging import logger

from ._image import SectionImage, channel_kind, image_levels

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

TECHNOLOGIES = ("st", "visium", "visium_hd", "xenium", "synthetic", "custom")
SPOT_TECHNOLOGIES = ("st", "visium")
# Unknown technologies: units at least this wide are spots (hold many cells), else cells / fine bins.
_SPOT_MIN_DIAMETER_UM = 30.0
# A unit centre may lie this many pixels outside the image before it counts as outside (rounding).
_OUTSIDE_TOL_PX = 1.0


# ---------------------------------------------------------------------------------------------
# SlideData
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class SlideData:
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
    >>> slide = sg.io.validate(sg.datasets.her2st(), require_counts=True)
    >>> slide.sections, slide.unit_kind, slide.xy_um.shape
    >>> expr = slide.expression(slide.table.var_names[:50])
    """

    sdata: SpatialData = field(repr=False)
    table: AnnData = field(repr=False)
    table_key: str
    sections: list[str]
    unit_section: np.ndarray
    xy_um: np.ndarray
    images: dict[str, SectionImage]
    technology: str
    unit_kind: str
    unit_diameter_um: float
    log_normalized: bool
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
        >>> slide = sg.io.validate(sg.datasets.her2st())
        >>> idx = slide.section_units("C2")
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
        >>> slide = sg.io.validate(sg.datasets.her2st())
        >>> c3 = slide.subset(slide.unit_section == slide.sections.index("C3"))
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
        >>> slide = sg.io.validate(sg.datasets.her2st(sections=["C2"]))
        >>> slide.counts().sum()
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
        >>> slide = sg.io.validate(sg.datasets.her2st(sections=["C2"]))
        >>> x = slide.expression(["ERBB2", "GRB7"])
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
        scale = np.divide(1e4, self._totals, out=np.zeros_like(self._totals), where=self._totals > 0)
        # Scale and log the stored values only (log1p(0) = 0), then densify once in float32.
        sub = counts[:, pos].tocsr()
        rows = np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr))
        vals = np.log1p(sub.data.astype(np.float64) * scale[rows]).astype(np.float32)
        return sparse.csr_matrix((vals, sub.indices, sub.indptr), shape=sub.shape).toarray()


# ---------------------------------------------------------------------------------------------
# helpers: matrices
# ---------------------------------------------------------------------------------------------
def _affine(transformation: Any) -> np.ndarray:
    """3x3 matrix ``[x', y', 1] = M @ [x, y, 1]`` of a spatialdata transformation (x = column, y = row)."""
    return np.asarray(
        transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")),
        dtype=np.float64,
    )


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:2, :2].T + m[:2, 2]


def _area_scale(m: np.ndarray) -> float:
    """Linear scale of an affine (square root of its area scale)."""
    return float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))


def _transformations(element: Any) -> dict[str, Any]:
    from spatialdata.transformations import get_transformation

    return dict(get_transformation(element, get_all=True))


# ---------------------------------------------------------------------------------------------
# helpers: table
# ---------------------------------------------------------------------------------------------
def _get_table(sdata: Any, table_key: str) -> AnnData:
    tables = getattr(sdata, "tables", None)
    if tables is None:
        raise TypeError(
            f"validate expects a spatialdata.SpatialData, got {type(sdata).__name__}. For a plain AnnData plus an "
            "image use sigmma_sc.io.from_anndata(adata, image, mpp=...)."
        )
    if table_key not in tables:
        raise KeyError(
            f"table {table_key!r} not found in sdata.tables (has {sorted(tables)}). Pass table_key= with one of "
            "those names, or add the table: sdata.tables['table'] = TableModel.parse(adata, region=..., "
            "region_key=..., instance_key=...)."
        )
    return tables[table_key]


def _check_names(table: AnnData, table_key: str) -> None:
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
    _check_count_values(mat, f"table {table_key!r} {source}", log_normalized=False)
    csr = sparse.csr_matrix(mat, dtype=np.float32) if not sparse.issparse(mat) else mat.tocsr().astype(np.float32)
    if csr is mat:  # astype may return the same object for float32 CSR input: never hand out the user's matrix
        csr = csr.copy()
    return csr, source


def _check_count_values(mat: Any, what: str, *, log_normalized: bool) -> None:
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


def _check_empty(mat: Any, what: str, table_key: str, *, allow_empty_genes: bool) -> None:
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


# ---------------------------------------------------------------------------------------------
# helpers: images
# ---------------------------------------------------------------------------------------------
def _image_pixels(element: Any) -> int:
    lv = image_levels(element)[0]
    return int(lv.sizes["y"]) * int(lv.sizes["x"])


def _pick_image(
    sdata: Any,
    coordinate_systems: list[str],
    image_key: str | None,
    region: str,
    wanted_cs: str | None,
) -> tuple[str, str] | None:
    """Choose ``(image name, coordinate system)`` for a region.

    Rule: among images with a transformation to a coordinate system the region's shapes also map
    to (``coordinate_system=`` when given), take RGB images (3 channels, or RGBA) before any
    other, then the most full-resolution pixels (the full-resolution H&E beats hires / lowres
    thumbnails), then the name. The coordinate system is ``"global"`` when shared, else the first
    shared one. ``image_key=`` overrides the choice of image.
    """
    cands = [image_key] if image_key is not None else list(sdata.images)
    if image_key is not None and image_key not in sdata.images:
        raise KeyError(f"image {image_key!r} (image_key=) not found in sdata.images (has {sorted(sdata.images)}).")
    scored = []
    for name in cands:
        tr = _transformations(sdata.images[name])
        shared = [cs for cs in coordinate_systems if cs in tr]
        if wanted_cs is not None:
            shared = [cs for cs in shared if cs == wanted_cs]
        if not shared:
            if image_key is not None:
                target = wanted_cs if wanted_cs is not None else coordinate_systems
                raise ValueError(
                    f"image {name!r} has no transformation to coordinate system {target!r} of region {region!r} "
                    f"(it maps to {sorted(tr)}). Register it: spatialdata.transformations.set_transformation("
                    f"sdata.images[{name!r}], transformation, to_coordinate_system=...)."
                )
            continue
        cs = ReaderKeys.GLOBAL if ReaderKeys.GLOBAL in shared else shared[0]
        rgb = channel_kind(image_levels(sdata.images[name])[0])[0] != "bad"
        scored.append((not rgb, -_image_pixels(sdata.images[name]), name, cs))
    if not scored:
        return None
    scored.sort()
    return scored[0][2], scored[0][3]


# ---------------------------------------------------------------------------------------------
# helpers: shapes
# ---------------------------------------------------------------------------------------------
def _shape_centres(gdf: Any) -> np.ndarray:
    geom = gdf.geometry
    kinds = set(geom.geom_type.unique())
    if kinds <= {"Point"}:
        return np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()]).astype(np.float64)
    c = geom.centroid
    return np.column_stack([c.x.to_numpy(), c.y.to_numpy()]).astype(np.float64)


def _shape_half_width(gdf: Any) -> np.ndarray:
    """Per shape, half its width in intrinsic units: the radius of circles, sqrt(area / pi) of polygons."""
    if "radius" in gdf.columns:
        return np.asarray(gdf["radius"], dtype=np.float64)
    return np.sqrt(np.asarray(gdf.geometry.area, dtype=np.float64) / np.pi)


def _rows_in_shapes(gdf: Any, ids: pd.Series, region: str, id_col: str) -> np.ndarray:
    idx = pd.Index(gdf.index)
    pos = idx.get_indexer(pd.Index(ids))
    if (pos < 0).any() and idx.dtype != pd.Index(ids).dtype:
        # readers store ids as int in one place and str in another: compare as strings
        pos = pd.Index(idx.astype(str)).get_indexer(pd.Index(ids.astype(str)))
    if (pos < 0).any():
        missing = ids[pos < 0]
        raise KeyError(
            f"{int((pos < 0).sum())} unit(s) of region {region!r} have obs[{id_col!r}] ids missing from the index of "
            f"shapes {region!r}, e.g. {list(missing[:5])}. The table's instance ids must match the shapes' index."
        )
    return pos


# ---------------------------------------------------------------------------------------------
# geometry of objects written by sigmma_sc (uns["sigmma_dataset"])
# ---------------------------------------------------------------------------------------------
@dataclass
class _Geometry:
    sections: list[str]
    unit_section: np.ndarray
    xy_um: np.ndarray
    images: dict[str, SectionImage]
    technology: str
    unit_kind: str
    unit_diameter_um: float
    log_normalized: bool


def _sections_of(values: pd.Series) -> tuple[list[str], np.ndarray]:
    codes, uniques = pd.factorize(values.astype(str), sort=False)
    return [str(u) for u in uniques], codes.astype(np.int64)


def _geometry_sigmma(
    sdata: Any,
    table: AnnData,
    table_key: str,
    info: dict,
    *,
    require_image: bool,
    mpp: float | None,
    coordinate_system: str | None,
    image_key: str | dict[str, str] | None,
) -> _Geometry:
    if Keys.SECTION not in table.obs:
        raise KeyError(
            f"table {table_key!r} has uns[{Keys.DATASET!r}] but no obs[{Keys.SECTION!r}] column naming each unit's "
            "section. Add it (categorical section names)."
        )
    sections, codes = _sections_of(table.obs[Keys.SECTION])
    if Keys.SPATIAL not in table.obsm:
        raise KeyError(
            f"table {table_key!r} has no obsm[{Keys.SPATIAL!r}] (unit centres in microns). Add it, or rebuild the "
            "object with sigmma_sc.io.from_anndata."
        )
    xy = np.asarray(table.obsm[Keys.SPATIAL], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        raise ValueError(
            f"table {table_key!r} obsm[{Keys.SPATIAL!r}] must be a finite (n_units, 2) array of microns, got shape "
            f"{xy.shape} with {int((~np.isfinite(xy)).sum())} non-finite value(s)."
        )
    xy = xy[:, :2].copy()
    image_keys = dict(info.get(Keys.IMAGE_KEYS, {}))
    shapes_keys = dict(info.get(Keys.SHAPES_KEYS, {}))
    images: dict[str, SectionImage] = {}
    for s in sections:
        shp = shapes_keys.get(s)
        if shp is None or shp not in sdata.shapes:
            raise KeyError(
                f"shapes element {shp!r} of section {s!r} (uns[{Keys.DATASET!r}][{Keys.SHAPES_KEYS!r}]) not found "
                f"in sdata.shapes (has {sorted(sdata.shapes)}). Restore it or fix the {Keys.SHAPES_KEYS!r} entry."
            )
        name = image_key.get(s) if isinstance(image_key, dict) else image_key
        name = name if name is not None else image_keys.get(s)
        if name is None or name not in sdata.images:
            if require_image:
                raise KeyError(
                    f"image {name!r} of section {s!r} not found in sdata.images (has {sorted(sdata.images)}). Add the "
                    f"H&E image, fix uns[{Keys.DATASET!r}][{Keys.IMAGE_KEYS!r}], or pass image_key=."
                )
            continue
        cs = coordinate_system if coordinate_system is not None else s
        tr = _transformations(sdata.images[name])
        if cs not in tr:
            raise ValueError(
                f"image {name!r} has no transformation to coordinate system {cs!r} (the section's microns; it maps "
                f"to {sorted(tr)}). Set one: spatialdata.transformations.set_transformation(sdata.images[{name!r}], "
                f"Scale([mpp, mpp], axes=('y', 'x')), to_coordinate_system={cs!r})."
            )
        um_from_px = _affine(tr[cs])
        if mpp is not None and not np.isclose(_area_scale(um_from_px), mpp, rtol=0.02):
            logger.warning(
                f"mpp={mpp} ignored for image {name!r}: its transformation to {cs!r} says "
                f"{_area_scale(um_from_px):.4g} um/px."
            )
        images[s] = SectionImage.from_element(
            sdata.images[name], section=s, name=name, coordinate_system=cs, px_from_um=np.linalg.inv(um_from_px)
        )
    tech = str(info.get(Keys.TECHNOLOGY, "custom"))
    diam = float(info.get(Keys.UNIT_DIAMETER, np.nan))
    kind = str(info.get(Keys.UNIT_KIND, _infer_unit_kind(tech, diam)))
    if kind not in ("spot", "cell"):
        raise ValueError(
            f"uns[{Keys.DATASET!r}][{Keys.UNIT_KIND!r}] = {kind!r}; use 'spot' (units hold many cells) or 'cell'."
        )
    if not np.isfinite(diam) or diam <= 0:
        raise ValueError(
            f"uns[{Keys.DATASET!r}][{Keys.UNIT_DIAMETER!r}] = {diam!r}; set the spot / cell diameter in microns."
        )
    return _Geometry(sections, codes, xy, images, tech, kind, diam, bool(info.get(Keys.LOG_NORMALIZED, False)))


def _infer_unit_kind(technology: str, diameter_um: float) -> str:
    if technology in SPOT_TECHNOLOGIES:
        return "spot"
    if technology in ("xenium", "visium_hd", "synthetic"):
        return "cell"
    return "spot" if np.isfinite(diameter_um) and diameter_um >= _SPOT_MIN_DIAMETER_UM else "cell"


# ---------------------------------------------------------------------------------------------
# geometry of objects written by spatialdata_io (no uns["sigmma_dataset"])
# ---------------------------------------------------------------------------------------------
def _infer_technology(sdata: Any, table: AnnData, regions: list[str], instance_key: str) -> str:
    if any(re.search(ReaderKeys.VISIUM_HD_BIN_PATTERN, r) for r in regions):
        return "visium_hd"
    if any(r in ReaderKeys.XENIUM_REGIONS for r in regions) or any(k in sdata.images for k in ReaderKeys.XENIUM_IMAGES):
        return "xenium"
    if any(k.endswith(ReaderKeys.VISIUM_IMAGE_SUFFIXES) for k in sdata.images):
        return "visium"
    return "custom"


def _region_shapes(sdata: Any, table: AnnData, region: str, technology: str, instance_key: str) -> tuple[str, str]:
    """Name of the shapes element holding a region's units, and the obs column matching its index."""
    if region in sdata.shapes:
        return region, instance_key
    if technology == "xenium":
        # spatialdata_io annotates "cell_labels" (a raster) by default; the same cells exist as shapes in microns.
        for name in ReaderKeys.XENIUM_CELL_SHAPES:
            if name in sdata.shapes and ReaderKeys.XENIUM_CELL_ID in table.obs:
                return name, ReaderKeys.XENIUM_CELL_ID
    where = "sdata.labels" if region in getattr(sdata, "labels", {}) else "nowhere"
    raise KeyError(
        f"region {region!r} annotated by the table is not a shapes element (found in {where}; shapes are "
        f"{sorted(sdata.shapes)}). Unit centres come from shapes: add circles / polygons for the units, e.g. "
        "spatialdata.to_circles(sdata[region]), and annotate them."
    )


def _um_per_cs(
    *,
    technology: str,
    region: str,
    gdf: Any,
    cs_from_shape: np.ndarray,
    cs_from_px: np.ndarray | None,
    mpp: float | None,
    image_name: str | None,
) -> tuple[np.ndarray, float]:
    """``um_from_cs`` (3x3) and the unit diameter in microns."""
    half_cs = _shape_half_width(gdf) * _area_scale(cs_from_shape)
    med_half_cs = float(np.median(half_cs)) if len(half_cs) else np.nan
    if mpp is not None:
        if cs_from_px is None:
            raise ValueError(f"mpp= gives the image's pixel size, but region {region!r} has no image to apply it to.")
        um_from_cs = np.diag([mpp, mpp, 1.0]) @ np.linalg.inv(cs_from_px)
        diam = {"visium": VISIUM_SPOT_DIAMETER_UM}.get(technology, 2 * med_half_cs * _area_scale(um_from_cs))
        if technology == "visium_hd":
            diam = _visium_hd_bin_um(region)
        return um_from_cs, float(diam)
    if technology == "xenium":
        # Xenium shapes are stored in microns with Scale(1 / pixel_size) to "global".
        um_from_cs = np.linalg.inv(cs_from_shape)
        return um_from_cs, float(2 * np.median(_shape_half_width(gdf)))
    if technology == "visium":
        um = (VISIUM_SPOT_DIAMETER_UM / 2) / med_half_cs
        return np.diag([um, um, 1.0]), VISIUM_SPOT_DIAMETER_UM
    if technology == "visium_hd":
        bin_um = _visium_hd_bin_um(region)
        # circles of radius side / 2, or squares of area side^2 (half width sqrt(area / pi))
        half_side_cs = med_half_cs if "radius" in gdf.columns else med_half_cs * np.sqrt(np.pi) / 2
        um = (bin_um / 2) / half_side_cs
        return np.diag([um, um, 1.0]), bin_um
    raise ValueError(
        f"cannot tell the pixel size of region {region!r} / image {image_name!r}: the table has no "
        f"uns[{Keys.DATASET!r}] and the technology is not recognised. Pass mpp= (microns per full-resolution pixel of "
        "the image), or build the object with sigmma_sc.io.from_anndata(adata, image, mpp=...)."
    )


def _visium_hd_bin_um(region: str) -> float:
    m = re.search(ReaderKeys.VISIUM_HD_BIN_PATTERN, region)
    if m is None:
        raise ValueError(f"region {region!r}: no bin size ('square_016um') in its name; pass mpp=.")
    return float(m.group(1))


def _geometry_foreign(
    sdata: Any,
    table: AnnData,
    table_key: str,
    *,
    require_image: bool,
    mpp: float | None,
    coordinate_system: str | None,
    image_key: str | dict[str, str] | None,
) -> _Geometry:
    attrs = table.uns.get(ReaderKeys.ATTRS)
    if not attrs or ReaderKeys.REGION_KEY not in attrs or ReaderKeys.INSTANCE_KEY not in attrs:
        raise KeyError(
            f"table {table_key!r} has neither uns[{Keys.DATASET!r}] (sigmma_sc loaders) nor "
            f"uns[{ReaderKeys.ATTRS!r}] with region_key / instance_key (spatialdata tables). Annotate the units: "
            "TableModel.parse(adata, region=shapes_name, region_key='region', instance_key='spot_id'), or use "
            "sigmma_sc.io.from_anndata."
        )
    region_key, instance_key = attrs[ReaderKeys.REGION_KEY], attrs[ReaderKeys.INSTANCE_KEY]
    for col in (region_key, instance_key):
        if col not in table.obs:
            raise KeyError(f"table {table_key!r} lacks obs[{col!r}] named in uns[{ReaderKeys.ATTRS!r}].")
    regions, codes = _sections_of(table.obs[region_key])
    technology = _infer_technology(sdata, table, regions, instance_key)
    xy = np.empty((table.n_obs, 2), dtype=np.float64)
    images: dict[str, SectionImage] = {}
    diams = []
    for r_i, region in enumerate(regions):
        rows = np.flatnonzero(codes == r_i)
        shapes_name, id_col = _region_shapes(sdata, table, region, technology, instance_key)
        gdf = sdata.shapes[shapes_name]
        shp_tr = _transformations(gdf)
        pos = _rows_in_shapes(gdf, table.obs[id_col].iloc[rows], shapes_name, id_col)
        name = image_key.get(region) if isinstance(image_key, dict) else image_key
        pick = _pick_image(sdata, list(shp_tr), name, region, coordinate_system)
        if pick is None:
            if require_image:
                target = coordinate_system if coordinate_system is not None else sorted(shp_tr)
                raise KeyError(
                    f"no image in sdata.images (has {sorted(sdata.images)}) has a transformation to coordinate "
                    f"system {target!r} of shapes {shapes_name!r}. Add the H&E with a transformation to one of them "
                    "(spatialdata.transformations.set_transformation), or pass image_key=."
                )
            if coordinate_system is not None and coordinate_system not in shp_tr:
                raise ValueError(f"shapes {shapes_name!r} have no transformation to {coordinate_system!r}.")
            cs = coordinate_system or (ReaderKeys.GLOBAL if ReaderKeys.GLOBAL in shp_tr else next(iter(shp_tr)))
            img_name, cs_from_px = None, None
        else:
            img_name, cs = pick
            cs_from_px = _affine(_transformations(sdata.images[img_name])[cs])
        cs_from_shape = _affine(shp_tr[cs])
        um_from_cs, diam = _um_per_cs(
            technology=technology,
            region=shapes_name,
            gdf=gdf,
            cs_from_shape=cs_from_shape,
            cs_from_px=cs_from_px,
            mpp=mpp,
            image_name=img_name,
        )
        diams.append(diam)
        centres = _shape_centres(gdf)[pos]
        xy[rows] = _apply(um_from_cs @ cs_from_shape, centres)
        if img_name is not None:
            images[region] = SectionImage.from_element(
                sdata.images[img_name],
                section=region,
                name=img_name,
                coordinate_system=cs,
                px_from_um=np.linalg.inv(um_from_cs @ cs_from_px),
            )
    diam = float(np.median(diams))
    if technology == "xenium" and ReaderKeys.XENIUM_CELL_AREA in table.obs:
        area = np.asarray(table.obs[ReaderKeys.XENIUM_CELL_AREA], dtype=np.float64)
        area = area[np.isfinite(area) & (area > 0)]
        if area.size:
            diam = float(2 * np.sqrt(np.median(area) / np.pi))
    log_norm = ReaderKeys.SCANPY_LOG1P in table.uns
    logger.info(
        f"validate: table {table_key!r} comes without uns[{Keys.DATASET!r}]; read as {technology!r} "
        f"({len(regions)} section(s) {regions}, unit diameter {diam:.3g} um)."
    )
    return _Geometry(regions, codes, xy, images, technology, _infer_unit_kind(technology, diam), diam, bool(log_norm))


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------
def validate(
    sdata: SpatialData,
    *,
    table_key: str = Keys.TABLE,
    require_counts: bool = False,
    require_image: bool = True,
    min_units: int = 1,
    mpp: float | None = None,
    coordinate_system: str | None = None,
    image_key: str | dict[str, str] | None = None,
    allow_empty_genes: bool = False,
) -> SlideData:
    """Check a SpatialData object and describe it in microns; the one entry point every function calls.

    It never modifies ``sdata``: images are converted to ``uint8`` lazily inside
    :meth:`SectionImage.read`, counts are copied by :meth:`SlideData.counts`.

    Accepted inputs:

    - objects from :mod:`sigmma_sc.datasets` and :func:`sigmma_sc.io.from_anndata`
      (``table.uns["sigmma_dataset"]`` present, ``obsm["spatial"]`` in microns, one coordinate
      system per section, in microns);
    - objects from ``spatialdata_io.xenium(path)`` (with the aligned H&E, element ``"he_image"``),
      ``spatialdata_io.visium(path, fullres_image_file=...)`` and ``spatialdata_io.visium_hd(path)``,
      passed as they are. The table's ``spatialdata_attrs`` name the annotated shapes; each region
      (shapes element) is a section, paired with one image. Unit centres are the shapes' centroids
      mapped to the image's coordinate system and then to microns, where the microns come from
      ``mpp=`` (microns per full-resolution pixel of the chosen image) when given, else from what
      the technology fixes: Xenium shapes are stored in microns (``cell_circles`` /
      ``cell_boundaries``, also used when the table annotates ``cell_labels``); Visium spots are
      55 µm wide (their radius in pixels gives the pixel size); Visium HD bins are as wide as the
      ``square_NNNum`` in their name. Visium HD has one table per bin size: pass
      ``table_key="square_016um"``.
    - Image choice when several exist: images with a transformation to a coordinate system of
      the shapes (``coordinate_system=`` if given); RGB before anything else (Xenium's DAPI
      ``morphology_focus`` is never picked), then the most pixels (the full-resolution H&E before
      ``hires`` / ``lowres`` thumbnails), then the name; ``"global"`` when several coordinate
      systems are shared. ``image_key=`` overrides the choice.

    ``unit_kind`` comes from ``uns``; otherwise Visium / ST units are spots and Xenium cells and
    Visium HD bins are cells; unknown technologies count as spots when at least 30 µm wide.

    Parameters
    ----------
    sdata
        The SpatialData object.
    table_key
        Table with the units.
    require_counts
        Check raw counts now (``layers["counts"]`` else ``X``): finite, non-negative integers (unless
        the table is flagged ``log_normalized``), no unit or gene with zero counts.
    require_image
        Every section needs an RGB image (``False``: sections without image are allowed and get no
        entry in ``images``).
    min_units
        Fewest units accepted (e.g. a batch size).
    mpp
        Microns per full-resolution pixel of the image, for objects whose transformations do not
        say it (ignored, with a warning when it disagrees, for sigmma_sc objects).
    coordinate_system
        Use this coordinate system instead of the default (the section name for sigmma_sc objects,
        ``"global"`` or the first shared one otherwise).
    image_key
        Image element to use (one name for all sections, or ``{section: name}``).
    allow_empty_genes
        With ``require_counts``, accept genes with zero counts in every unit (a held-out test
        section or a gene panel union legitimately has some); units with zero counts are still
        refused (they cannot be normalised).

    Returns
    -------
    The validated :class:`SlideData`.

    Raises
    ------
    KeyError
        Missing table, image, shapes, obs / obsm key or gene.
    ValueError
        Unusable image (not RGB, bad dtype / range), missing transformation, units outside the
        image, bad counts, duplicated names, empty units / genes, too few units.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> slide = sg.io.validate(sg.datasets.her2st(), require_counts=True)
    >>> slide.images["C2"].um_per_px  # 0.688

    A Visium object straight from spatialdata_io:

    >>> import spatialdata_io
    >>> sdata = spatialdata_io.visium("outs/", fullres_image_file="image.tif")  # doctest: +SKIP
    >>> slide = sg.io.validate(sdata)  # doctest: +SKIP
    """
    table = _get_table(sdata, table_key)
    _check_names(table, table_key)
    if table.n_obs < max(int(min_units), 1):
        raise ValueError(
            f"table {table_key!r} has {table.n_obs} unit(s); at least {max(int(min_units), 1)} are needed "
            "(e.g. one training batch). Use more sections / units or a smaller batch_size."
        )
    if mpp is not None and (not np.isfinite(mpp) or mpp <= 0):
        raise ValueError(f"mpp must be a positive number of microns per pixel, got {mpp!r}.")
    info = table.uns.get(Keys.DATASET)
    opts = {
        "require_image": require_image,
        "mpp": mpp,
        "coordinate_system": coordinate_system,
        "image_key": image_key,
    }
    if info is not None:
        geo = _geometry_sigmma(sdata, table, table_key, dict(info), **opts)
    else:
        geo = _geometry_foreign(sdata, table, table_key, **opts)
    if geo.technology not in TECHNOLOGIES:
        raise ValueError(f"technology {geo.technology!r} unknown; use one of {TECHNOLOGIES}.")
    _check_inside(geo)
    slide = SlideData(
        sdata=sdata,
        table=table,
        table_key=table_key,
        sections=geo.sections,
        unit_section=geo.unit_section,
        xy_um=geo.xy_um,
        images=geo.images,
        technology=geo.technology,
        unit_kind=geo.unit_kind,
        unit_diameter_um=geo.unit_diameter_um,
        log_normalized=geo.log_normalized,
    )
    if require_counts:
        if geo.log_normalized and Keys.COUNTS_LAYER not in table.layers:
            _check_count_values(table.X, f"table {table_key!r} X", log_normalized=True)
            _check_empty(table.X, "X", table_key, allow_empty_genes=allow_empty_genes)
        else:
            mat = slide.counts()
            _check_empty(mat, slide.counts_source or "X", table_key, allow_empty_genes=allow_empty_genes)
    return slide


def _check_inside(geo: _Geometry) -> None:
    for s_i, s in enumerate(geo.sections):
        img = geo.images.get(s)
        if img is None:
            continue
        rows = np.flatnonzero(geo.unit_section == s_i)
        cr = img.um_to_px(geo.xy_um[rows])
        h, w = img.shape
        out = (
            (cr[:, 0] < -_OUTSIDE_TOL_PX)
            | (cr[:, 0] > w + _OUTSIDE_TOL_PX)
            | (cr[:, 1] < -_OUTSIDE_TOL_PX)
            | (cr[:, 1] > h + _OUTSIDE_TOL_PX)
        )
        if out.any():
            ex = cr[out][0]
            raise ValueError(
                f"{int(out.sum())} of {rows.size} unit(s) of section {s!r} lie outside image {img.element!r} "
                f"({w} x {h} px), e.g. at column {ex[0]:.1f}, row {ex[1]:.1f}. Check the image's transformation / "
                "mpp (pixel size) and the x = column, y = row order of the coordinates, or drop units outside the "
                "image from the table."
            )
