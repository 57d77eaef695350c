"""Fast, read-only access to one section's H&E image (a SpatialData image element).

Pixels live only here and in ``pp``: everything else speaks microns. A :class:`SectionImage`
holds the affine from the section's microns to full-resolution pixels and reads windows of any
pyramid level as ``(h, w, 3) uint8``, padded with white outside the image. The user's image is
never modified: dtype conversion (float / uint16 -> uint8) and the channel-last transpose happen
on the fly, inside the reads.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da

# Levels up to this size are read into memory once and then sliced as numpy: later code reads
# thousands of small windows and a dask graph per window costs ~1 ms. Larger (lazy) levels are
# read chunk by chunk, so memory follows the windows read, not the slide.
_CACHE_MAX_BYTES = 64 * 2**20
# Computed levels and chunks are shared between SectionImages of the same dask array (every public
# function validates again), least recently used first out.
_SHARED_CACHE_BYTES = 256 * 2**20
_shared_cache: OrderedDict[Any, np.ndarray] = OrderedDict()
# A lazy level whose chunks are larger than this is read window by window instead (no chunk cache).
_CHUNK_MAX_BYTES = 64 * 2**20

WHITE = 255


def _scale_keys(tree: Any) -> list[str]:
    keys = [k for k in tree.children if re.fullmatch(r"scale\d+", k)]
    return sorted(keys, key=lambda k: int(k[5:]))


def image_levels(element: Any) -> list[Any]:
    """Return the pyramid of an image element as a list of ``DataArray`` (full resolution first).

    Parameters
    ----------
    element
        A SpatialData image: a ``DataTree`` with ``scale0 .. scaleN`` nodes or a single ``DataArray``.

    Returns
    -------
    One ``DataArray`` per level with dims including ``c``, ``y`` and ``x``.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.xenium_lung()
    >>> [level.shape for level in sg.io.image_levels(sdata.images["NCBI858_he"])]
    [(3, 1249, 1431), (3, 624, 715)]
    """
    if len(getattr(element, "children", {})) > 0:
        keys = _scale_keys(element)
        if not keys:
            raise ValueError("multiscale image has no 'scale0' node; it is not a SpatialData image element.")
        out = []
        for k in keys:
            ds = element[k]
            names = list(ds.data_vars)
            out.append(ds[names[0]])
        return out
    return [element]


def channel_kind(arr: Any) -> tuple[str, int]:
    """How an image's channels map to RGB: ``("rgb", 3)``, ``("rgba", 4)`` or ``("bad", n)``."""
    if "c" not in arr.dims:
        return "bad", 1
    n = int(arr.sizes["c"])
    if n == 3:
        return "rgb", 3
    if n == 4:
        coords = [str(c).lower() for c in np.asarray(arr.coords["c"].values)] if "c" in arr.coords else []
        # A fourth channel is dropped only when it is known to be alpha (or unnamed RGBA as readers write it).
        if not coords or coords[3] in ("a", "alpha", "3"):
            return "rgba", 4
    return "bad", n


def conversion_for(arr: Any, name: str) -> tuple[float, bool]:
    """Decide how to bring an image's values to ``uint8``: returns ``(scale, needs_round)``.

    ``uint8`` is used as is. ``uint16`` is divided by 257 (full 16-bit range) unless its values
    already fit in 0..255. Floats in ``[0, 1]`` are multiplied by 255, floats in ``[0, 255]``
    are rounded. Anything else (signed integers with negatives, floats outside ``[0, 255]``) is
    refused. The range is checked on the coarsest pyramid level, which is cheap.

    Parameters
    ----------
    arr
        The coarsest level of the image (``DataArray``).
    name
        Element name, for error messages.

    Returns
    -------
    Multiplier to apply before casting, and whether values must be rounded.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> from sigmma_sc.io import conversion_for
    >>> conversion_for(xr.DataArray(np.ones((3, 4, 4), np.float32), dims=("c", "y", "x")), "he")
    (255.0, True)
    """
    dt = np.dtype(arr.dtype)
    if dt == np.uint8:
        return 1.0, False
    data = arr.data
    lo = float(np.asarray(data.min().compute() if hasattr(data, "compute") else data.min()))
    hi = float(np.asarray(data.max().compute() if hasattr(data, "compute") else data.max()))
    fix = (
        f"Convert image {name!r} to RGB uint8 yourself (e.g. skimage.util.img_as_ubyte) and store it as a new "
        "image element."
    )
    if np.issubdtype(dt, np.floating):
        if not np.isfinite(lo) or not np.isfinite(hi):
            raise ValueError(f"image {name!r} ({dt}) contains NaN or infinite values. {fix}")
        if lo >= 0 and hi <= 1.0:
            return 255.0, True
        if lo >= 0 and hi <= 255.0:
            return 1.0, True
        raise ValueError(f"image {name!r} is {dt} with values in [{lo:g}, {hi:g}], neither [0, 1] nor [0, 255]. {fix}")
    if np.issubdtype(dt, np.integer):
        if lo < 0:
            raise ValueError(f"image {name!r} is {dt} with negative values (min {lo:g}). {fix}")
        if hi <= 255:
            return 1.0, False
        if dt == np.uint16:
            return 1.0 / 257.0, True
        raise ValueError(f"image {name!r} is {dt} with values up to {hi:g}; only uint8 or uint16 are converted. {fix}")
    raise ValueError(f"image {name!r} has unsupported dtype {dt}. {fix}")


def to_uint8(block: np.ndarray, scale: float, rnd: bool) -> np.ndarray:
    if block.dtype == np.uint8:
        return block
    x = block.astype(np.float32, copy=False)
    if scale != 1.0:
        x = x * np.float32(scale)
    if rnd:
        x = np.rint(x)
    return np.clip(x, 0, 255).astype(np.uint8)


def _numpy_source(arr: Any) -> np.ndarray | None:
    """Find the in-memory numpy array behind a dask-wrapped image (no copy), when there is one.

    ``Image2DModel.parse(numpy_array)`` wraps the array with ``da.from_array`` and a rechunk; the
    original array sits in the graph. Reading windows from it directly avoids a dask graph per read.
    """
    data = arr.data
    if isinstance(data, np.ndarray):
        return data
    graph = getattr(data, "dask", None)
    if graph is None:
        return None
    layers = getattr(graph, "layers", {})
    # "sigmma-image-" layers wrap the loaders' in-memory arrays without a copy (datasets._build).
    if any(not str(name).startswith(("array-", "original-", "rechunk-", "sigmma-image-")) for name in layers):
        return None
    values = [getattr(v, "_array", v) for v in dict(graph).values()]
    found = [v for v in values if isinstance(v, np.ndarray) and v.shape == data.shape]
    if len(found) != 1 or found[0].dtype != data.dtype:
        return None
    src = found[0]
    # Guard against a graph that transforms the source: check a corner and the centre.
    idx = [tuple(0 for _ in data.shape), tuple(s // 2 for s in data.shape), tuple(s - 1 for s in data.shape)]
    for i in idx:
        if not np.array_equal(np.asarray(data[i].compute()), src[i]):
            return None
    return src


def _cached(key: Any, build: Any) -> np.ndarray:
    """Return the numpy value of the dask array ``build()`` under ``key``, computed on the first request only.

    A hit costs a dictionary lookup (no dask graph is built); entries are shared between readers
    and evicted least recently used first beyond ``_SHARED_CACHE_BYTES``.
    """
    hit = _shared_cache.get(key)
    if hit is not None:
        _shared_cache.move_to_end(key)
        return hit
    out = np.asarray(build().compute())
    out.setflags(write=False)  # shared between readers: nobody may write into it
    _shared_cache[key] = out
    while sum(v.nbytes for v in _shared_cache.values()) > _SHARED_CACHE_BYTES and len(_shared_cache) > 1:
        _shared_cache.popitem(last=False)
    return out


def _computed(data: Any) -> np.ndarray:
    """Compute ``data`` to numpy once per dask array (keyed by its deterministic name)."""
    name = getattr(data, "name", None)
    if not hasattr(data, "compute") or not isinstance(name, str):
        return np.asarray(data)
    return _cached(name, lambda: data)


def _read_chunks(data: Any, r0: int, r1: int, c0: int, c1: int) -> np.ndarray | None:
    """Window ``[r0:r1, c0:c1]`` of a lazy ``(y, x, c)`` array assembled from its cached chunks.

    Neighbouring windows (tiles with margins, crops of nearby units) share chunks, so each chunk is
    read and decompressed about once. ``None`` when the chunks are too large to cache.
    """
    name = getattr(data, "name", None)
    if name is None or not hasattr(data, "blocks"):
        return None
    ys, xs = np.cumsum((0, *data.chunks[0])), np.cumsum((0, *data.chunks[1]))
    if max(np.diff(ys)) * max(np.diff(xs)) * data.shape[2] * data.dtype.itemsize > _CHUNK_MAX_BYTES:
        return None
    out = np.empty((r1 - r0, c1 - c0, data.shape[2]), dtype=data.dtype)
    for i in range(np.searchsorted(ys, r0, "right") - 1, np.searchsorted(ys, r1, "left")):
        for j in range(np.searchsorted(xs, c0, "right") - 1, np.searchsorted(xs, c1, "left")):
            block = _cached((name, i, j), lambda i=i, j=j: data.blocks[i, j])
            a0, a1 = max(r0, ys[i]), min(r1, ys[i + 1])
            b0, b1 = max(c0, xs[j]), min(c1, xs[j + 1])
            out[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = block[a0 - ys[i] : a1 - ys[i], b0 - xs[j] : b1 - xs[j]]
    return out


@dataclass(eq=False)
class SectionImage:
    """One section's H&E image, addressed in microns.

    Attributes
    ----------
    section
        Section name.
    element
        Image element name in ``sdata.images``.
    coordinate_system
        Coordinate system in which ``px_from_um`` was derived.
    px_from_um
        ``(3, 3)`` affine: ``[col, row, 1] = px_from_um @ [x_um, y_um, 1]`` at full resolution.
        General affine: mirrored and rotated sections work.
    shape
        Full-resolution ``(height, width)``.
    n_levels
        Number of pyramid levels.
    level_factors
        Downscale factor of each level relative to full resolution (``1.0`` for level 0).

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> slide = sg.io.validate(sg.datasets.xenium_lung())
    >>> img = slide.images["NCBI858"]
    >>> img.shape, img.n_levels, img.um_per_px
    ((1249, 1431), 2, 2.125)
    >>> patch = img.read(0, 224, 0, 224)
    >>> patch.shape, patch.dtype
    ((224, 224, 3), dtype('uint8'))
    >>> img.um_to_px(slide.xy_um[:2]).round(1)  # (col, row) full-resolution pixels
    array([[ 999.9,  536.9],
           [ 425.6, 1056.2]])
    """

    section: str
    element: str
    coordinate_system: str
    px_from_um: np.ndarray
    shape: tuple[int, int]
    n_levels: int
    level_factors: list[float]
    _levels: list[Any] = field(repr=False)
    _channels: int = field(default=3, repr=False)
    _scale: float = field(default=1.0, repr=False)
    _round: bool = field(default=False, repr=False)
    _cache: dict[int, np.ndarray | None] = field(default_factory=dict, repr=False)
    _lazy: dict[int, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_element(
        cls,
        element: Any,
        *,
        section: str,
        name: str,
        coordinate_system: str,
        px_from_um: np.ndarray,
    ) -> SectionImage:
        """Wrap a SpatialData image element; checks channels and dtype (raises on unusable images).

        Parameters
        ----------
        element
            The image element (``DataTree`` pyramid or ``DataArray``).
        section
            Section name.
        name
            Element name, for messages.
        coordinate_system
            Coordinate system of ``px_from_um``.
        px_from_um
            ``(3, 3)`` affine microns -> full-resolution pixels (``x`` = column, ``y`` = row).

        Returns
        -------
        The section image.

        Examples
        --------
        >>> import numpy as np
        >>> from spatialdata.models import Image2DModel
        >>> from sigmma_sc.io import SectionImage
        >>> el = Image2DModel.parse(np.zeros((3, 64, 64), np.uint8), dims=("c", "y", "x"))
        >>> img = SectionImage.from_element(el, section="s", name="he", coordinate_system="s", px_from_um=np.eye(3))
        """
        levels = image_levels(element)
        kind, n = channel_kind(levels[0])
        if kind == "bad":
            raise ValueError(
                f"image {name!r} has {n} channel(s); an RGB H&E image with dims ('c', 'y', 'x') and 3 channels is "
                "required (a fluorescence / DAPI image cannot be used). Pass the H&E element with `image_key=`, or "
                "add the H&E with spatialdata.models.Image2DModel.parse(rgb_array, dims=('c', 'y', 'x'))."
            )
        scale, rnd = conversion_for(levels[-1], name)
        h, w = int(levels[0].sizes["y"]), int(levels[0].sizes["x"])
        factors = [0.5 * (h / int(lv.sizes["y"]) + w / int(lv.sizes["x"])) for lv in levels]
        m = np.asarray(px_from_um, dtype=np.float64)
        if m.shape != (3, 3) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:2, :2])) < 1e-12:
            raise ValueError(f"image {name!r}: the microns -> pixels affine is singular or not finite: {m.tolist()}.")
        return cls(
            section=section,
            element=name,
            coordinate_system=coordinate_system,
            px_from_um=m,
            shape=(h, w),
            n_levels=len(levels),
            level_factors=factors,
            _levels=levels,
            _channels=3,
            _scale=scale,
            _round=rnd,
        )

    # -- geometry ---------------------------------------------------------------------------
    @property
    def um_from_px(self) -> np.ndarray:
        """Inverse of ``px_from_um`` (full-resolution pixels -> microns)."""
        return np.linalg.inv(self.px_from_um)

    @property
    def um_per_px(self) -> float:
        """Mean pixel size at full resolution (square root of the affine's area scale)."""
        return float(np.sqrt(abs(np.linalg.det(self.um_from_px[:2, :2]))))

    def level_um_per_px(self, level: int) -> float:
        """Pixel size at pyramid level ``level``."""
        return self.um_per_px * self.level_factors[level]

    def level_shape(self, level: int) -> tuple[int, int]:
        """``(height, width)`` of pyramid level ``level``."""
        lv = self._levels[level]
        return int(lv.sizes["y"]), int(lv.sizes["x"])

    def um_to_px(self, xy_um: np.ndarray, *, level: int = 0) -> np.ndarray:
        """Map ``(n, 2)`` micron coordinates ``(x, y)`` to pixel ``(col, row)`` at a pyramid level.

        Parameters
        ----------
        xy_um
            ``(n, 2)`` points in microns.
        level
            Pyramid level.

        Returns
        -------
        ``(n, 2)`` float64 ``(col, row)``.

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> slide = sg.io.validate(sg.datasets.xenium_lung())  # 2.125 µm per pixel
        >>> slide.images["NCBI858"].um_to_px([[212.5, 425.0]])
        array([[100., 200.]])
        """
        p = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
        out = p @ self.px_from_um[:2, :2].T + self.px_from_um[:2, 2]
        return out / self.level_factors[level] if level else out

    def px_to_um(self, colrow: np.ndarray, *, level: int = 0) -> np.ndarray:
        """Map ``(n, 2)`` pixel ``(col, row)`` at a pyramid level to microns ``(x, y)``.

        Parameters
        ----------
        colrow
            ``(n, 2)`` pixel coordinates.
        level
            Pyramid level.

        Returns
        -------
        ``(n, 2)`` float64 ``(x, y)`` microns.

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> slide = sg.io.validate(sg.datasets.xenium_lung())  # 2.125 µm per pixel
        >>> slide.images["NCBI858"].px_to_um([[100.0, 200.0]])
        array([[212.5, 425. ]])
        """
        p = np.asarray(colrow, dtype=np.float64).reshape(-1, 2) * self.level_factors[level]
        m = self.um_from_px
        return p @ m[:2, :2].T + m[:2, 2]

    def best_level(self, um_per_px_wanted: float) -> int:
        """Coarsest pyramid level whose pixels are no coarser than ``um_per_px_wanted``.

        Parameters
        ----------
        um_per_px_wanted
            Target pixel size in microns.

        Returns
        -------
        Level index (``0`` when even full resolution is coarser than wanted).

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> img = sg.io.validate(sg.datasets.xenium_lung()).images["NCBI858"]  # 2.125 and 4.25 µm/px
        >>> img.best_level(2.0), img.best_level(5.0)
        (0, 1)
        """
        best = 0
        for lv in range(self.n_levels):
            # 1% slack: pyramid factors of odd-sized images are not exact powers of two.
            if self.level_um_per_px(lv) <= um_per_px_wanted * 1.01:
                best = lv
        return best

    # -- pixels -------------------------------------------------------------------------------
    def _channel_axis_last(self, arr: Any) -> Any:
        dims = tuple(arr.dims)
        order = [dims.index("y"), dims.index("x"), dims.index("c")]
        return order

    def level_array(self, level: int = 0) -> da.Array:
        """Pyramid level ``level`` as a lazy dask array ``(y, x, 3)`` ``uint8``.

        Parameters
        ----------
        level
            Pyramid level (``0`` = full resolution).

        Returns
        -------
        Dask array; conversion to ``uint8`` happens lazily per chunk.

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> img = sg.io.validate(sg.datasets.xenium_lung()).images["NCBI858"]
        >>> thumb = img.level_array(img.n_levels - 1).compute()
        >>> thumb.shape
        (624, 715, 3)
        """
        import dask.array as da

        arr = self._levels[level]
        data = arr.data if hasattr(arr.data, "dask") else da.from_array(arr.data)
        data = data.transpose(self._channel_axis_last(arr))[..., :3]
        if data.dtype != np.uint8:
            data = data.map_blocks(to_uint8, self._scale, self._round, dtype=np.uint8)
        return data

    def _numpy_level(self, level: int) -> np.ndarray | None:
        """``(y, x, c)`` numpy view of a level when cheap (in memory or small), else ``None``."""
        if level in self._cache:
            return self._cache[level]
        arr = self._levels[level]
        order = self._channel_axis_last(arr)
        src = _numpy_source(arr)
        out: np.ndarray | None
        if src is not None:
            out = src.transpose(order)
        elif np.prod(arr.shape) * np.dtype(arr.dtype).itemsize <= _CACHE_MAX_BYTES:
            out = _computed(arr.data).transpose(order)
        else:
            out = None
        self._cache[level] = out
        return out

    def _lazy_level(self, level: int) -> Any:
        # One dask graph per level and image, not one per read (reads come by the thousand).
        if level not in self._lazy:
            self._lazy[level] = self.level_array(level)
        return self._lazy[level]

    def read(self, row0: int, row1: int, col0: int, col1: int, *, level: int = 0) -> np.ndarray:
        """Read pixels ``[row0:row1, col0:col1]`` of a pyramid level as ``(h, w, 3)`` ``uint8``.

        Parts of the window outside the image are white (255), so windows near the border keep
        their size. Coordinates are integer pixels of that level.

        Parameters
        ----------
        row0, row1, col0, col1
            Half-open window, may extend past the image on any side.
        level
            Pyramid level.

        Returns
        -------
        A new ``(row1 - row0, col1 - col0, 3)`` ``uint8`` array.

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> img = sg.io.validate(sg.datasets.xenium_lung()).images["NCBI858"]
        >>> patch = img.read(-10, 100, -10, 100)  # first 10 rows / columns are white padding
        >>> patch.shape, int(patch[:10, :10].min())
        ((110, 110, 3), 255)
        """
        row0, row1, col0, col1 = int(row0), int(row1), int(col0), int(col1)
        if row1 < row0 or col1 < col0:
            raise ValueError(f"read: empty or inverted window rows {row0}:{row1}, cols {col0}:{col1}.")
        h, w = self.level_shape(level)
        out = np.full((row1 - row0, col1 - col0, 3), WHITE, dtype=np.uint8)
        r0, r1 = max(row0, 0), min(row1, h)
        c0, c1 = max(col0, 0), min(col1, w)
        if r0 >= r1 or c0 >= c1:
            return out
        src = self._numpy_level(level)
        if src is not None:
            block = src[r0:r1, c0:c1, :3]
        elif (chunked := _read_chunks(self._lazy_level(level), r0, r1, c0, c1)) is not None:
            out[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = chunked
            return out
        else:
            arr = self._levels[level]
            sub = arr.isel(y=slice(r0, r1), x=slice(c0, c1)).data
            sub = sub.compute() if hasattr(sub, "compute") else sub
            block = np.asarray(sub).transpose(self._channel_axis_last(arr))[..., :3]
        out[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = to_uint8(block, self._scale, self._round)
        return out
