"""Image features of every hierarchy node, computed once per image and cached in the table.

Dense path (default for CNN encoders): the encoder's stride-32 feature map is computed once per
section image, in tiles with a context margin that is cropped off the map (no seams), at native
resolution and 2x downsampled; each node's feature is the mean of the map over its field of view,
read from a summed-area table in O(1) per node. The cost grows with tissue area, not with
nodes x levels. Crop path: one encoder call per node view (fixed-size crops, for transformers).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from sigmma_sc._constants import Choices, Defaults, Keys
from sigmma_sc._logging import logger
from sigmma_sc._settings import settings
from sigmma_sc._utils import release_memory, torch_device
from sigmma_sc.io import get_table

from ._encoders import DENSE_STRIDE, Encoder, get_encoder
from ._feature_cache import SectionFeatureCache
from ._hierarchy import ensure_hierarchy, get_hierarchy
from ._patches import as_section_image, iter_crops
from ._pooling import TilePooler, map_grid_shape, needed_cells, tile_rects, window_cells
from ._stain import StainNormalizer, fit_stain_normalizer, stain_target_id
from ._workcopy import light_copy, write_back

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

# A tile whose core has less than this fraction of coloured or dark pixels is glass.
_MIN_TISSUE_FRACTION = 0.002


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


def _check_dense(encoder: Encoder, tile_px: int, margin_px: int) -> None:
    if not encoder.dense:
        raise ValueError(f"encoder {encoder.id!r} has no stride-32 feature map; use method='crop'.")
    if tile_px % DENSE_STRIDE or margin_px % DENSE_STRIDE or tile_px <= 0 or margin_px < 0:
        raise ValueError(f"tile_px ({tile_px}) and margin_px ({margin_px}) must be non-negative multiples of 32.")


def dense_tiles(
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
) -> Iterator[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Stream the encoder's stride-32 feature map of a section image, one tile at a time.

    Tiles are read lazily from the image (the pyramid level of the scale when there is one),
    encoded ``tiles_per_batch`` at a time and yielded as soon as their batch is done, so memory is
    bounded by the batch of tiles, never by the image.

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
        to them and tiles without any are skipped. Default: every cell.
    tile_px, margin_px
        Tile core and context margin in pixels (multiples of 32); the encoder sees
        ``tile_px + 2 * margin_px`` pixels and the margin's map cells are dropped, so neighbouring
        tiles join without seams as long as the margin covers the receptive field that matters.
    tiles_per_batch
        Tiles per forward pass (the encoder's activations for this many tiles are the peak memory).
    stain
        Fitted stain normaliser applied to each tile before encoding.
    px_from_um
        Microns -> pixels affine when ``image`` is an array.

    Yields
    ------
    ``(rect, block)``: ``rect = (a0, a1, b0, b1)`` map cells (see :func:`sigmma_sc.pp._pooling.tile_rects`)
    and the ``(a1 - a0, b1 - b0, dim)`` float32 map over them; cell ``(i, j)`` covers full-resolution
    pixels ``[32 s i, 32 s (i + 1)) x [32 s j, 32 s (j + 1))`` for ``s = scale``. Tiles with no tissue
    get the map of a blank (white) tile (a read-only broadcast view).

    Examples
    --------
    >>> import numpy as np
    >>> import sigmma_sc as sg
    >>> enc = sg.pp.get_encoder("efficientnet_lite0", device="cpu")
    >>> tiles = dense_tiles(np.full((100, 70, 3), 255, np.uint8), enc, px_from_um=np.eye(3), tile_px=64, margin_px=32)
    >>> [(rect, block.shape) for rect, block in tiles]
    [((0, 2, 0, 2), (2, 2, 1280)), ((0, 2, 2, 3), (2, 1, 1280)), ((2, 4, 0, 2), (2, 2, 1280)), ((2, 4, 2, 3), (2, 1, 1280))]
    """
    _check_dense(encoder, tile_px, margin_px)
    image = as_section_image(image, px_from_um)
    if needed is None:
        needed = np.ones(map_grid_shape(image.shape, scale), dtype=bool)
    mcells = margin_px // DENSE_STRIDE
    blank: np.ndarray | None = None
    # Tiles trimmed at the tissue edge have other shapes: a batch stacks tiles of one shape.
    groups: dict[tuple[int, int], list[tuple[tuple[int, int, int, int], np.ndarray]]] = {}

    def flush(shape: tuple[int, int]) -> Iterator[tuple[tuple[int, int, int, int], np.ndarray]]:
        items = groups.pop(shape, [])
        if items:
            maps = encoder.encode_map(np.stack([rgb for _, rgb in items]))
            release_memory()
            for (a0, a1, b0, b1), m in zip((rect for rect, _ in items), maps):
                yield (a0, a1, b0, b1), m[mcells : mcells + a1 - a0, mcells : mcells + b1 - b0]

    rects = tile_rects(needed, tile_px)
    for a0, a1, b0, b1 in _progress(rects, desc=f"dense features x{scale}", unit="tile", leave=False):
        r0, c0 = a0 * DENSE_STRIDE - margin_px, b0 * DENSE_STRIDE - margin_px
        r1, c1 = a1 * DENSE_STRIDE + margin_px, b1 * DENSE_STRIDE + margin_px
        rgb = _read_scaled(image, scale, r0, r1, c0, c1)
        if not _is_tissue(rgb[margin_px : -margin_px or None, margin_px : -margin_px or None]):
            if blank is None:
                side = tile_px + 2 * margin_px
                white = encoder.encode_map(np.full((1, side, side, 3), 255, dtype=np.uint8))[0]
                blank = white[white.shape[0] // 2, white.shape[1] // 2]
            yield (a0, a1, b0, b1), np.broadcast_to(blank, (a1 - a0, b1 - b0, blank.shape[0]))
            continue
        if stain is not None:
            rgb = stain.transform(rgb)
        shape = rgb.shape[:2]
        groups.setdefault(shape, []).append(((a0, a1, b0, b1), rgb))
        if len(groups[shape]) >= tiles_per_batch:
            yield from flush(shape)
    for shape in list(groups):
        yield from flush(shape)


def dense_feature_map(image: Any, encoder: Encoder, *, scale: int = 1, **kwargs: Any) -> np.ndarray:
    """Assemble the whole stride-32 feature map of an image from :func:`dense_tiles` (small images, inspection).

    Memory grows with the image (``gh x gw x dim`` float32); :func:`section_features` pools the
    tiles as they come instead and never holds this map.

    Parameters
    ----------
    image, encoder, scale
        As in :func:`dense_tiles`.
    **kwargs
        Further options of :func:`dense_tiles` (``needed``, ``tile_px``, ``margin_px``, ...).

    Returns
    -------
    ``(gh, gw, dim)`` float32 map; cells of no tile (outside ``needed``) are zero.

    Examples
    --------
    >>> import numpy as np
    >>> import sigmma_sc as sg
    >>> enc = sg.pp.get_encoder("efficientnet_lite0", device="cpu")
    >>> fmap = dense_feature_map(np.full((100, 70, 3), 255, np.uint8), enc, px_from_um=np.eye(3), tile_px=64, margin_px=32)
    >>> fmap.shape
    (4, 3, 1280)
    """
    _check_dense(
        encoder, kwargs.get("tile_px", Defaults.DENSE_TILE_PX), kwargs.get("margin_px", Defaults.DENSE_MARGIN_PX)
    )
    shape = as_section_image(image, kwargs.get("px_from_um")).shape
    fmap = np.zeros((*map_grid_shape(shape, scale), encoder.dim), dtype=np.float32)
    for (a0, a1, b0, b1), block in dense_tiles(image, encoder, scale=scale, **kwargs):
        fmap[a0:a1, b0:b1] = block
    return fmap


def _tiles_per_batch(enc: Encoder, batch_size: int) -> int:
    # Measured with EfficientNet-Lite0 on 1,536 px tiles: on a CPU one tile per forward pass is the
    # fastest (1.1 s per tile against 1.4 s with four) and needs 0.7 GB of activations instead of
    # 2.3 GB; an accelerator wants the batch.
    return 1 if enc.device == "cpu" else max(1, batch_size // 16)


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
        Crops per forward pass (dense, on an accelerator: ``batch_size // 16`` tiles; on a CPU one tile).
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
        out.update({lv: np.zeros((0, enc.dim), np.float32) for lv in levels if lv not in windows})
        if not windows:
            continue
        pooler = TilePooler(windows, grid, tile_px // DENSE_STRIDE, enc.dim)
        tiles = dense_tiles(
            image,
            enc,
            scale=scale,
            needed=needed_cells(list(windows.values()), grid),
            tile_px=tile_px,
            margin_px=margin_px,
            tiles_per_batch=_tiles_per_batch(enc, batch_size),
            stain=stain,
        )
        for rect, block in tiles:
            pooler.add(rect, block)
        out.update(pooler.result())
    return out


def _resolve_method(method: str, enc: Encoder) -> str:
    if method not in Choices.FEATURE_METHODS:
        raise ValueError(f"method must be one of {Choices.FEATURE_METHODS}, got {method!r}.")
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
@dataclass(frozen=True)
class FeatureKey:
    """Address of one cached feature set: encoder, method, every level's view and the stain normalisation.

    Two feature sets with the same :attr:`views` describe the same image windows (only the encoder
    may differ); :attr:`id` is the string under which the table stores the set.

    Examples
    --------
    >>> key = FeatureKey("efficientnet_lite0", "dense", (("meso", 150.0), ("macro", 500.0)))
    >>> key.id
    'efficientnet_lite0__dense__meso150_macro500__raw'
    >>> FeatureKey.parse(key.id) == key
    True
    """

    encoder: str
    method: str
    fov_um: tuple[tuple[str, float], ...]
    stain: str | None = None

    @property
    def id(self) -> str:
        """The cache id, ``"{encoder}__{method}__{level}{fov}_..__{stain or 'raw'}"``."""
        fovs = "_".join(f"{lv}{float(f):g}" for lv, f in self.fov_um)
        return f"{self.encoder}__{self.method}__{fovs}__{self.stain or 'raw'}".replace("/", "_")

    @property
    def views(self) -> tuple[str, tuple[tuple[str, float], ...], str | None]:
        """What the features look at, without the encoder: method, fields of view, stain."""
        return self.method, self.fov_um, self.stain

    def __str__(self) -> str:
        return self.id

    @classmethod
    def parse(cls, key: str | FeatureKey) -> FeatureKey:
        """Read a cache id back (ids stored by models and tables before keys were typed)."""
        if isinstance(key, FeatureKey):
            return key
        parts = str(key).split("__")
        if len(parts) != 4:
            raise ValueError(f"{key!r} is not a feature cache id ('encoder__method__views__stain').")
        encoder, method, views, stain = parts
        fovs = tuple((m[1], float(m[2])) for m in re.finditer(r"([a-z]+)([0-9.]+(?:e[+-]?[0-9]+)?)", views))
        return cls(encoder, method, fovs, None if stain == "raw" else stain)


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
) -> FeatureKey:
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
        Crops per forward pass (the dense path runs ``batch_size // 16`` tiles of 1,536 px on an accelerator, one on a CPU).
    device
        ``"auto"`` (the first CUDA device when torch sees one), ``"cpu"``, ``"gpu"`` / ``"cuda"``
        or ``"cuda:<index>"``; the rule of ``tl.fit(accelerator=...)``. A GPU that torch does not
        see fails at once, before the hierarchy is built.
    downsample
        Dense path only: compute the maps on the image downsampled this many times (see
        :func:`section_features`); part of the cache key.
    overwrite
        Recompute even when cached.

    Returns
    -------
    The :class:`FeatureKey`: features are in ``table.uns["sigmma"]["features"][key.id][level]``, ``(n_nodes,
    dim)`` float32 aligned with the hierarchy's nodes. The hierarchy is built when missing.

    Examples
    --------
    On the five her2st sections (minutes on a CPU):

    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.her2st()  # doctest: +SKIP
    >>> key = sg.pp.image_features(sdata)  # doctest: +SKIP

    On 100 synthetic cells (seconds):

    >>> sdata = sg.datasets.synthetic(100, n_genes=20, seed=0)
    >>> key = sg.pp.image_features(sdata)
    >>> key.id
    'efficientnet_lite0__dense__micro32_meso150_macro500__raw'
    >>> feats = sg.pp.get_features(sdata, key=key)
    >>> {level: f.shape for level, f in feats.items()}  # cells, niches, regions
    {'micro': (100, 1280), 'meso': (4, 1280), 'macro': (4, 1280)}
    """
    enc = get_encoder(encoder, obsm_key=obsm_key)
    # The options first: a bad one fails before ensure_hierarchy builds (and writes) a hierarchy.
    if enc.precomputed:
        method_used, stain_id = "precomputed", None
    else:
        method_used = _resolve_method(method, enc)
        stain_id = None
        if stain_normalize is not None:
            if stain_normalize not in Choices.STAIN_METHODS:
                raise ValueError(
                    f"stain_normalize must be None or one of {Choices.STAIN_METHODS}, got {stain_normalize!r}."
                )
            stain_id = f"{stain_normalize}-{stain_target_id(stain_normalize, stain_reference)}"
    if method_used == "dense" and downsample != 1:
        method_used = f"dense{int(downsample)}x"
    device = torch_device(device)  # an absent GPU fails here, before the hierarchy is built
    work, slide, hier, levels = features_target(
        sdata, table_key=table_key, levels=levels, require_image=not enc.precomputed
    )
    table = slide.table
    fovs = {lv: float(hier.levels[lv].fov_um) for lv in hier.levels}
    key = FeatureKey(enc.id, method_used, tuple(fovs.items()), stain_id)
    todo = missing_levels(table, key, hier, levels, overwrite=overwrite)
    if not todo:
        logger.info(f"image features {key.id!r} found in the table cache")
        commit_features(work, sdata, key, {}, table_key=table_key)
        return key
    disk = SectionFeatureCache(key.id, batch_size=int(batch_size), downsample=int(downsample))

    if enc.precomputed:
        new = _precomputed_levels(table, hier, enc.obsm_key, todo)
    else:
        enc.to(device)
        new = {lv: np.zeros((len(hier.levels[lv].centers_um), enc.dim), np.float32) for lv in todo}
        for code, section in enumerate(_progress(slide.sections, desc="image features", unit="section")):
            image = slide.images[section]
            rows = {lv: np.flatnonzero(np.asarray(hier.levels[lv].section) == code) for lv in todo}
            centers = {lv: hier.levels[lv].centers_um[r] for lv, r in rows.items()}
            feats = disk.load(image, centers, fovs)
            if feats is None:
                stain = None
                if stain_normalize is not None:
                    thumb = image.level_array(image.best_level(image.um_per_px * 4))
                    stain = fit_stain_normalizer(thumb, method=stain_normalize, reference=stain_reference)
                feats = section_features(
                    image,
                    centers,
                    {lv: fovs[lv] for lv in todo},
                    encoder=enc,
                    method="dense" if method_used.startswith("dense") else method_used,
                    stain=stain,
                    batch_size=batch_size,
                    downsample=downsample,
                )
                disk.store(feats)
            for lv, r in rows.items():
                new[lv][r] = feats[lv]
    bad = [lv for lv, f in new.items() if not np.all(np.isfinite(f))]
    if bad:
        raise FloatingPointError(f"non-finite image features at levels {bad} with encoder {enc.id!r}.")
    commit_features(work, sdata, key, new, table_key=table_key)
    disk.clear()
    return key


def features_target(
    sdata: SpatialData, *, table_key: str, levels: Sequence[str] | None, require_image: bool
) -> tuple[SpatialData, Any, Any, list[str]]:
    """``(work, slide, hierarchy, levels)`` of a feature computation, the requested levels checked.

    Without a usable hierarchy, it is built on a :func:`light_copy` (``work``): an error or an
    interrupt before :func:`commit_features` leaves ``sdata`` as it was. ``levels=None``: all.
    """
    try:
        get_hierarchy(sdata, table_key=table_key)
        work = sdata
    except (KeyError, ValueError):
        work = light_copy(sdata, table_key=table_key)
    slide, hier = ensure_hierarchy(work, table_key=table_key, require_image=require_image)
    names = list(hier.levels)
    levels = names if levels is None else list(levels)
    unknown = [lv for lv in levels if lv not in hier.levels]
    if unknown:
        raise ValueError(f"levels {unknown} are not in the hierarchy; it has {names}.")
    return work, slide, hier, levels


def missing_levels(table: AnnData, key: FeatureKey, hier: Any, levels: Sequence[str], *, overwrite: bool) -> list[str]:
    """Levels whose features under ``key`` are not cached in ``table`` for every node (all with ``overwrite``)."""
    cache = table.uns.get(Keys.UNS, {}).get(Keys.FEATURES, {}).get(key.id, {})
    n = {lv: len(hier.levels[lv].centers_um) for lv in levels}
    return [lv for lv in levels if overwrite or lv not in cache or np.shape(cache[lv])[0] != n[lv]]


def commit_features(
    work: SpatialData, sdata: SpatialData, key: FeatureKey, new: dict[str, np.ndarray], *, table_key: str
) -> None:
    """Write the new features (and, from a working copy, the hierarchy built for them) into ``sdata``, at the end."""
    if work is not sdata:
        write_back(work, sdata, table_key=table_key, before=sdata)
    _write_features(get_table(sdata, table_key), key, new)


def _write_features(table: AnnData, key: FeatureKey | str, new: dict[str, np.ndarray]) -> None:
    key = FeatureKey.parse(key)
    root = table.uns.setdefault(Keys.UNS, {})
    store = root.setdefault(Keys.FEATURES, {})
    entry = dict(store.get(key.id, {}))
    entry.update({lv: np.ascontiguousarray(f, dtype=np.float32) for lv, f in new.items()})
    store[key.id] = entry
    root[Keys.FEATURES_LATEST] = key.id


def get_features(
    sdata: SpatialData | AnnData, *, key: FeatureKey | str | None = None, table_key: str = Keys.TABLE
) -> dict[str, np.ndarray]:
    """Return the cached image features per level.

    Parameters
    ----------
    sdata
        SpatialData (or the table itself).
    key
        :class:`FeatureKey` returned by :func:`image_features` (or its ``id``); default: the newest.
    table_key
        Table holding the cache.

    Returns
    -------
    ``{level: (n_nodes, dim) float32}``.

    Examples
    --------
    ``train`` holds the features computed for ``model`` (200 synthetic cells, see
    :class:`sigmma_sc.Sigmma`):

    >>> import sigmma_sc as sg
    >>> feats = sg.pp.get_features(train, key=model.feature_key)
    >>> {level: f.shape for level, f in feats.items()}
    {'micro': (200, 1280), 'meso': (9, 1280), 'macro': (9, 1280)}
    """
    table = get_table(sdata, table_key)
    root = table.uns.get(Keys.UNS, {})
    store = root.get(Keys.FEATURES, {})
    if not store:
        raise KeyError(f"table {table_key!r} has no image features; run sigmma_sc.pp.image_features(sdata) first.")
    if key is not None:
        key = key.id if isinstance(key, FeatureKey) else str(key)
    else:
        key = root.get(Keys.FEATURES_LATEST)
        if key not in store:
            key = list(store)[-1]
    if key not in store:
        raise KeyError(f"no image features under key {key!r}; cached keys: {list(store)}.")
    return {lv: np.asarray(f, dtype=np.float32) for lv, f in store[key].items()}
