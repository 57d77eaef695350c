"""Pooling a dense feature map under node windows: pure numpy / scipy, no encoder and no image.

The dense path of :mod:`sigmma_sc.pp._features` encodes each section image into a stride-32 map,
tile by tile; these functions say which map cells a set of node windows needs, which tiles hold
them, and pool each tile into every window it overlaps as it arrives (area-weighted mean, exact for
fractional windows), so no whole-section map is ever held.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import sparse

from sigmma_sc._constants import Defaults

from ._encoders import DENSE_STRIDE


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


def _axis_weights(a0: np.ndarray, a1: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells ``[lo, hi)`` of one axis under each window ``[a0, a1)``: local indices and overlap / window length.

    Returns ``(n, span)`` local cell indices (clamped into the range; their weight is then 0) and weights.
    """
    start = np.maximum(np.floor(a0).astype(np.int64), lo)
    count = np.minimum(np.ceil(a1).astype(np.int64), hi) - start
    span = max(int(count.max(initial=0)), 1)
    idx = start[:, None] + np.arange(span)
    w = np.clip(np.minimum(a1[:, None], idx + 1) - np.maximum(a0[:, None], idx), 0, None)
    w[idx >= hi] = 0
    return np.minimum(idx, hi - 1) - lo, w / (a1 - a0)[:, None]


class TilePooler:
    """Area-weighted means of a dense map under node windows, accumulated as the map arrives tile by tile.

    The dense path never holds a section's whole feature map: each encoded tile is pooled into the
    windows it overlaps and dropped. A window's mean is the sum over map cells of the cell's value
    times the fraction of the window it covers (exact for fractional windows), so a window spread
    over several tiles gets each tile's share. Memory: the per-node outputs plus, per tile, a sparse
    operator of the windows touching it.

    Parameters
    ----------
    windows
        ``{name: (row0, row1, col0, col1)}`` window arrays in map cells (from :func:`window_cells`);
        windows sticking out of the map are clipped to it, windows entirely off it read their
        nearest cell.
    grid
        ``(gh, gw)`` cells of the map.
    tile_cells
        Side of the tile blocks in cells: every tile given to :meth:`add` lies inside one block
        ``[i * tile_cells, (i + 1) * tile_cells) x [j * tile_cells, (j + 1) * tile_cells)`` (as
        :func:`tile_rects` cuts them).
    dim
        Channels of the map.

    Examples
    --------
    >>> import numpy as np
    >>> fmap = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    >>> pooler = TilePooler({"a": (np.array([0.0]), np.array([2.0]), np.array([1.0]), np.array([3.0]))}, (4, 4), 2, 1)
    >>> for a0, b0 in [(0, 0), (0, 2), (2, 0), (2, 2)]:  # four 2 x 2 tiles
    ...     pooler.add((a0, a0 + 2, b0, b0 + 2), fmap[a0 : a0 + 2, b0 : b0 + 2])
    >>> pooler.result()["a"]  # mean of cells (0..1, 1..2): 1, 2, 5, 6
    array([[3.5]], dtype=float32)
    """

    def __init__(
        self,
        windows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
        grid: tuple[int, int],
        tile_cells: int,
        dim: int,
    ) -> None:
        self.grid = (int(grid[0]), int(grid[1]))
        self.tile_cells = int(tile_cells)
        self.dim = int(dim)
        self._blocks_wide = -(-self.grid[1] // self.tile_cells)
        self._windows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._nodes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._out: dict[str, np.ndarray] = {}
        for name, win in windows.items():
            w = _clip_windows(*(np.asarray(a, dtype=np.float64) for a in win), self.grid)
            self._windows[name] = w
            self._nodes[name] = self._bucket(*w)
            self._out[name] = np.zeros((len(w[0]), self.dim), dtype=np.float32)

    def _bucket(self, v0: np.ndarray, v1: np.ndarray, u0: np.ndarray, u1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(block keys, nodes)`` sorted by key: one entry per (node, tile block) its window touches."""
        c = self.tile_cells
        r0, c0 = np.floor(v0).astype(np.int64), np.floor(u0).astype(np.int64)
        r1 = np.maximum(np.ceil(v1).astype(np.int64), r0 + 1)
        c1 = np.maximum(np.ceil(u1).astype(np.int64), c0 + 1)
        bi0, bj0 = r0 // c, c0 // c
        nbx = (c1 - 1) // c - bj0 + 1
        count = ((r1 - 1) // c - bi0 + 1) * nbx
        node = np.repeat(np.arange(len(v0), dtype=np.int64), count)
        k = np.arange(len(node), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
        nbx = np.repeat(nbx, count)
        key = (np.repeat(bi0, count) + k // nbx) * self._blocks_wide + np.repeat(bj0, count) + k % nbx
        order = np.argsort(key, kind="stable")
        return key[order], node[order]

    def add(self, rect: tuple[int, int, int, int], block: np.ndarray) -> None:
        """Pool one tile: ``block`` is the ``(a1 - a0, b1 - b0, dim)`` map over cells ``rect = (a0, a1, b0, b1)``."""
        a0, a1, b0, b1 = (int(x) for x in rect)
        h, w = a1 - a0, b1 - b0
        if block.shape != (h, w, self.dim):
            raise ValueError(f"tile {rect} needs a ({h}, {w}, {self.dim}) block, got {block.shape}.")
        key = (a0 // self.tile_cells) * self._blocks_wide + b0 // self.tile_cells
        flat = None
        for name, (keys, nodes) in self._nodes.items():
            lo, hi = np.searchsorted(keys, [key, key + 1])
            if lo == hi:
                continue
            if flat is None:
                flat = np.ascontiguousarray(block, dtype=np.float32).reshape(h * w, self.dim)
            idx = nodes[lo:hi]
            v0, v1, u0, u1 = (a[idx] for a in self._windows[name])
            ry, wy = _axis_weights(v0, v1, a0, a1)
            cx, wx = _axis_weights(u0, u1, b0, b1)
            n = len(idx)
            cols = (ry[:, :, None] * w + cx[:, None, :]).reshape(n, -1)
            vals = (wy[:, :, None] * wx[:, None, :]).reshape(n, -1).astype(np.float32)
            rows = np.repeat(np.arange(n), cols.shape[1])
            op = sparse.csr_matrix((vals.ravel(), (rows, cols.ravel())), shape=(n, h * w))
            self._out[name][idx] += op @ flat

    def result(self) -> dict[str, np.ndarray]:
        """``{name: (n, dim) float32}`` means; cells never added count as zeros."""
        return self._out


def pool_windows(fmap: np.ndarray, windows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Mean of a whole feature map over each window (area-weighted, exact for fractional windows).

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
    pooler = TilePooler({"": windows}, (gh, gw), max(gh, gw, 1), dim)
    pooler.add((0, gh, 0, gw), fmap)
    return pooler.result()[""]
