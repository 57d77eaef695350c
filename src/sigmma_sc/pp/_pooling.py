"""Pooling a dense feature map under node windows: pure numpy / scipy, no encoder and no image.

The dense path of :mod:`sigmma_sc.pp._features` encodes each section image into a stride-32 map;
these functions say which map cells a set of node windows needs, which tiles hold them, and pool
the map under every window (area-weighted mean, exact for fractional windows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import sparse

from sigmma_sc._constants import Defaults

from ._encoders import DENSE_STRIDE

# Channel block of the summed-area table (float64): bounds its memory on large sections.
_SAT_CHANNELS = 256


def map_grid_shape(shape: tuple[int, int], scale: int) -> tuple[int, int]:
    """Cells of the stride-32 map of an image of full-resolution ``shape`` downsampled ``scale`` times.

    Examples
    --------
    >>> map_grid_shape((1000, 640), 2)  # 500 x 320 px
    (16, 10)
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
