"""Fine bins (Visium HD 2 µm) aggregated into cells by nuclei segmented in the H&E.

bin2cell does this with StarDist labels, whose weights are downloaded at run time; here the nuclei
come from the package's own hematoxylin segmentation (:func:`sigmma_sc.pp._nuclei.segment_tile`, or
any label callable, e.g. a StarDist / Cellpose wrapper), read tile by tile so memory grows with the
tile, never with the slide. Each bin joins the nearest nucleus when its centre lies within the
nucleus radius plus ``expand_um`` (the cytoplasm around it); the cell's counts are the sum of its
bins.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import Choices, Defaults, Keys
from .._logging import logger
from .._settings import settings
from ..io import SectionArrays, build_shapes, build_table, validate
from ._nuclei import hematoxylin, label_tile, tissue_threshold

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

# Tiles read to find the section's hematoxylin threshold, spread over the bins.
_THRESHOLD_TILES = 64


def tile_origins(rows: np.ndarray, cols: np.ndarray, tile_px: int) -> np.ndarray:
    """Top-left corners ``(row0, col0)`` of the ``tile_px`` grid tiles that hold at least one of the pixels.

    Examples
    --------
    >>> tile_origins(np.array([5, 5, 130]), np.array([5, 300, 10]), 128).tolist()
    [[0, 0], [0, 256], [128, 0]]
    """
    cells = np.unique(np.stack([rows // tile_px, cols // tile_px], 1), axis=0)
    return (cells * tile_px).astype(np.int64)


def assign_bins(
    bins_xy: np.ndarray, nuclei_xy: np.ndarray, nuclei_radius: np.ndarray, *, expand_um: float
) -> np.ndarray:
    """Nucleus of every bin: the nearest one whose radius plus ``expand_um`` reaches the bin centre, else -1.

    Parameters
    ----------
    bins_xy
        ``(n_bins, 2)`` bin centres, microns.
    nuclei_xy, nuclei_radius
        ``(n_nuclei, 2)`` centroids and ``(n_nuclei,)`` radii, microns.
    expand_um
        How far past the nucleus a bin still belongs to its cell.

    Returns
    -------
    ``(n_bins,)`` int64 nucleus index or -1.

    Examples
    --------
    >>> import numpy as np
    >>> assign_bins(np.array([[0.0, 0.0], [5.0, 0.0], [50.0, 0.0]]), np.array([[1.0, 0.0]]), np.array([3.0]), expand_um=2.0)
    array([ 0,  0, -1])
    """
    from scipy.spatial import cKDTree

    out = np.full(len(bins_xy), -1, np.int64)
    if not len(nuclei_xy) or not len(bins_xy):
        return out
    reach = float(np.max(nuclei_radius)) + expand_um
    dist, idx = cKDTree(nuclei_xy).query(bins_xy, distance_upper_bound=reach)
    found = np.isfinite(dist)
    ok = found.copy()
    ok[found] = dist[found] <= nuclei_radius[idx[found]] + expand_um
    out[ok] = idx[ok]
    return out


def _section_nuclei(
    slide,
    s_idx: int,
    *,
    segmenter: Callable[[np.ndarray], np.ndarray] | None,
    threshold: float | None,
    tile_px: int,
    min_area_um2: float,
    max_area_um2: float,
    min_distance_um: float,
) -> pd.DataFrame:
    from tqdm.auto import tqdm

    section = slide.sections[s_idx]
    img = slide.images[section]
    upp = img.um_per_px
    units = np.flatnonzero(slide.unit_section == s_idx)
    colrow = np.rint(img.um_to_px(slide.xy_um[units])).astype(np.int64)
    margin = int(np.ceil(2 * np.sqrt(max_area_um2 / np.pi) / upp))  # a whole nucleus on the tile seam
    origins = tile_origins(colrow[:, 1], colrow[:, 0], tile_px)

    def read(r0: int, c0: int, size: int, pad: int) -> tuple[np.ndarray, int, int]:
        top, left = max(r0 - pad, 0), max(c0 - pad, 0)
        return img.read(top, r0 + size + pad, left, c0 + size + pad), top, left

    if segmenter is None and threshold is None:
        pick = origins[:: max(1, len(origins) // _THRESHOLD_TILES)]
        sample = [read(int(r), int(c), min(tile_px, 256), 0)[0] for r, c in pick]
        side = min(t.shape[0] for t in sample), min(t.shape[1] for t in sample)
        sample = [t[: side[0], : side[1]] for t in sample]
        threshold = tissue_threshold(np.stack([hematoxylin(t) for t in sample]), np.stack(sample))
    parts = []
    for r0, c0 in tqdm(origins, desc=f"nuclei {section}", disable=not settings.progress_bar, leave=False):
        tile, top, left = read(int(r0), int(c0), tile_px, margin)
        m = label_tile(tile, um_per_px=upp, threshold=threshold, segmenter=segmenter, min_distance_um=min_distance_um)
        row, col = m["row"] + top, m["col"] + left
        # A nucleus belongs to the tile that holds its centroid: those on the margin are another tile's.
        own = (row >= r0) & (row < r0 + tile_px) & (col >= c0) & (col < c0 + tile_px)
        m = {k: v[own] for k, v in m.items()}
        m["row"], m["col"] = row[own], col[own]
        parts.append(m)
    names = ("row", "col", "area_px", "eccentricity", "hematoxylin")
    cat = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in names}
    xy = img.px_to_um(np.stack([cat["col"], cat["row"]], 1)) if len(cat["row"]) else np.zeros((0, 2))
    area = cat["area_px"] * abs(np.linalg.det(img.um_from_px[:2, :2]))
    keep = (area >= min_area_um2) & (area <= max_area_um2)
    return pd.DataFrame(
        {
            "x": xy[keep, 0] if len(xy) else np.zeros(0),
            "y": xy[keep, 1] if len(xy) else np.zeros(0),
            Keys.NUCLEUS_AREA: area[keep].astype(np.float32),
            Keys.NUCLEUS_ECCENTRICITY: cat["eccentricity"][keep].astype(np.float32),
            Keys.NUCLEUS_HEMATOXYLIN: cat["hematoxylin"][keep].astype(np.float32),
        }
    )


def bins_to_cells(
    sdata: SpatialData,
    *,
    table_key: str = Keys.TABLE,
    key_added: str = "cells",
    expand_um: float = Defaults.BIN_EXPAND_UM,
    segmenter: Callable[[np.ndarray], np.ndarray] | None = None,
    threshold: float | None = None,
    tile_px: int = Defaults.DENSE_TILE_PX,
    min_area_um2: float = Defaults.NUCLEUS_MIN_AREA_UM2,
    max_area_um2: float = Defaults.NUCLEUS_MAX_AREA_UM2,
    min_distance_um: float = 3.0,
    min_bins: int = 1,
) -> None:
    """Aggregate fine bins (Visium HD 2 µm) into cells around the nuclei of the H&E.

    Nuclei are segmented in the H&E over the bins (hematoxylin threshold + watershed as in
    :func:`sigmma_sc.pp.segment_nuclei`, or ``segmenter``), tile by tile. Every bin whose centre
    lies within a nucleus radius plus ``expand_um`` of the nearest nucleus centroid joins that
    nucleus' cell; the cell's counts are the sum of its bins' counts, its centre the nucleus
    centroid. Bins reached by no nucleus are left out. The cells become a new table (raw counts,
    unit kind ``"cell"``, technology ``"visium_hd_cells"``) over new circle shapes, on the same
    images, ready for :func:`sigmma_sc.tl.fit` with ``table_key=key_added``, which trains on them
    with the cells' defaults (Delaunay graph, no niche blocks in the embedding, ridge readout), not
    the bins'.

    Parameters
    ----------
    sdata
        Bins with their H&E (one table, units of a few microns).
    table_key
        Table of the bins (raw counts).
    key_added
        Name of the new table; its shapes are ``"{section}_{key_added}"``. Neither may exist.
    expand_um
        Reach of a cell past its nucleus (bin2cell expands labels by about 2 bins = 4 µm).
    segmenter
        Your own nucleus segmentation: an RGB ``uint8`` tile ``(h, w, 3)`` -> integer labels ``(h, w)``.
    threshold
        Fixed hematoxylin optical density cut (default: per-section Otsu over tissue tiles).
    tile_px
        Tile side read at a time (full-resolution pixels); memory follows the tile.
    min_area_um2, max_area_um2
        Accepted nucleus areas in µm².
    min_distance_um
        Closest two nucleus centres may be.
    min_bins
        Cells with fewer bins (or no counts) are dropped.

    Returns
    -------
    ``None``. Adds ``sdata.tables[key_added]`` (``obs``: ``section``, ``n_bins``, ``area_um2``,
    ``eccentricity``, ``hematoxylin``; ``obsm["spatial"]``: nucleus centroids in microns;
    ``layers["counts"]``) and ``sdata.shapes["{section}_{key_added}"]``, after every section is done.

    Examples
    --------
    Synthetic 2 µm bins over synthetic cells (``bins``, built from :func:`sigmma_sc.datasets.synthetic`
    by splitting each cell's counts over the bins under it):

    >>> import sigmma_sc as sg
    >>> sg.pp.bins_to_cells(bins)  # doctest: +SKIP
    >>> cells = bins["cells"]  # doctest: +SKIP
    >>> sg.tl.fit(bins, table_key="cells")  # doctest: +SKIP
    """
    slide = validate(sdata, table_key=table_key, require_counts=True)
    if key_added in sdata.tables:
        raise ValueError(f"sdata.tables already holds {key_added!r}: pass another key_added=.")
    clash = [f"{s}_{key_added}" for s in slide.sections if f"{s}_{key_added}" in sdata.shapes]
    if clash:
        raise ValueError(f"sdata.shapes already holds {clash}: pass another key_added=.")
    missing = [s for s in slide.sections if s not in slide.images]
    if missing:
        raise KeyError(f"section(s) {missing} have no H&E image: nuclei are segmented in it.")
    if not expand_um >= 0:
        raise ValueError(f"expand_um must be >= 0 microns, got {expand_um!r}.")
    if min_area_um2 >= max_area_um2:
        raise ValueError(f"min_area_um2={min_area_um2} must be below max_area_um2={max_area_um2}.")
    if int(tile_px) < 64:
        raise ValueError(f"tile_px must be >= 64 pixels, got {tile_px}.")
    counts = slide.counts()
    genes = list(slide.table.var_names)
    arrays = []
    for s_idx, section in enumerate(slide.sections):
        t0 = time.perf_counter()
        nuclei = _section_nuclei(
            slide,
            s_idx,
            segmenter=segmenter,
            threshold=threshold,
            tile_px=int(tile_px),
            min_area_um2=min_area_um2,
            max_area_um2=max_area_um2,
            min_distance_um=min_distance_um,
        )
        units = np.flatnonzero(slide.unit_section == s_idx)
        radius = np.sqrt(nuclei[Keys.NUCLEUS_AREA].to_numpy(np.float64) / np.pi)
        owner = assign_bins(slide.xy_um[units], nuclei[["x", "y"]].to_numpy(np.float64), radius, expand_um=expand_um)
        hit = owner >= 0
        member = sparse.csr_matrix(
            (np.ones(int(hit.sum())), (owner[hit], units[hit])), shape=(len(nuclei), slide.n_units)
        )
        cell_counts = sparse.csr_matrix(member @ counts)
        n_bins = np.asarray(member.sum(axis=1)).ravel().astype(np.int64)
        keep = (n_bins >= min_bins) & (np.asarray(cell_counts.sum(axis=1)).ravel() > 0)
        kept = nuclei[keep].reset_index(drop=True)
        obs = kept[[Keys.NUCLEUS_AREA, Keys.NUCLEUS_ECCENTRICITY, Keys.NUCLEUS_HEMATOXYLIN]].assign(n_bins=n_bins[keep])
        diameter = float(2 * (np.median(radius[keep]) + expand_um)) if keep.any() else 2 * expand_um
        arrays.append(
            SectionArrays(
                section=section,
                image=None,
                mpp=slide.images[section].um_per_px,
                xy_um=kept[["x", "y"]].to_numpy(np.float64),
                counts=cell_counts[keep],
                genes=genes,
                shape="circle",
                diameter_um=diameter,
                unit="cell",
                obs=obs,
            )
        )
        logger.info(
            f"bins_to_cells {section}: {len(nuclei)} nuclei, {int(keep.sum())} cells from {int(hit.sum())} of "
            f"{len(units)} bins ({np.median(n_bins[keep]) if keep.any() else 0:.0f} bins per cell), "
            f"{time.perf_counter() - t0:.1f} s"
        )
    empty = [a.section for a in arrays if not a.n_units]
    if empty:
        raise ValueError(
            f"section(s) {empty}: no nucleus was found under the bins; check the H&E (tissue, stain) or pass "
            "threshold= / segmenter=."
        )
    shapes = {f"{a.section}_{key_added}": build_shapes(a, np.arange(a.n_units, dtype=np.int64)) for a in arrays}
    table = build_table(
        arrays,
        image_keys={s: slide.images[s].element for s in slide.sections},
        shapes_keys={s: f"{s}_{key_added}" for s in slide.sections},
        technology=Choices.BINNED_CELLS,
        unit_kind="cell",
        unit_diameter_um=float(np.median([a.diameter_um for a in arrays])),
    )
    # Everything computed: write at once, so an interrupt leaves sdata as it was.
    for key, element in shapes.items():
        sdata.shapes[key] = element
    sdata.tables[key_added] = table
