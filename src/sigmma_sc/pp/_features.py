"""Image features of every hierarchy node, computed once per image and cached in the table.

Dense path (default for CNN encoders): the encoder's stride-32 feature map is computed once per
section image, in tiles with a context margin that is cropped off the map (no seams), at native
resolution and 2x downsampled; each node's feature is the mean of the map over its field of view,
read from a summed-area table in O(1) per node. The cost grows with tissue area, not with
nodes x levels. Crop path: one encoder call per node view (fixed-size crops, for transformers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from sigmma_sc._constants import Defaults, Keys
from sigmma_sc._logging import logger
from sigmma_sc._settings import settings

from ._encoders import DENSE_STRIDE, Encoder, get_encoder
from ._patches import as_section_image, iter_crops

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

    from ._stain import StainNormalizer

_METHODS = ("dense", "crop", "auto")
# A tile whose core has less than this fraction of coloured or dark pixels is glass.
_MIN_TISSUE_FRACTION = 0.002
# Channel block of the summed-area table (float64): bounds its memory on large sections.
_SAT_CHANNELS = 256


def _progress(iterable: Any, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not settings.progress_bar, **kwargs)


# ---------------------------------------------------------------------------------------------
# Dense feature maps
# ---------------------------------------------------------------------------------------------
def _level_for_factor(image: Any, factor: float) -> int | None:
    for lv, f in enumerate(image.level_factors):
        if abs(f - factor) <= 0.01 * factor:
            return lv
    return None


def _read_scaled(image: Any, scale: int, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
    """Window ``[row0, row1) x [col0, col1)`` in pixels of the image downsampled ``scale`` times."""
    if scale == 1:
        return image.read(row0, row1, col0, col1, level=0)
    lv = _level_for_factor(image, float(scale))
    if lv is not None:
        return image.read(row0, row1, col0, col1, level=lv)
    # No pyramid level at that factor: average scale x scale blocks of full resolution.
    full = image.read(row0 * scale, row1 * scale, col0 * scale, col1 * scale, level=0)
    h, w = row1 - row0, col1 - col0
    blocks = full.reshape(h, scale, w, scale, 3).astype(np.float32).mean(axis=(1, 3))
    return np.round(blocks).astype(np.uint8)


def _is_tissue(rgb: np.ndarray) -> bool:
    x = rgb[::4, ::4].astype(np.int16)
    coloured = (x.max(axis=-1) - x.min(axis=-1)) > 20
    dark = x.mean(axis=-1) < 180
    return bool(np.mean(coloured | dark) >= _MIN_TISSUE_FRACTION)


def map_grid_shape(shape: tuple[int, int], scale: int) -> tuple[int, int]:
    """Cells of the stride-32 map of an image of full-resolution ``shape`` downsampled ``scale`` times.

    Examples
    --------
    >>> map_grid_shape((1000, 640), 2)
    (8, 10)
    """
    h, w = -(-shape[0] // scale), -(-shape[1] // scale)
    return -(-h // DENSE_STRIDE), -(-w // DENSE_STRIDE)


def tile_rects(needed: np.ndarray, tile_px: int = Defaults.DENSE_TILE_PX) -> list[tuple[int, int, int, int]]:
    """Tiles of the dense path: ``(row0, row1, col0, col1)`` in map cells, one per ``tile_px`` block with needed cells.

    Each tile is trimmed to the bounding box of the cells it must fill, so tiles at the tissue edge
    and at the image border do not pay for glass or padding.

    Examples
    --------
    >>> import numpy as np
    >>> need = np.zeros((40, 40), bool)
    >>> need[3:5, 30:38] = True
    >>> tile_rects(need, 1024)
    [(3, 5, 30, 32), (3, 5, 32, 38)]
    """
    cells = tile_px // DENSE_STRIDE
    gh, gw = needed.shape
    rects = []
    for ti in range(0, gh, cells):
        for tj in range(0, gw, cells):
            block = needed[ti : ti + cells, tj : tj + cells]
            if block.any():
                rows, cols = np.flatnonzero(block.any(axis=1)), np.flatnonzero(block.any(axis=0))
                rects.append((ti + int(rows[0]), ti + int(rows[-1]) + 1, tj + int(cols[0]), tj + int(cols[-1]) + 1))
    return rects


def dense_feature_map(
    image: Any,
    encoder: Encoder,
    *,
    scale: int = 1,
    needed: np.ndarray | None = None,
    tile_px: int = Defaults.DENSE_TILE_PX,
    margin_px: int = Defaults.DENSE_MARGIN_PX,
    tiles_per_batch: int = 4,
    stain: StainNormalizer | None = None,
    px_from_um: np.ndarray | None = None,
) -> np.ndarray:
    """Compute the encoder's stride-32 feature map over a whole section image.

    Parameters
    ----------
    image
        :class:`sigmma_sc.io.SectionImage` or a ``(height, width, 3)`` array (with ``px_from_um``).
    encoder
        A dense encoder (:attr:`Encoder.dense`).
    scale
        1: native resolution; 2: downsampled 2x (a wider receptive field per map cell).
    needed
        ``(gh, gw)`` bool mask of the map cells that some node's window touches; tiles are trimmed
        to them and tiles without any are skipped (cells left zero). Default: every cell.
    tile_px, margin_px
        Tile core and context margin in pixels (multiples of 32); the encoder sees
        ``tile_px + 2 * margin_px`` pixels and the margin's map cells are dropped, so neighbouring
        tiles join without seams as long as the margin covers the receptive field that matters.
    tiles_per_batch
        Tiles per forward pass.
    stain
        Fitted stain normaliser applied to each tile before encoding.
    px_from_um
        Microns -> pixels affine when ``image`` is an array.

    Returns
    -------
    ``(gh, gw, dim)`` float32 map; cell ``(i, j)`` covers full-resolution pixels
    ``[32 s i, 32 s (i + 1)) x [32 s j, 32 s (j + 1))`` for ``s = scale``. Tiles with no tissue get
    the map of a blank (white) tile.

    Examples
    --------
    >>> import numpy as np
    >>> import sigmma_sc as sg
    >>> enc = sg.pp.get_encoder("efficientnet_lite0", device="cpu")
    >>> fmap = dense_feature_map(np.full((100, 70, 3), 255, np.uint8), enc, px_from_um=np.eye(3), tile_px=64, margin_px=32)
    >>> fmap.shape
    (4, 3, 1280)
    """
    if not encoder.dense:
        raise ValueError(f"encoder {encoder.id!r} has no stride-32 feature map; use method='crop'.")
    if tile_px % DENSE_STRIDE or margin_px % DENSE_STRIDE or tile_px <= 0 or margin_px < 0:
        raise ValueError(f"tile_px ({tile_px}) and margin_px ({margin_px}) must be non-negative multiples of 32.")
    image = as_section_image(image, px_from_um)
    gh, gw = map_grid_shape(image.shape, scale)
    if needed is None:
        needed = np.ones((gh, gw), dtype=bool)
    mcells = margin_px // DENSE_STRIDE
    rects = tile_rects(needed, tile_px)
    fmap = np.zeros((gh, gw, encoder.dim), dtype=np.float32)
    blank: np.ndarray | None = None
    groups: dict[tuple[int, int], list[tuple[tuple[int, int, int, int], np.ndarray]]] = {}

    def flush(shape: tuple[int, int]) -> None:
        items = groups.pop(shape, [])
        if not items:
            return
        maps = encoder.encode_map(np.stack([rgb for _, rgb in items]))
        for (a0, a1, b0, b1), m in zip((rect for rect, _ in items), maps):
            fmap[a0:a1, b0:b1] = m[mcells : mcells + a1 - a0, mcells : mcells + b1 - b0]

    for a0, a1, b0, b1 in _progress(rects, desc=f"dense features x{scale}", unit="tile", leave=False):
        r0, c0 = a0 * DENSE_STRIDE - margin_px, b0 * DENSE_STRIDE - margin_px
        r1, c1 = a1 * DENSE_STRIDE + margin_px, b1 * DENSE_STRIDE + margin_px
        rgb = _read_scaled(image, scale, r0, r1, c0, c1)
        if not _is_tissue(rgb[margin_px : -margin_px or None, margin_px : -margin_px or None]):
            if blank is None:
                side = tile_px + 2 * margin_px
                white = encoder.encode_map(np.full((1, side, side, 3), 255, dtype=np.uint8))[0]
                blank = white[white.shape[0] // 2, white.shape[1] // 2]
            fmap[a0:a1, b0:b1] = blank
            continue
        if stain is not None:
            rgb = stain.transform(rgb)
        shape = rgb.shape[:2]
        groups.setdefault(shape, []).append(((a0, a1, b0, b1), rgb))
        if len(groups[shape]) >= tiles_per_batch:
            flush(shape)
    for shape in list(groups):
        flush(shape)
    return fmap


def window_cells(
    image: Any, centers_um: np.ndarray, fov_um: float, scale: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Node windows in map-cell coordinates: ``(row0, row1, col0, col1)`` floats, centred on each node."""
    colrow = image.um_to_px(np.asarray(centers_um, dtype=np.float64).reshape(-1, 2))
    cell = DENSE_STRIDE * scale
    half = fov_um / image.um_per_px / (2.0 * cell)
    v, u = colrow[:, 1] / cell, colrow[:, 0] / cell
    return v - half, v + half, u - half, u + half


def needed_cells(
    windows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], grid: tuple[int, int]
) -> np.ndarray:
    """Bool mask of map cells touched by any window (2-D difference array, O(nodes + cells))."""
    gh, gw = grid
    diff = np.zeros((gh + 1, gw + 1), dtype=np.int64)
    for v0, v1, u0, u1 in windows:
        # Windows outside the map still read their nearest cell (as pool_windows does).
        r0 = np.clip(np.floor(v0).astype(np.int64), 0, gh - 1)
        c0 = np.clip(np.floor(u0).astype(np.int64), 0, gw - 1)
        r1 = np.clip(np.ceil(v1).astype(np.int64), r0 + 1, gh)
        c1 = np.clip(np.ceil(u1).astype(np.int64), c0 + 1, gw)
        np.add.at(diff, (r0, c0), 1)
        np.add.at(diff, (r1, c0), -1)
        np.add.at(diff, (r0, c1), -1)
        np.add.at(diff, (r1, c1), 1)
    return diff.cumsum(0).cumsum(1)[:gh, :gw] > 0


def _clip_windows(
    v0: np.ndarray, v1: np.ndarray, u0: np.ndarray, u1: np.ndarray, grid: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    gh, gw = grid
    v0, v1 = np.clip(v0, 0, gh), np.clip(v1, 0, gh)
    u0, u1 = np.clip(u0, 0, gw), np.clip(u1, 0, gw)
    # A window clipped to nothing (node off the image) falls back to its nearest cell.
    empty_v, empty_u = (v1 - v0) < 1e-6, (u1 - u0) < 1e-6
    rv = np.clip(np.floor(v0), 0, gh - 1)
    ru = np.clip(np.floor(u0), 0, gw - 1)
    v0, v1 = np.where(empty_v, rv, v0), np.where(empty_v, rv + 1, v1)
    u0, u1 = np.where(empty_u, ru, u0), np.where(empty_u, ru + 1, u1)
    return v0, v1, u0, u1


def _overlap_operator(
    v0: np.ndarray, v1: np.ndarray, u0: np.ndarray, u1: np.ndarray, grid: tuple[int, int], span: int
) -> sparse.csr_matrix:
    """Sparse ``(n, gh gw)`` operator: map -> area-weighted mean over each window, for windows of at most ``span`` cells.

    Small windows (the micro level's cells and bins) touch 1-4 cells: weighting them directly is
    cheaper than the 16 reads of the summed-area table.
    """
    gh, gw = grid
    v0, v1, u0, u1 = _clip_windows(v0, v1, u0, u1, grid)
    n = len(v0)
    k = np.arange(span)

    def axis_weights(a0: np.ndarray, a1: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.minimum(np.floor(a0), size - 1).astype(np.int64)[:, None] + k
        w = np.clip(np.minimum(a1[:, None], idx + 1) - np.maximum(a0[:, None], idx), 0, None)
        w[idx >= size] = 0
        return np.minimum(idx, size - 1), w / (a1 - a0)[:, None]

    ry, wy = axis_weights(v0, v1, gh)
    cx, wx = axis_weights(u0, u1, gw)
    cols = (ry[:, :, None] * gw + cx[:, None, :]).reshape(n, -1)
    vals = (wy[:, :, None] * wx[:, None, :]).reshape(n, -1).astype(np.float32)
    rows = np.repeat(np.arange(n), span * span)
    return sparse.csr_matrix((vals.ravel(), (rows, cols.ravel())), shape=(n, gh * gw))


def _box_operator(
    v0: np.ndarray, v1: np.ndarray, u0: np.ndarray, u1: np.ndarray, grid: tuple[int, int]
) -> sparse.csr_matrix:
    """Sparse ``(n, (gh + 1) (gw + 1))`` operator: summed-area table -> mean of the map over each window.

    The summed-area table of a piecewise-constant map is bilinear inside each cell, so bilinear
    interpolation of it at the four (fractional) window corners gives the exact area-weighted sum.
    """
    gh, gw = grid
    v0, v1, u0, u1 = _clip_windows(v0, v1, u0, u1, grid)
    area = (v1 - v0) * (u1 - u0)
    n = len(v0)
    rows, cols, vals = [], [], []
    for y, x, sign in ((v1, u1, 1.0), (v0, u1, -1.0), (v1, u0, -1.0), (v0, u0, 1.0)):
        y0 = np.minimum(np.floor(y), gh - 1).astype(np.int64)
        x0 = np.minimum(np.floor(x), gw - 1).astype(np.int64)
        fy, fx = y - y0, x - x0
        for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (1, 0, fy * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 1, fy * fx)):
            rows.append(np.arange(n))
            cols.append((y0 + dy) * (gw + 1) + (x0 + dx))
            vals.append(sign * w / area)
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, (gh + 1) * (gw + 1))
    )


def pool_windows(fmap: np.ndarray, windows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Mean of a feature map over each window: direct overlap weights for small windows, else a summed-area table (O(1) per window).

    Parameters
    ----------
    fmap
        ``(gh, gw, dim)`` map.
    windows
        ``(row0, row1, col0, col1)`` arrays in cell units (fractions allowed), from :func:`window_cells`.

    Returns
    -------
    ``(n, dim)`` float32.

    Examples
    --------
    >>> import numpy as np
    >>> fmap = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    >>> pool_windows(fmap, (np.array([0.0]), np.array([2.0]), np.array([0.0]), np.array([2.0])))
    array([[2.5]], dtype=float32)
    """
    gh, gw, dim = fmap.shape
    v0, v1, u0, u1 = windows
    span = int(np.ceil(np.max(np.maximum(v1 - v0, u1 - u0), initial=0.0))) + 1
    if span <= 4:
        return np.asarray(_overlap_operator(v0, v1, u0, u1, (gh, gw), span) @ fmap.reshape(-1, dim), dtype=np.float32)
    op = _box_operator(*windows, grid=(gh, gw))
    out = np.empty((op.shape[0], dim), dtype=np.float32)
    sat = np.zeros((gh + 1, gw + 1, min(dim, _SAT_CHANNELS)), dtype=np.float64)
    for c in range(0, dim, _SAT_CHANNELS):
        k = min(_SAT_CHANNELS, dim - c)
        s = sat[..., :k]
        np.cumsum(fmap[..., c : c + k], axis=0, dtype=np.float64, out=s[1:, 1:])
        np.cumsum(s[1:, 1:], axis=1, out=s[1:, 1:])
        out[:, c : c + k] = op @ s.reshape(-1, k)
    return out


def _dense_scale(fov_um: float, coarse_fov_um: float, downsample: int = 1) -> int:
    return downsample * (2 if fov_um >= coarse_fov_um else 1)


def section_features(
    image: Any,
    centers_um: dict[str, np.ndarray],
    fov_um: dict[str, float],
    *,
    encoder: Encoder | str = Defaults.ENCODER,
    method: str = "auto",
    px_from_um: np.ndarray | None = None,
    stain: StainNormalizer | None = None,
    batch_size: int = Defaults.BATCH_SIZE,
    crop_px: int | None = None,
    tile_px: int = Defaults.DENSE_TILE_PX,
    margin_px: int = Defaults.DENSE_MARGIN_PX,
    coarse_fov_um: float = Defaults.DENSE_COARSE_FOV_UM,
    downsample: int = 1,
) -> dict[str, np.ndarray]:
    """Image features of the nodes of one section image, per level (the array-level core).

    Parameters
    ----------
    image
        :class:`sigmma_sc.io.SectionImage` or a ``(height, width, 3)`` uint8 array with ``px_from_um``.
    centers_um
        ``{level: (n, 2) node centres (x, y) in microns}``.
    fov_um
        ``{level: view side in microns}``.
    encoder
        :class:`Encoder` or name (see :func:`get_encoder`).
    method
        ``"dense"``, ``"crop"`` or ``"auto"`` (dense when the encoder supports it).
    px_from_um
        Microns -> pixels affine for arrays.
    stain
        Fitted stain normaliser applied to tiles / crops before encoding.
    batch_size
        Crops per forward pass (dense: ``batch_size // 16`` tiles).
    crop_px
        Crop side for the crop path (default: the encoder's input size).
    tile_px, margin_px
        Dense tiles (see :func:`dense_feature_map`).
    coarse_fov_um
        Levels with a view at least this wide pool the 2x-downsampled map.
    downsample
        Dense path: run the "native" pass on the image downsampled this many times (and the coarse
        pass at twice that), read from the pyramid level of that factor when there is one. ``2``
        suits scans finer than ~0.5 µm/px, where full resolution costs 4x the compute for detail
        an ImageNet CNN barely uses.

    Returns
    -------
    ``{level: (n, dim) float32}``.

    Examples
    --------
    >>> import numpy as np
    >>> import sigmma_sc as sg
    >>> img = np.full((256, 256, 3), 230, np.uint8)
    >>> feats = section_features(img, {"meso": np.array([[50.0, 50.0]])}, {"meso": 64.0}, px_from_um=np.eye(3))
    >>> feats["meso"].shape
    (1, 1280)
    """
    enc = get_encoder(encoder)
    image = as_section_image(image, px_from_um)
    method = _resolve_method(method, enc)
    if int(downsample) != downsample or downsample < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample!r}.")
    out: dict[str, np.ndarray] = {}
    if method == "crop":
        size = int(crop_px or enc.input_size)
        for level, centers in centers_um.items():
            feats = np.empty((len(centers), enc.dim), dtype=np.float32)
            crops = iter_crops(image, centers, float(fov_um[level]), size_px=size, batch_size=batch_size)
            total = -(-len(centers) // batch_size)
            for idx, batch in _progress(crops, total=total, desc=f"{level} crops", unit="batch", leave=False):
                if stain is not None:
                    batch = stain.transform(batch)
                feats[idx] = enc.encode(batch)
            out[level] = feats
        return out

    by_scale: dict[int, list[str]] = {}
    for level in centers_um:
        by_scale.setdefault(_dense_scale(float(fov_um[level]), coarse_fov_um, downsample), []).append(level)
    for scale, levels in sorted(by_scale.items()):
        grid = map_grid_shape(image.shape, scale)
        windows = {lv: window_cells(image, centers_um[lv], float(fov_um[lv]), scale) for lv in levels}
        windows = {lv: w for lv, w in windows.items() if len(w[0])}
        if not windows:
            out.update({lv: np.zeros((0, enc.dim), np.float32) for lv in levels})
            continue
        fmap = dense_feature_map(
            image,
            enc,
            scale=scale,
            needed=needed_cells(list(windows.values()), grid),
            tile_px=tile_px,
            margin_px=margin_px,
            tiles_per_batch=max(1, batch_size // 16),
            stain=stain,
        )
        for lv in levels:
            out[lv] = pool_windows(fmap, windows[lv]) if lv in windows else np.zeros((0, enc.dim), np.float32)
        del fmap
    return out


def _resolve_method(method: str, enc: Encoder) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    if method == "auto":
        return "dense" if enc.dense else "crop"
    if method == "dense" and not enc.dense:
        raise ValueError(
            f"encoder {enc.id!r} has no stride-32 feature map (a transformer or a module without "
            "feature_map=), so method='dense' is impossible; use method='crop' or 'auto'."
        )
    return method


# ---------------------------------------------------------------------------------------------
# SpatialData entry points
# ---------------------------------------------------------------------------------------------
def _slide_and_hierarchy(
    sdata: SpatialData, *, table_key: str = Keys.TABLE, build: bool = True, require_image: bool = True
) -> tuple[Any, Any]:
    from sigmma_sc.io import validate

    from ._hierarchy import build_hierarchy, get_hierarchy

    slide = validate(sdata, table_key=table_key, require_image=require_image)
    try:
        hier = get_hierarchy(sdata, table_key=table_key)
    except (KeyError, ValueError):
        hier = None
    if hier is None:
        if not build:
            raise ValueError(f"table {table_key!r} has no hierarchy; run sigmma_sc.pp.build_hierarchy(sdata) first.")
        logger.info("no hierarchy in the table: building it with pp.build_hierarchy")
        hier = build_hierarchy(sdata, table_key=table_key)
    return slide, hier


def _table(sdata_or_table: Any, table_key: str) -> AnnData:
    if hasattr(sdata_or_table, "tables"):
        if table_key not in sdata_or_table.tables:
            raise KeyError(f"no table {table_key!r} in sdata; tables: {list(sdata_or_table.tables)}.")
        return sdata_or_table.tables[table_key]
    return sdata_or_table


def feature_cache_key(encoder_id: str, method: str, fov_um: dict[str, float], stain_id: str | None = None) -> str:
    """Cache key of a feature set: encoder, method, every level's view and the stain normalisation.

    Examples
    --------
    >>> feature_cache_key("efficientnet_lite0", "dense", {"meso": 150.0, "macro": 500.0})
    'efficientnet_lite0__dense__meso150_macro500__raw'
    """
    fovs = "_".join(f"{lv}{float(f):g}" for lv, f in fov_um.items())
    return f"{encoder_id}__{method}__{fovs}__{stain_id or 'raw'}".replace("/", "_")


def _precomputed_levels(table: AnnData, hier: Any, obsm_key: str, levels: Sequence[str]) -> dict[str, np.ndarray]:
    if obsm_key not in table.obsm:
        raise KeyError(f"obsm has no {obsm_key!r} for encoder='precomputed'; keys: {list(table.obsm)}.")
    x = np.asarray(table.obsm[obsm_key], dtype=np.float32)
    names = list(hier.levels)
    unit_pos = names.index(hier.unit_level)
    out = {}
    for level in levels:
        lvl = hier.levels[level]
        n = len(lvl.centers_um)
        if names.index(level) < unit_pos:
            logger.warning(f"precomputed features describe table units; level {level!r} is finer and gets none.")
            continue
        node = np.asarray(hier.unit_nodes(level), dtype=np.int64)
        if lvl.members is not None and lvl.members.shape == (n, x.shape[0]):
            m = sparse.csr_matrix(lvl.members, dtype=np.float32)
        else:
            m = sparse.csr_matrix((np.ones(len(node), np.float32), (node, np.arange(len(node)))), shape=(n, x.shape[0]))
        counts = np.asarray(m.sum(axis=1)).ravel()
        out[level] = np.asarray(m @ x) / np.maximum(counts, 1.0)[:, None]
    return {k: v.astype(np.float32) for k, v in out.items()}


def image_features(
    sdata: SpatialData,
    *,
    table_key: str = Keys.TABLE,
    encoder: str | Any = Defaults.ENCODER,
    method: str = "auto",
    levels: Sequence[str] | None = None,
    stain_normalize: str | None = None,
    stain_reference: np.ndarray | None = None,
    obsm_key: str | None = None,
    batch_size: int = Defaults.BATCH_SIZE,
    device: str = "auto",
    downsample: int = 1,
    overwrite: bool = False,
) -> str:
    """Image features for every node of every hierarchy level, cached in the table.

    Parameters
    ----------
    sdata
        SpatialData with the H&E images and the table (see :func:`sigmma_sc.io.validate`).
    table_key
        Table annotating the units.
    encoder
        Encoder name, module or :class:`Encoder` (see :func:`get_encoder`); ``"precomputed"``
        with ``obsm_key`` uses features already in ``obsm`` (unit level, averaged over members
        at the coarser levels).
    method
        ``"dense"`` (one stride-32 map per image, pooled under each node's view; CNN encoders),
        ``"crop"`` (one encoder call per node view, resized to the encoder input) or ``"auto"``
        (dense when the encoder supports it).
    levels
        Levels to compute (default: every hierarchy level).
    stain_normalize
        ``None``, ``"macenko"`` or ``"reinhard"``: fitted once per section, applied per tile / crop
        before encoding.
    stain_reference
        Target RGB image of the stain normalisation (default: the method's standard H&E).
    obsm_key
        ``obsm`` key for ``encoder="precomputed"``.
    batch_size
        Crops per forward pass (the dense path runs ``batch_size // 16`` tiles of 1,280 px).
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
    downsample
        Dense path only: compute the maps on the image downsampled this many times (see
        :func:`section_features`); part of the cache key.
    overwrite
        Recompute even when cached.

    Returns
    -------
    The cache key: features are in ``table.uns["sigmma"]["features"][key][level]``, ``(n_nodes,
    dim)`` float32 aligned with the hierarchy's nodes. The hierarchy is built when missing.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.her2st()
    >>> key = sg.pp.image_features(sdata)
    >>> feats = sg.pp.get_features(sdata, key=key)
    >>> feats["meso"].shape
    (n_spots, 1280)
    """
    enc = get_encoder(encoder, obsm_key=obsm_key)
    slide, hier = _slide_and_hierarchy(sdata, table_key=table_key, require_image=not enc.precomputed)
    table = slide.table
    names = list(hier.levels)
    levels = names if levels is None else list(levels)
    unknown = [lv for lv in levels if lv not in hier.levels]
    if unknown:
        raise ValueError(f"levels {unknown} are not in the hierarchy; it has {names}.")
    fovs = {lv: float(hier.levels[lv].fov_um) for lv in names}
    if enc.precomputed:
        method_used, stain_id = "precomputed", None
    else:
        method_used = _resolve_method(method, enc)
        stain_id = None
        if stain_normalize is not None:
            from ._stain import _target

            if stain_normalize not in ("macenko", "reinhard"):
                raise ValueError(f"stain_normalize must be None, 'macenko' or 'reinhard', got {stain_normalize!r}.")
            stain_id = f"{stain_normalize}-{_target(stain_normalize, stain_reference)[1]}"
    if method_used == "dense" and downsample != 1:
        method_used = f"dense{int(downsample)}x"
    key = feature_cache_key(enc.id, method_used, fovs, stain_id)

    cache = table.uns.get(Keys.UNS, {}).get(Keys.FEATURES, {}).get(key, {})
    todo = [
        lv for lv in levels if overwrite or lv not in cache or np.shape(cache[lv])[0] != len(hier.levels[lv].centers_um)
    ]
    if not todo:
        logger.info(f"image features {key!r} found in the table cache")
        _write_features(table, key, {})
        return key

    if enc.precomputed:
        new = _precomputed_levels(table, hier, enc.obsm_key, todo)
    else:
        enc.to(device)
        new = {lv: np.zeros((len(hier.levels[lv].centers_um), enc.dim), np.float32) for lv in todo}
        for code, section in enumerate(_progress(slide.sections, desc="image features", unit="section")):
            image = slide.images[section]
            stain = None
            if stain_normalize is not None:
                from ._stain import fit_stain_normalizer

                thumb = image.level_array(image.best_level(image.um_per_px * 4))
                stain = fit_stain_normalizer(thumb, method=stain_normalize, reference=stain_reference)
            rows = {lv: np.flatnonzero(np.asarray(hier.levels[lv].section) == code) for lv in todo}
            feats = section_features(
                image,
                {lv: hier.levels[lv].centers_um[r] for lv, r in rows.items()},
                {lv: fovs[lv] for lv in todo},
                encoder=enc,
                method="dense" if method_used.startswith("dense") else method_used,
                stain=stain,
                batch_size=batch_size,
                downsample=downsample,
            )
            for lv, r in rows.items():
                new[lv][r] = feats[lv]
    bad = [lv for lv, f in new.items() if not np.all(np.isfinite(f))]
    if bad:
        raise FloatingPointError(f"non-finite image features at levels {bad} with encoder {enc.id!r}.")
    _write_features(table, key, new)
    return key


def _write_features(table: AnnData, key: str, new: dict[str, np.ndarray]) -> None:
    root = table.uns.setdefault(Keys.UNS, {})
    store = root.setdefault(Keys.FEATURES, {})
    entry = dict(store.get(key, {}))
    entry.update({lv: np.ascontiguousarray(f, dtype=np.float32) for lv, f in new.items()})
    store[key] = entry
    root[Keys.FEATURES_LATEST] = key


def get_features(
    sdata: SpatialData | AnnData, *, key: str | None = None, table_key: str = Keys.TABLE
) -> dict[str, np.ndarray]:
    """Return the cached image features per level.

    Parameters
    ----------
    sdata
        SpatialData (or the table itself).
    key
        Cache key returned by :func:`image_features`; default: the newest.
    table_key
        Table holding the cache.

    Returns
    -------
    ``{level: (n_nodes, dim) float32}``.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.her2st()
    >>> sg.pp.image_features(sdata)
    >>> feats = sg.pp.get_features(sdata)
    """
    table = _table(sdata, table_key)
    root = table.uns.get(Keys.UNS, {})
    store = root.get(Keys.FEATURES, {})
    if not store:
        raise KeyError(f"table {table_key!r} has no image features; run sigmma_sc.pp.image_features(sdata) first.")
    if key is None:
        key = root.get(Keys.FEATURES_LATEST)
        if key not in store:
            key = list(store)[-1]
    if key not in store:
        raise KeyError(f"no image features under key {key!r}; cached keys: {list(store)}.")
    return {lv: np.asarray(f, dtype=np.float32) for lv, f in store[key].items()}


def feature_scaling(train: np.ndarray, *, std_floor: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
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
    train = np.asarray(train, dtype=np.float64)
    mu = train.mean(axis=0)
    sd = train.std(axis=0)
    positive = sd[sd > 0]
    floor = std_floor * float(np.median(positive)) if positive.size else 1.0
    return mu, np.maximum(sd, max(floor, 1e-12))


def apply_feature_scaling(
    x: np.ndarray, mean: np.ndarray, std: np.ndarray, *, clip: float | None = Defaults.FEATURE_Z_CLIP
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

    Returns
    -------
    ``(m, d)`` float32.

    Examples
    --------
    >>> import numpy as np
    >>> apply_feature_scaling(np.array([[3.0, 100.0]]), np.zeros(2), np.ones(2)).tolist()
    [[3.0, 5.0]]
    """
    z = (np.asarray(x, dtype=np.float64) - mean) / std
    if clip is not None:
        z = np.clip(z, -clip, clip)
    return z.astype(np.float32)


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

    Parameters
    ----------
    x
        ``(n, d)`` features.
    section
        ``(n,)`` section code of each row.
    fallback
        ``(mean, std)`` for small sections.
    min_nodes
        Smallest section standardised on its own.
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
    section = np.asarray(section).reshape(-1)
    if len(section) != len(x):
        raise ValueError(f"section has {len(section)} codes for {len(x)} feature rows.")
    out = np.empty(np.shape(x), dtype=np.float32)
    small = []
    for code in np.unique(section):
        rows = section == code
        if rows.sum() >= min_nodes:
            mu, sd = feature_scaling(x[rows])
        else:
            mu, sd = fallback
            small.append(int(code))
        out[rows] = apply_feature_scaling(x[rows], mu, sd, clip=clip)
    return out, small


def standardize_features(
    train: np.ndarray, *others: np.ndarray, clip: float | None = Defaults.FEATURE_Z_CLIP, std_floor: float = 0.1
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
