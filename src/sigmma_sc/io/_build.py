"""The one place that turns per-section arrays into the SpatialData layout of ``docs/architecture.md`` §1.

Every loader (real data sets and :func:`sigmma_sc.datasets.synthetic`) reads its files into
:class:`SectionArrays` and calls :func:`build_sdata`.

Pixel convention: source tables give pixel-index coordinates (pixel centres at integers, as
scanpy / squidpy / OpenCV use them). SpatialData's intrinsic image coordinates put pixel *edges*
at integers, so a unit at pixel index ``(col, row)`` sits at ``((col + 0.5) * mpp, (row + 0.5) * mpp)``
microns; the image transformation ``Scale([mpp, mpp])`` maps it back into pixel ``(col, row)``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from sigmma_sc._constants import Defaults, Keys
from sigmma_sc._logging import logger

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

IMAGE_SUFFIX = "_he"
UNIT_SUFFIX = {"spot": "_spots", "cell": "_cells", "bin": "_bins"}
# The coarsest pyramid level is at most this many pixels on its long side (overview plots read it whole).
COARSEST_MAX_PX = 1000
IMAGE_CHUNK_PX = Defaults.IMAGE_CHUNK_PX

PIXEL_CENTER = 0.5  # pixel-index coordinate -> SpatialData intrinsic coordinate


@dataclass
class SectionArrays:
    """Everything the builder needs for one section.

    Attributes
    ----------
    section
        Section name ``S`` (also the coordinate system name).
    image
        RGB ``uint8`` image ``(height, width, 3)`` as numpy (the builder makes the pyramid), or the
        whole pyramid as a list of such arrays (numpy or lazy dask), full resolution first, each
        level half the previous one rounded down (see :func:`level_shapes`, :func:`pyramid_factors`).
    mpp
        Microns per pixel of ``image``.
    xy_um
        ``(n, 2)`` unit centres ``(x, y)`` in microns (SpatialData intrinsic convention, see module doc).
    counts
        ``(n, n_genes)`` sparse matrix: raw integer counts, or log-normalised values when the
        data set is built with ``log_normalized=True``.
    genes
        Gene names of ``counts``' columns (unique).
    shape
        ``"circle"`` (radius ``diameter_um / 2``) or ``"square"`` (side ``diameter_um``).
    diameter_um
        Unit diameter (circles) or side (squares) in microns.
    unit
        ``"spot"``, ``"cell"`` or ``"bin"``: names the shapes element ``"{S}_spots"`` / ``_cells`` / ``_bins``.
    barcodes
        The units' ids in the source files (stored in ``obs["barcode"]``); default none.
    obs
        Extra per-unit columns (``n`` rows, any index) copied into the table's ``obs``.
    var
        Extra per-gene columns indexed by gene name.
    """

    section: str
    image: Any
    mpp: float
    xy_um: np.ndarray
    counts: sparse.spmatrix | sparse.sparray
    genes: Sequence[str]
    shape: Literal["circle", "square"]
    diameter_um: float
    unit: Literal["spot", "cell", "bin"]
    barcodes: Sequence[str] | None = None
    obs: pd.DataFrame | None = None
    var: pd.DataFrame | None = None

    @property
    def n_units(self) -> int:
        """Number of units (rows of ``counts``)."""
        return int(self.counts.shape[0])


def _open_rgb(path: str | os.PathLike) -> Any:
    from PIL import Image

    # The decompression-bomb guard is lifted for this one read: slides are legitimately that large.
    guard = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        im = Image.open(path)
        im.load()  # decodes and closes the file (single-frame images opened by name)
        return im if im.mode == "RGB" else im.convert("RGB")
    finally:
        Image.MAX_IMAGE_PIXELS = guard


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an RGB ``uint8`` array ``(height, width, 3)``.

    Parameters
    ----------
    path
        Image file (JPEG, PNG, TIFF, ...).

    Examples
    --------
    >>> from sigmma_sc.datasets import resolve_dataset_dir
    >>> from sigmma_sc.io import read_rgb
    >>> folder = resolve_dataset_dir("squidpy_tests", required=["test_img.jpg"])
    >>> img = read_rgb(folder / "test_img.jpg")
    >>> img.shape, img.dtype
    ((1717, 950, 3), dtype('uint8'))
    """
    return np.asarray(_open_rgb(path))


def read_rgb_pyramid(path: str | os.PathLike, *, cache: bool = True) -> list[Any]:
    """Read an image file as the RGB ``uint8`` pyramid :func:`build_sdata` stores.

    JPEG and PNG cannot be read by window: the whole image is decoded once (PIL, libjpeg-turbo:
    about 1 s for a 92 Mpx her2st slide) and its ``reduce`` computes the 2x2 means in C. With
    ``cache`` the decoded levels are then written to a chunked zarr store in
    ``settings.cachedir / "images"`` and returned as lazy dask arrays over it, so a loaded slide
    holds no pixels in memory (readers decompress the chunks a window touches) and the next load
    of the same file skips the decoding. The store is keyed by the file's path, size and
    modification time; deleting it is safe (the next load writes it again).

    Parameters
    ----------
    path
        Image file (JPEG, PNG, TIFF, ...).
    cache
        ``True``: lazy levels over the on-disk store (memory does not grow with the slide).
        ``False``: numpy levels in memory (nothing written to disk).

    Returns
    -------
    Levels ``(h_l, w_l, 3)``, full resolution first, as many as :func:`pyramid_factors` asks for.

    Examples
    --------
    >>> from sigmma_sc.datasets import resolve_dataset_dir
    >>> from sigmma_sc.io import read_rgb_pyramid
    >>> folder = resolve_dataset_dir("squidpy_tests", required=["test_img.jpg"])
    >>> [level.shape for level in read_rgb_pyramid(folder / "test_img.jpg")]
    [(1717, 950, 3), (858, 475, 3)]
    """
    if not cache:
        return _decoded_pyramid(path)
    store = _pyramid_store(path)
    if not (store / _STORE_DONE).is_file():
        _write_pyramid_store(_decoded_pyramid(path), store)
    return _open_pyramid_store(store)


# Written last into a finished store: a store without it is an interrupted write and is rebuilt.
_STORE_DONE = "complete"
# Bump when the store's layout changes, so stores of older versions are not read.
_STORE_VERSION = 1


def _decoded_pyramid(path: str | os.PathLike) -> list[np.ndarray]:
    im = _open_rgb(path)
    w, h = im.size
    return _reduce_chain(im, level_shapes(h, w, len(pyramid_factors(h, w)) + 1))


def _pyramid_store(path: str | os.PathLike) -> Path:
    import hashlib

    from sigmma_sc._settings import settings

    src = Path(path).resolve()
    stat = src.stat()
    key = hashlib.sha256(f"{src}|{stat.st_size}|{stat.st_mtime_ns}|{_STORE_VERSION}".encode()).hexdigest()[:24]
    return Path(settings.cachedir) / "images" / f"{src.stem}-{key}.zarr"


def _write_pyramid_store(levels: list[np.ndarray], store: Path) -> None:
    import shutil

    import zarr

    # Written beside the final name and renamed: a reader never sees a half-written store.
    tmp = store.with_name(f".{store.name}.{uuid.uuid4().hex}")
    try:
        group = zarr.open_group(tmp, mode="w")
        for i, level in enumerate(levels):
            arr = group.create_array(
                str(i), shape=level.shape, dtype=np.uint8, chunks=(IMAGE_CHUNK_PX, IMAGE_CHUNK_PX, 3)
            )
            arr[...] = level
        (tmp / _STORE_DONE).write_text(f"{len(levels)}\n")
        if (store / _STORE_DONE).is_file():  # another process finished the same store meanwhile
            return
        shutil.rmtree(store, ignore_errors=True)  # an interrupted write's leftovers
        tmp.rename(store)
    except OSError:
        if not (store / _STORE_DONE).is_file():  # another process finished the same store first: use it
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_pyramid_store(store: Path) -> list[Any]:
    import dask.array as da
    import zarr

    group = zarr.open_group(store, mode="r")
    n = int((store / _STORE_DONE).read_text())
    return [da.from_zarr(group[str(i)]) for i in range(n)]


def _reduce_chain(im: Any, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    levels = [np.asarray(im)]
    current = im
    for h, w in shapes[1:]:
        current = current.reduce(2)
        if current.size != (w, h):  # PIL rounds odd sizes up; the SpatialData pyramid rounds down
            current = current.crop((0, 0, w, h))
        levels.append(np.asarray(current))
    return levels


def pyramid_factors(height: int, width: int, *, max_px: int = COARSEST_MAX_PX) -> list[int]:
    """Scale factors (all 2) so the coarsest level's long side is at most ``max_px`` (at least one level).

    Examples
    --------
    >>> pyramid_factors(9911, 9274)
    [2, 2, 2, 2]
    >>> pyramid_factors(600, 600)
    [2]
    """
    factors = [2]
    side = max(height, width) / 2
    while side > max_px:
        factors.append(2)
        side /= 2
    return factors


def level_shapes(height: int, width: int, n_levels: int) -> list[tuple[int, int]]:
    """``(height, width)`` of each pyramid level: every level halves the previous one, rounding down.

    This is the shape ``Image2DModel.parse(..., scale_factors=[2, ...])`` gives each level.

    Examples
    --------
    >>> level_shapes(9911, 9274, 3)
    [(9911, 9274), (4955, 4637), (2477, 2318)]
    """
    shapes = [(int(height), int(width))]
    for _ in range(n_levels - 1):
        h, w = shapes[-1]
        shapes.append((h // 2, w // 2))
    return shapes


def downsample_pyramid(image: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Box-filter pyramid of an RGB ``uint8`` image: level ``l`` is a ``2**l`` downsample (floor sizes).

    PIL's ``reduce`` does the 2x2 means in C (about 0.3 s for a 92 Mpx slide, ten times faster than
    a lazy dask coarsening chain evaluated on read).

    Examples
    --------
    >>> levels = downsample_pyramid(np.zeros((101, 64, 3), np.uint8), 3)
    >>> [lv.shape for lv in levels]
    [(101, 64, 3), (50, 32, 3), (25, 16, 3)]
    """
    from PIL import Image

    shapes = level_shapes(image.shape[0], image.shape[1], n_levels)
    levels = _reduce_chain(Image.fromarray(np.ascontiguousarray(image)), shapes)
    levels[0] = image
    return levels


def pixel_index_to_um(coords_px: np.ndarray, mpp: float) -> np.ndarray:
    """Pixel-index coordinates (pixel centres at integers) to microns in the section's system.

    Examples
    --------
    >>> pixel_index_to_um(np.array([[0.0, 10.0]]), 2.0)
    array([[ 1., 21.]])
    """
    return (np.asarray(coords_px, dtype=np.float64) + PIXEL_CENTER) * float(mpp)


class _NoCopy:
    """Sliceable stand-in for a numpy array that ``dask.array.from_array`` neither copies nor hashes.

    ``from_array`` copies every array-like with a ``copy`` method (and tokenising a slide costs
    another pass): for a 92 Mpx slide that is seconds and a second copy in memory.
    """

    def __init__(self, array: np.ndarray) -> None:
        self._array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.ndim = array.ndim

    def __getitem__(self, item: Any) -> np.ndarray:
        return self._array[item]


def _as_cyx(level: Any) -> Any:
    import dask.array as da

    if isinstance(level, da.Array):
        return level.transpose(2, 0, 1).rechunk((3, IMAGE_CHUNK_PX, IMAGE_CHUNK_PX))
    return da.from_array(
        _NoCopy(np.moveaxis(np.asarray(level), -1, 0)),
        chunks=(3, IMAGE_CHUNK_PX, IMAGE_CHUNK_PX),
        name=f"sigmma-image-{uuid.uuid4().hex}",
        asarray=True,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
    )


def _image_element(arrays: SectionArrays) -> Any:
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    levels = list(arrays.image) if isinstance(arrays.image, list | tuple) else None
    img = levels[0] if levels is not None else arrays.image
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(
            f"section {arrays.section!r}: image must be (height, width, 3) RGB, got shape {tuple(img.shape)}."
        )
    if img.dtype != np.uint8:
        raise ValueError(f"section {arrays.section!r}: image must be uint8, got {img.dtype}.")
    h, w = int(img.shape[0]), int(img.shape[1])
    factors = pyramid_factors(h, w)
    if levels is None:
        levels = downsample_pyramid(np.asarray(img), len(factors) + 1)
    if len(levels) != len(factors) + 1:
        raise ValueError(
            f"section {arrays.section!r}: a {h}x{w} image needs {len(factors) + 1} pyramid levels, got {len(levels)}."
        )
    # spatialdata builds the multiscale structure (coordinates, per-level transformations); the
    # levels' data are then swapped for the precomputed ones, which makes coarse reads instant.
    tree = Image2DModel.parse(
        _as_cyx(levels[0]),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=factors,
        chunks=(3, IMAGE_CHUNK_PX, IMAGE_CHUNK_PX),
        transformations={arrays.section: Scale([arrays.mpp, arrays.mpp], axes=("y", "x"))},
    )
    for key, level in zip(sorted(tree.children, key=lambda k: int(k[len("scale") :])), levels):
        var = next(iter(tree[key].data_vars))
        arr = tree[key][var]
        if tuple(arr.shape[1:]) != tuple(level.shape[:2]):
            raise ValueError(
                f"section {arrays.section!r}: pyramid level {key} has shape {tuple(level.shape[:2])}, "
                f"expected {tuple(arr.shape[1:])} (each level halves the previous, rounding down)."
            )
        tree[key][var] = arr.copy(data=_as_cyx(level))
    return tree


def build_shapes(arrays: SectionArrays, ids: np.ndarray) -> Any:
    """Return the shapes element of a section's units (circles or squares of ``arrays.diameter_um``), in microns."""
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    xy = np.asarray(arrays.xy_um, dtype=np.float64)
    transformations = {arrays.section: Identity()}
    if arrays.shape == "circle":
        radius = np.full(len(xy), arrays.diameter_um / 2.0)
        return ShapesModel.parse(
            xy, geometry=0, radius=radius, index=pd.Index(ids, name=None), transformations=transformations
        )
    if arrays.shape == "square":
        half = arrays.diameter_um / 2.0
        boxes = shapely.box(xy[:, 0] - half, xy[:, 1] - half, xy[:, 0] + half, xy[:, 1] + half)
        gdf = gpd.GeoDataFrame(geometry=boxes, index=pd.Index(ids))
        return ShapesModel.parse(gdf, transformations=transformations)
    raise ValueError(f"section {arrays.section!r}: shape must be 'circle' or 'square', got {arrays.shape!r}.")


def _union_genes(sections: Sequence[SectionArrays]) -> pd.Index:
    # First-appearance order: the first section's genes, then each later section's new genes.
    seen: dict[str, None] = {}
    for s in sections:
        for g in s.genes:
            seen.setdefault(str(g), None)
    return pd.Index(list(seen), dtype=object)


def _remap_columns(counts: sparse.csr_matrix, src_genes: Sequence[str], genes: pd.Index) -> sparse.csr_matrix:
    """Place a section's columns into the union gene space without densifying (missing genes stay 0)."""
    col_map = genes.get_indexer(pd.Index([str(g) for g in src_genes]))
    out = sparse.csr_matrix((counts.data, col_map[counts.indices], counts.indptr), shape=(counts.shape[0], len(genes)))
    out.sort_indices()
    return out


def _without_empty_units(arrays: SectionArrays) -> SectionArrays:
    counts = sparse.csr_matrix(arrays.counts)
    counts.eliminate_zeros()
    keep = np.diff(counts.indptr) > 0
    if keep.all():
        return arrays
    logger.info(f"section {arrays.section!r}: dropped {int((~keep).sum())} of {len(keep)} units without counts.")
    return replace(
        arrays,
        xy_um=np.asarray(arrays.xy_um)[keep],
        counts=counts[keep],
        barcodes=None if arrays.barcodes is None else np.asarray(arrays.barcodes)[keep],
        obs=None if arrays.obs is None else arrays.obs.iloc[np.flatnonzero(keep)],
    )


def build_sdata(
    sections: Sequence[SectionArrays],
    *,
    technology: str,
    unit_kind: Literal["spot", "cell"],
    unit_diameter_um: float,
    log_normalized: bool = False,
    drop_empty: bool = False,
) -> SpatialData:
    """Assemble sections into one SpatialData object (the layout of ``docs/architecture.md`` §1).

    Genes are the union across sections in first-appearance order; a gene a section did not
    measure is 0 there.

    Parameters
    ----------
    sections
        One :class:`SectionArrays` per section, in the order the table lists them.
    technology
        ``"st"``, ``"visium"``, ``"visium_hd"``, ``"xenium"``, ``"synthetic"`` or ``"custom"``.
    unit_kind
        ``"spot"`` (a unit holds many cells) or ``"cell"`` (a cell or a fine bin).
    unit_diameter_um
        Unit diameter in microns, written to ``uns["sigmma_dataset"]``.
    log_normalized
        ``counts`` hold log1p-normalised values: ``X`` is float32 and there is no ``layers["counts"]``.
    drop_empty
        Drop units without any count (their shapes too) and genes without any count in the loaded
        sections: downstream steps refuse empty units and genes (:func:`sigmma_sc.io.validate`).

    Returns
    -------
    Images ``"{S}_he"``, shapes ``"{S}_spots" | "{S}_cells" | "{S}_bins"`` and the table ``"table"``.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import sparse
    >>> from sigmma_sc.io import SectionArrays, build_sdata
    >>> arrays = SectionArrays(
    ...     section="S0",
    ...     image=np.full((64, 64, 3), 230, np.uint8),
    ...     mpp=1.0,
    ...     xy_um=np.array([[10.0, 10.0], [30.0, 40.0]]),
    ...     counts=sparse.csr_matrix(np.array([[1, 0], [2, 3]])),
    ...     genes=["A", "B"],
    ...     shape="circle",
    ...     diameter_um=10.0,
    ...     unit="cell",
    ... )
    >>> sdata = build_sdata([arrays], technology="custom", unit_kind="cell", unit_diameter_um=10.0)
    >>> sorted(sdata.images), sorted(sdata.shapes), sdata["table"].shape
    (['S0_he'], ['S0_cells'], (2, 2))
    """
    from spatialdata import SpatialData

    if not sections:
        raise ValueError("build_sdata needs at least one section.")
    if drop_empty:
        sections = [_without_empty_units(s) for s in sections]
    image_keys = {s.section: f"{s.section}{IMAGE_SUFFIX}" for s in sections}
    shapes_keys = {s.section: f"{s.section}{UNIT_SUFFIX[s.unit]}" for s in sections}
    table = build_table(
        sections,
        image_keys=image_keys,
        shapes_keys=shapes_keys,
        technology=technology,
        unit_kind=unit_kind,
        unit_diameter_um=unit_diameter_um,
        log_normalized=log_normalized,
        drop_empty=drop_empty,
    )
    images = {image_keys[s.section]: _image_element(s) for s in sections}
    shapes = {shapes_keys[s.section]: build_shapes(s, np.arange(s.n_units, dtype=np.int64)) for s in sections}
    return SpatialData(images=images, shapes=shapes, tables={Keys.TABLE: table})


def build_table(
    sections: Sequence[SectionArrays],
    *,
    image_keys: dict[str, str],
    shapes_keys: dict[str, str],
    technology: str,
    unit_kind: Literal["spot", "cell"],
    unit_diameter_um: float,
    log_normalized: bool = False,
    drop_empty: bool = False,
) -> Any:
    """Build the table of units of some sections, annotating the shapes elements ``shapes_keys``.

    The table half of :func:`build_sdata`, for steps that add units to an object whose images
    exist already (:func:`sigmma_sc.pp.bins_to_cells`): ``SectionArrays.image`` is not read.
    Unit ``i`` of section ``S`` is row ``"{S}_{i}"`` and instance ``i`` of ``shapes_keys[S]``.

    Parameters
    ----------
    sections
        One :class:`SectionArrays` per section (empty units already dropped when ``drop_empty``).
    image_keys, shapes_keys
        Section -> image element / shapes element names, written to ``uns["sigmma_dataset"]``.
    technology, unit_kind, unit_diameter_um, log_normalized, drop_empty
        As in :func:`build_sdata` (``drop_empty`` drops genes without counts here).

    Returns
    -------
    AnnData parsed by spatialdata's ``TableModel``.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import sparse
    >>> arrays = SectionArrays(
    ...     section="S0", image=None, mpp=1.0, xy_um=np.array([[10.0, 10.0]]),
    ...     counts=sparse.csr_matrix(np.array([[1, 2]])), genes=["A", "B"], shape="circle",
    ...     diameter_um=10.0, unit="cell",
    ... )
    >>> t = build_table([arrays], image_keys={"S0": "S0_he"}, shapes_keys={"S0": "S0_cells"},
    ...     technology="custom", unit_kind="cell", unit_diameter_um=10.0)
    >>> t.obs_names.tolist(), t.uns["spatialdata_attrs"]["region"]
    (['S0_0'], ['S0_cells'])
    """
    import anndata as ad
    from spatialdata.models import TableModel

    if not sections:
        raise ValueError("build_table needs at least one section.")
    names = [s.section for s in sections]
    if len(set(names)) != len(names):
        raise ValueError(f"section names must be unique, got {names}.")

    genes = _union_genes(sections)
    blocks: list[sparse.csr_matrix] = []
    obs_parts: list[pd.DataFrame] = []
    xy_parts: list[np.ndarray] = []
    for s in sections:
        n = s.n_units
        xy = np.asarray(s.xy_um, dtype=np.float64)
        if xy.shape != (n, 2):
            raise ValueError(f"section {s.section!r}: xy_um must have shape ({n}, 2), got {xy.shape}.")
        if len(s.genes) != s.counts.shape[1]:
            raise ValueError(f"section {s.section!r}: {len(s.genes)} gene names for {s.counts.shape[1]} count columns.")
        duplicated = pd.Index(s.genes)[pd.Index(s.genes).duplicated()]
        if len(duplicated):
            raise ValueError(
                f"section {s.section!r}: duplicated gene names {list(duplicated[:5])}; make them unique first "
                "(e.g. anndata's var_names_make_unique)."
            )
        ids = np.arange(n, dtype=np.int64)

        blocks.append(_remap_columns(sparse.csr_matrix(s.counts), s.genes, genes))
        obs = pd.DataFrame(
            {
                Keys.SECTION: s.section,
                Keys.REGION: shapes_keys[s.section],
                Keys.INSTANCE: ids,
            },
            index=[f"{s.section}_{i}" for i in ids],
        )
        if s.barcodes is not None:
            obs[Keys.BARCODE] = np.asarray(s.barcodes, dtype=str)
        if s.obs is not None:
            extra = s.obs.reset_index(drop=True)
            extra.index = obs.index
            obs = pd.concat([obs, extra.drop(columns=[c for c in extra.columns if c in obs.columns])], axis=1)
        obs_parts.append(obs)
        xy_parts.append(xy)

    X = sparse.vstack(blocks, format="csr")
    X = X.astype(np.float32) if log_normalized else X.astype(np.int32)
    if drop_empty:
        X.eliminate_zeros()
        measured = np.bincount(X.indices, minlength=X.shape[1]) > 0
        if not measured.all():
            logger.info(f"dropped {int((~measured).sum())} of {len(genes)} genes without counts.")
            X, genes = X[:, measured], genes[measured]
    obs = pd.concat(obs_parts, axis=0)
    obs[Keys.SECTION] = pd.Categorical(obs[Keys.SECTION], categories=names)
    obs[Keys.REGION] = pd.Categorical(obs[Keys.REGION], categories=[shapes_keys[n] for n in names])

    var = pd.DataFrame(index=genes)
    var_extras = [s.var for s in sections if s.var is not None]
    if var_extras:
        merged = pd.concat(var_extras, axis=0)
        merged = merged[~merged.index.duplicated(keep="first")]
        var = merged.reindex(genes)

    adata = ad.AnnData(X=X, obs=obs, var=var)
    if not log_normalized:
        adata.layers[Keys.COUNTS_LAYER] = X.copy()
    adata.obsm[Keys.SPATIAL] = np.concatenate(xy_parts, axis=0)
    adata.uns[Keys.DATASET] = {
        Keys.TECHNOLOGY: technology,
        Keys.UNIT_KIND: unit_kind,
        Keys.UNIT_DIAMETER: float(unit_diameter_um),
        Keys.LOG_NORMALIZED: bool(log_normalized),
        Keys.IMAGE_KEYS: image_keys,
        Keys.SHAPES_KEYS: shapes_keys,
    }
    table = TableModel.parse(
        adata,
        region=[shapes_keys[n] for n in names],
        region_key=Keys.REGION,
        instance_key=Keys.INSTANCE,
    )
    return table
