"""Image views of hierarchy nodes: micron -> pixel arithmetic and crops cut by array slicing.

A crop is cut from the pyramid level whose pixels are closest to (not coarser than) what the
output size needs, by slicing the level array around the node's pixel centre; no per-node spatial
query. Everything here works on a *section image*: either :class:`sigmma_sc.io.SectionImage` or
any ``(height, width, 3)`` array (numpy or dask) with its microns -> pixels affine, wrapped in one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sigmma_sc._constants import Defaults, Keys, Levels
from sigmma_sc.io import SectionImage

from ._hierarchy import ensure_hierarchy

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData


def as_section_image(image: Any, px_from_um: np.ndarray | None = None) -> SectionImage:
    """Return ``image`` when it is a :class:`sigmma_sc.io.SectionImage`, else wrap an RGB array in one.

    Parameters
    ----------
    image
        A section image, or a ``(height, width, 3)`` array (numpy or dask, read window by window).
    px_from_um
        ``3 x 3`` affine, ``[col, row, 1] = px_from_um @ [x_um, y_um, 1]``, for arrays.

    Returns
    -------
    ``image`` itself, or a :class:`sigmma_sc.io.SectionImage` over the array (no copy).

    Examples
    --------
    >>> import numpy as np
    >>> as_section_image(np.zeros((4, 6, 3), np.uint8), np.eye(3)).shape
    (4, 6)
    """
    if hasattr(image, "read") and hasattr(image, "px_from_um"):
        return image
    if px_from_um is None:
        raise ValueError("an image array needs px_from_um, the 3 x 3 microns -> pixels affine.")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image array must be (height, width, 3) RGB, got shape {tuple(image.shape)}.")
    import xarray as xr

    element = xr.DataArray(image, dims=("y", "x", "c"))
    return SectionImage.from_element(
        element, section="", name="image", coordinate_system="", px_from_um=np.asarray(px_from_um, dtype=np.float64)
    )


def crop_geometry(image: Any, centers_um: np.ndarray, fov_um: float, size_px: int) -> tuple[int, int, np.ndarray]:
    """Where to cut square views of side ``fov_um`` around ``centers_um``.

    Parameters
    ----------
    image
        A section image (see :func:`as_section_image`).
    centers_um
        ``(n, 2)`` node centres ``(x, y)`` in microns.
    fov_um
        View side in microns.
    size_px
        Output side; the pyramid level is the coarsest one still at least this fine.

    Returns
    -------
    ``(level, side, corners)``: pyramid level, crop side in that level's pixels and ``(n, 2)`` int
    ``(row0, col0)`` of each crop, chosen so the crop is centred on the node within half a pixel.

    Examples
    --------
    >>> import numpy as np
    >>> img = as_section_image(np.zeros((100, 100, 3), np.uint8), np.eye(3))
    >>> crop_geometry(img, np.array([[50.0, 20.0]]), 10.0, 10)
    (0, 10, array([[15, 45]]))
    """
    level = int(image.best_level(fov_um / size_px))
    factor = float(image.level_factors[level])
    side = max(1, int(round(fov_um / (image.um_per_px * factor))))
    colrow = image.um_to_px(centers_um, level=level)
    # Centre of pixel span [r0, r0 + side) is r0 + side / 2: pick r0 so it lands on the node.
    row0 = np.floor(colrow[:, 1] - side / 2.0 + 0.5).astype(np.int64)
    col0 = np.floor(colrow[:, 0] - side / 2.0 + 0.5).astype(np.int64)
    return level, side, np.stack([row0, col0], axis=1)


def resize_batch(crops: np.ndarray, size_px: int) -> np.ndarray:
    """Resize ``(n, s, s, 3)`` uint8 crops to ``size_px`` (antialiased bilinear).

    Examples
    --------
    >>> import numpy as np
    >>> resize_batch(np.zeros((2, 50, 50, 3), np.uint8), 20).shape
    (2, 20, 20, 3)
    """
    if crops.shape[1] == size_px and crops.shape[2] == size_px:
        return crops
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(crops, copy=True)).permute(0, 3, 1, 2).float()
    antialias = crops.shape[1] > size_px
    y = F.interpolate(x, size=(size_px, size_px), mode="bilinear", align_corners=False, antialias=antialias)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def iter_crops(
    image: Any,
    centers_um: np.ndarray,
    fov_um: float,
    *,
    size_px: int = 224,
    batch_size: int = Defaults.BATCH_SIZE,
    px_from_um: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream square views around nodes in batches, padded white at image borders.

    Parameters
    ----------
    image
        :class:`sigmma_sc.io.SectionImage` or a ``(height, width, 3)`` array (with ``px_from_um``);
        dask arrays are read one window at a time, so the image never has to fit in memory.
    centers_um
        ``(n, 2)`` node centres ``(x, y)`` in microns.
    fov_um
        View side in microns.
    size_px
        Output side in pixels.
    batch_size
        Crops per yielded batch.
    px_from_um
        Microns -> pixels affine when ``image`` is an array.

    Yields
    ------
    ``(index, crops)``: positions into ``centers_um`` and ``(b, size_px, size_px, 3)`` uint8 crops.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.full((100, 100, 3), 200, np.uint8)
    >>> idx, crops = next(iter_crops(img, np.array([[0.0, 0.0]]), 20.0, size_px=8, px_from_um=np.eye(3)))
    >>> crops.shape, int(crops[0, 0, 0, 0]), int(crops[0, -1, -1, 0])
    ((1, 8, 8, 3), 255, 200)
    """
    image = as_section_image(image, px_from_um)
    centers_um = np.asarray(centers_um, dtype=np.float64).reshape(-1, 2)
    level, side, corners = crop_geometry(image, centers_um, fov_um, size_px)
    for start in range(0, len(corners), batch_size):
        idx = np.arange(start, min(start + batch_size, len(corners)))
        crops = np.stack([image.read(r, r + side, c, c + side, level=level) for r, c in corners[idx]])
        yield idx, resize_batch(crops, size_px)


def extract_patches(
    sdata: SpatialData,
    *,
    level: str = Levels.MESO,
    size_px: int = 224,
    indices: Sequence[int] | np.ndarray | None = None,
    fov_um: float | None = None,
    table_key: str = Keys.TABLE,
    batch_size: int = Defaults.BATCH_SIZE,
) -> np.ndarray:
    """Image views of the nodes of one hierarchy level, centred on each node.

    Parameters
    ----------
    sdata
        SpatialData with an H&E image per section (see :func:`sigmma_sc.io.validate`).
    level
        Hierarchy level (``"micro"``, ``"meso"``, ``"macro"``); the hierarchy is built when missing.
    size_px
        Output side in pixels (the encoder input, 224 by default).
    indices
        Node indices at that level (default: all; mind memory, 150 kB per 224 px crop).
    fov_um
        View side in microns (default: the level's ``fov_um``).
    table_key
        Table annotating the units.
    batch_size
        Crops read per batch.

    Returns
    -------
    ``(n, size_px, size_px, 3)`` uint8 RGB, padded white outside the image.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.visium_mouse_brain()
    >>> crops = sg.pp.extract_patches(sdata, level="meso", indices=[0, 1, 2])
    >>> crops.shape
    (3, 224, 224, 3)
    """
    slide, hier = ensure_hierarchy(sdata, table_key=table_key)
    if level not in hier.levels:
        raise ValueError(f"level {level!r} is not in the hierarchy; it has {list(hier.levels)}.")
    lvl = hier.levels[level]
    n = len(lvl.centers_um)
    idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"indices must lie in [0, {n}) for level {level!r}.")
    idx = idx % max(n, 1)
    fov = float(lvl.fov_um if fov_um is None else fov_um)
    out = np.empty((len(idx), size_px, size_px, 3), dtype=np.uint8)
    sec = np.asarray(lvl.section)[idx]
    for code, name in enumerate(slide.sections):
        rows = np.flatnonzero(sec == code)
        if rows.size == 0:
            continue
        image = slide.images[name]
        for pos, crops in iter_crops(image, lvl.centers_um[idx[rows]], fov, size_px=size_px, batch_size=batch_size):
            out[rows[pos]] = crops
    return out
