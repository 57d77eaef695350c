"""Nuclei from the H&E of spot data: the micro level of a spot hierarchy.

Colour deconvolution (hematoxylin channel), a per-section Otsu threshold over tissue, and a
watershed on smoothed hematoxylin (dark nuclear cores) blended with the distance to the mask
edge, which splits touching nuclei in dense tumour clusters. Only the pixels of spot windows
(the spot plus a margin) are read, at full resolution, so a 10k x 10k slide takes seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from sigmma_sc._constants import Defaults, Keys
from sigmma_sc._logging import logger
from sigmma_sc._settings import settings
from sigmma_sc.io import validate

if TYPE_CHECKING:
    from spatialdata import SpatialData

# Otsu over tissue puts the cut near the bright rim of nuclei; a little lower keeps the paler
# stromal (elongated) nuclei that the overlays showed missing at 1.0.
_OTSU_SCALE = 0.9
# Pixels brighter than this (mean RGB) are glass, not tissue, when choosing the threshold.
_GLASS_GRAY = 215
# Pixels sampled per section for the threshold.
_THRESHOLD_SAMPLE = 400_000


def nuclei_key(section: str) -> str:
    """Name of the nuclei shapes element of a section, ``"{section}_nuclei"``.

    Examples
    --------
    >>> nuclei_key("C2")
    'C2_nuclei'
    """
    return f"{section}{Keys.NUCLEI_SUFFIX}"


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density of an RGB ``uint8`` image (scikit-image ``rgb2hed``, channel 0).

    Parameters
    ----------
    rgb
        ``(h, w, 3)`` ``uint8``.

    Returns
    -------
    ``(h, w)`` float32; nuclei are high (about 0.1-0.3), stroma and glass low.

    Examples
    --------
    >>> import numpy as np
    >>> float(hematoxylin(np.full((4, 4, 3), 255, np.uint8)).max()) < 0.01
    True
    """
    from skimage.color import rgb2hed

    return rgb2hed(rgb)[..., 0].astype(np.float32)


def tissue_threshold(h: np.ndarray, rgb: np.ndarray, *, scale: float = _OTSU_SCALE) -> float:
    """Hematoxylin threshold: Otsu over tissue pixels (glass excluded), times ``scale``.

    Parameters
    ----------
    h
        Hematoxylin values (any shape).
    rgb
        The matching RGB pixels (``h.shape + (3,)``), used to exclude glass.
    scale
        Multiplier of the Otsu threshold.

    Returns
    -------
    The threshold (hematoxylin optical density).

    Examples
    --------
    >>> import numpy as np
    >>> rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    >>> t = tissue_threshold(hematoxylin(rgb), rgb)
    >>> round(float(t), 3)
    0.201
    """
    from skimage.filters import threshold_otsu

    gray = rgb.reshape(-1, 3).mean(1)
    vals = h.reshape(-1)[gray < _GLASS_GRAY]
    if vals.size < 100:
        vals = h.reshape(-1)
    if vals.size > _THRESHOLD_SAMPLE:
        vals = np.random.default_rng(0).choice(vals, _THRESHOLD_SAMPLE, replace=False)
    if np.ptp(vals) == 0:
        return float(vals[0]) + 1.0  # flat image: nothing is a nucleus
    return float(threshold_otsu(vals)) * scale


def segment_tile(
    h: np.ndarray,
    *,
    um_per_px: float,
    threshold: float,
    min_distance_um: float = 3.0,
    smooth_um: float = 0.7,
    marker_um: float = 1.0,
    min_object_um2: float = 6.0,
) -> np.ndarray:
    """Label nuclei in a hematoxylin image: threshold, fill holes, watershed.

    Parameters
    ----------
    h
        ``(h, w)`` hematoxylin optical density (:func:`hematoxylin`).
    um_per_px
        Pixel size, to express every size in microns.
    threshold
        Hematoxylin cut (:func:`tissue_threshold`).
    min_distance_um
        Closest two nucleus centres may be (the watershed markers).
    smooth_um
        Gaussian smoothing before thresholding (noise and JPEG blocks).
    marker_um
        Gaussian smoothing of the hematoxylin used to find nuclear cores.
    min_object_um2
        Foreground specks smaller than this are removed before the watershed.

    Returns
    -------
    ``(h, w)`` int32 labels, 0 = background.

    Examples
    --------
    >>> import numpy as np
    >>> h = np.zeros((60, 60), np.float32)
    >>> h[10:20, 10:20] = h[40:50, 30:40] = 0.2
    >>> int(segment_tile(h, um_per_px=0.5, threshold=0.1).max())
    2
    """
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian
    from skimage.measure import label
    from skimage.segmentation import watershed

    h = np.asarray(h, dtype=np.float32)
    mask = gaussian(h, smooth_um / um_per_px, preserve_range=True) > threshold
    specks, _ = ndi.label(mask)
    mask &= (np.bincount(specks.ravel()) >= max(min_object_um2 / um_per_px**2, 1))[specks]
    mask = ndi.binary_fill_holes(mask)
    if not mask.any():
        return np.zeros(h.shape, np.int32)
    # Markers: dark nuclear cores (smoothed hematoxylin) plus depth inside the mask; cores split
    # clumps whose outline has no concavity, depth keeps one marker per pale nucleus.
    depth_cap = 4.0 / um_per_px
    core = gaussian(h, marker_um / um_per_px, preserve_range=True)
    score = (
        core / max(float(core.max()), 1e-6) + 0.5 * np.minimum(ndi.distance_transform_edt(mask), depth_cap) / depth_cap
    )
    score[~mask] = 0
    blobs = label(mask)
    # One pass over the tile (``labels=`` would loop over every blob, 10x slower); blobs left
    # without a peak get one below.
    peaks = peak_local_max(
        score, min_distance=max(int(min_distance_um / um_per_px / 2), 1), threshold_abs=1e-6, exclude_border=False
    )
    markers = np.zeros(h.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # Blobs without a peak (flat plateaus) get one marker at their maximum, so none is lost.
    has_peak = np.zeros(int(blobs.max()) + 1, bool)
    has_peak[blobs[tuple(peaks.T)]] = True
    missing = np.flatnonzero(~has_peak[1:]) + 1
    if missing.size:
        pos = np.asarray(ndi.maximum_position(score, blobs, missing), dtype=np.int64).reshape(-1, 2)
        markers[pos[:, 0], pos[:, 1]] = np.arange(len(peaks) + 1, len(peaks) + 1 + len(missing))
    return watershed(-score, markers, mask=mask).astype(np.int32)


def label_tile(
    tile: np.ndarray,
    *,
    um_per_px: float,
    threshold: float | None,
    segmenter: Callable[[np.ndarray], np.ndarray] | None = None,
    min_distance_um: float = 3.0,
) -> dict[str, np.ndarray]:
    """Segment the nuclei of an RGB tile and measure them (:func:`segment_tile` or ``segmenter``).

    Returns :func:`measure_labels`' dict, in the tile's pixels.

    Examples
    --------
    >>> import numpy as np
    >>> tile = np.full((40, 40, 3), 240, np.uint8)
    >>> tile[10:20, 10:20] = (60, 30, 120)
    >>> label_tile(tile, um_per_px=0.5, threshold=0.1)["area_px"].tolist()  # the smoothed edge is cut
    [80.0]
    """
    h = hematoxylin(tile)
    if segmenter is None:
        lab = segment_tile(h, um_per_px=um_per_px, threshold=threshold, min_distance_um=min_distance_um)
    else:
        lab = np.asarray(segmenter(tile))
        if lab.shape != h.shape or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(
                f"segmenter returned {lab.dtype} {lab.shape} for a {tile.shape} tile; it must return an "
                "integer label image of the tile's height and width (0 = background)."
            )
    return measure_labels(lab, h)


def measure_labels(labels: np.ndarray, h: np.ndarray) -> dict[str, np.ndarray]:
    """Per-label centroid, area, eccentricity and mean hematoxylin, vectorised over labels.

    Parameters
    ----------
    labels
        ``(h, w)`` integer labels, 0 = background.
    h
        ``(h, w)`` hematoxylin optical density.

    Returns
    -------
    ``row``, ``col`` (centroid, pixels of the tile), ``area_px``, ``eccentricity`` (0 circle .. 1 line),
    ``hematoxylin`` (mean), one entry per label present.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((20, 20), int)
    >>> lab[2:6, 2:6] = 1
    >>> m = measure_labels(lab, np.ones((20, 20)))
    >>> m["area_px"].tolist(), m["row"].tolist()
    ([16.0], [3.5])
    """
    lab = np.asarray(labels).ravel()
    fg = lab > 0
    ids, inv = np.unique(lab[fg], return_inverse=True)
    n = len(ids)
    rr, cc = np.divmod(np.flatnonzero(fg), labels.shape[1])
    area = np.bincount(inv, minlength=n).astype(np.float64)
    r = np.bincount(inv, rr, n) / np.maximum(area, 1)
    c = np.bincount(inv, cc, n) / np.maximum(area, 1)
    dr, dc = rr - r[inv], cc - c[inv]
    # Eccentricity of the ellipse with the same second moments, as skimage regionprops (a single
    # pixel counts as a circle).
    mrr = np.bincount(inv, dr * dr, n) / np.maximum(area, 1)
    mcc = np.bincount(inv, dc * dc, n) / np.maximum(area, 1)
    mrc = np.bincount(inv, dr * dc, n) / np.maximum(area, 1)
    half_tr, root = (mrr + mcc) / 2, np.sqrt(((mrr - mcc) / 2) ** 2 + mrc**2)
    l1, l2 = half_tr + root, np.maximum(half_tr - root, 0)
    ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / np.where(l1 > 0, l1, 1), 0, 1)), 0.0)
    hmean = np.bincount(inv, np.asarray(h, np.float64).ravel()[fg], n) / np.maximum(area, 1)
    return {"row": r, "col": c, "area_px": area, "eccentricity": ecc, "hematoxylin": hmean}


def _cs_from_um(sdata: SpatialData, img) -> np.ndarray:
    """Affine microns -> the image's coordinate system (identity for sigmma_sc objects)."""
    from spatialdata.transformations import get_transformation

    tr = get_transformation(sdata.images[img.element], to_coordinate_system=img.coordinate_system)
    cs_from_px = np.asarray(tr.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)
    return cs_from_px @ img.px_from_um


def _segment_section(
    slide,
    s_idx: int,
    *,
    segmenter: Callable[[np.ndarray], np.ndarray] | None,
    threshold: float | None,
    min_area_um2: float,
    max_area_um2: float,
    margin_um: float,
    min_distance_um: float,
) -> pd.DataFrame:
    from scipy.spatial import cKDTree
    from tqdm.auto import tqdm

    section = slide.sections[s_idx]
    img = slide.images[section]
    units = np.flatnonzero(slide.unit_section == s_idx)
    centres_um = slide.xy_um[units]
    radius_um = slide.unit_diameter_um / 2
    upp = img.um_per_px
    half = int(np.ceil((radius_um + margin_um) / upp))
    cr = np.rint(img.um_to_px(centres_um)).astype(np.int64)

    def window(j: int) -> np.ndarray:
        c, r = cr[j]
        return img.read(r - half, r + half + 1, c - half, c + half + 1)

    if segmenter is None and threshold is None:
        # ~200 windows spread over the section set the threshold; windows are then streamed one
        # by one, so memory does not grow with the number of spots.
        sample = [window(j) for j in range(0, len(cr), max(1, len(cr) // 200))]
        threshold = tissue_threshold(np.stack([hematoxylin(t) for t in sample]), np.stack(sample))
    px_area_um2 = abs(np.linalg.det(img.um_from_px[:2, :2]))
    rows = []
    for j in tqdm(range(len(cr)), desc=f"nuclei {section}", disable=not settings.progress_bar, leave=False):
        m = label_tile(
            window(j), um_per_px=upp, threshold=threshold, segmenter=segmenter, min_distance_um=min_distance_um
        )
        m["unit"] = np.full(len(m["row"]), j)
        m["row"] += cr[j, 1] - half
        m["col"] += cr[j, 0] - half
        rows.append(m)
    if rows:
        cat = {k: np.concatenate([m[k] for m in rows]) for k in rows[0]}
    else:
        cat = {k: np.zeros(0) for k in ("row", "col", "area_px", "eccentricity", "hematoxylin", "unit")}
    xy = img.px_to_um(np.stack([cat["col"], cat["row"]], 1))
    area = cat["area_px"] * px_area_um2
    local = cat["unit"].astype(np.int64)
    # A nucleus belongs to the spot whose circle holds its centroid; with touching or overlapping
    # spots the nearest centre wins, so no nucleus is counted twice.
    nearest = cKDTree(centres_um).query(xy)[1] if len(xy) else np.zeros(0, np.int64)
    inside = np.linalg.norm(xy - centres_um[local], axis=1) <= radius_um
    keep = inside & (nearest == local) & (area >= min_area_um2) & (area <= max_area_um2)
    spot = units[local[keep]]
    return pd.DataFrame(
        {
            "x": xy[keep, 0],
            "y": xy[keep, 1],
            Keys.NUCLEUS_AREA: area[keep].astype(np.float32),
            Keys.NUCLEUS_ECCENTRICITY: cat["eccentricity"][keep].astype(np.float32),
            Keys.NUCLEUS_HEMATOXYLIN: cat["hematoxylin"][keep].astype(np.float32),
            Keys.NUCLEUS_SPOT: spot.astype(np.int64),
            Keys.NUCLEUS_UNIT: np.asarray(slide.table.obs_names)[spot].astype(str),
            Keys.NUCLEUS_SECTION: section,
        }
    )


def _shapes_element(df: pd.DataFrame, cs_from_um: np.ndarray, coordinate_system: str):
    import geopandas as gpd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Affine, Identity

    gdf = gpd.GeoDataFrame(
        df.drop(columns=["x", "y"]).reset_index(drop=True),
        geometry=gpd.points_from_xy(df["x"].to_numpy(), df["y"].to_numpy()),
    )
    gdf["radius"] = np.sqrt(gdf[Keys.NUCLEUS_AREA].to_numpy(np.float64) / np.pi)
    if np.allclose(cs_from_um, np.eye(3)):
        tr = Identity()
    else:
        tr = Affine(cs_from_um, input_axes=("x", "y"), output_axes=("x", "y"))
    return ShapesModel.parse(gdf, transformations={coordinate_system: tr})


def segment_nuclei(
    sdata: SpatialData,
    *,
    table_key: str = Keys.TABLE,
    section: str | Sequence[str] | None = None,
    segmenter: Callable[[np.ndarray], np.ndarray] | None = None,
    threshold: float | None = None,
    min_area_um2: float = Defaults.NUCLEUS_MIN_AREA_UM2,
    max_area_um2: float = Defaults.NUCLEUS_MAX_AREA_UM2,
    margin_um: float = Defaults.NUCLEUS_MARGIN_UM,
    min_distance_um: float = 3.0,
) -> None:
    """Segment nuclei in the H&E under every spot and store them per section.

    For spot data (Visium, legacy ST): the micro level of the hierarchy. Each spot window
    (the spot plus ``margin_um``) is read at full resolution; the hematoxylin channel of a colour
    deconvolution (:func:`skimage.color.rgb2hed`) is thresholded (Otsu over the tissue pixels of
    the section's spot windows, unless ``threshold`` is given) and touching nuclei are split by a
    watershed on nuclear cores. Nuclei are kept when their area lies in
    ``[min_area_um2, max_area_um2]`` and their centroid inside a spot circle; the others are dropped.

    Parameters
    ----------
    sdata
        Spot data with H&E images (see :func:`sigmma_sc.io.validate`).
    table_key
        Table with the spots.
    section
        Section(s) to process; ``None``: all.
    segmenter
        Your own segmentation: a callable taking an RGB ``uint8`` tile ``(h, w, 3)`` and returning an
        integer label image ``(h, w)`` (0 = background), e.g. a StarDist or Cellpose wrapper. It
        replaces the threshold + watershed; measurements, size filters and spot assignment stay.
    threshold
        Fixed hematoxylin optical density cut (default: per-section Otsu over tissue).
    min_area_um2, max_area_um2
        Accepted nucleus areas in µm².
    margin_um
        Context read around each spot, so nuclei on the spot edge are whole.
    min_distance_um
        Closest two nucleus centres may be.

    Returns
    -------
    ``None``. Adds one shapes element per section, ``sdata.shapes["{section}_nuclei"]``: circles at
    the nucleus centroids (radius from the area, microns) in the section's coordinate system, with
    columns ``area_um2``, ``eccentricity``, ``hematoxylin`` (mean optical density), ``spot`` (row of
    the containing spot in the table), ``unit`` (its ``obs_name``) and ``section``. Existing
    elements of the same name are replaced; all sections are computed before anything is added.

    Examples
    --------
    On a her2st section (tens of nuclei per 100 µm spot):

    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.her2st(sections=["C2"])  # doctest: +SKIP
    >>> sg.pp.segment_nuclei(sdata)  # doctest: +SKIP
    >>> nuc = sdata.shapes["C2_nuclei"]  # doctest: +SKIP

    On 49 Visium spots of a mouse brain:

    >>> sdata = sg.datasets.visium_mouse_brain()
    >>> sg.pp.segment_nuclei(sdata)
    >>> nuc = sdata.shapes["mouse_brain_nuclei"]
    >>> len(nuc), float(nuc.groupby("spot").size().median())
    (339, 7.0)
    """
    slide = validate(sdata, table_key=table_key, require_image=False)
    if slide.unit_kind != "spot":
        raise ValueError(
            f"segment_nuclei is for spot data; table {table_key!r} holds {slide.technology!r} units of kind "
            f"{slide.unit_kind!r}, which are already cells (the micro level). Use pp.build_hierarchy directly."
        )
    wanted = slide.sections if section is None else [section] if isinstance(section, str) else list(section)
    unknown = [s for s in wanted if s not in slide.sections]
    if unknown:
        raise KeyError(f"section(s) {unknown} not in table {table_key!r} (sections: {slide.sections}).")
    no_image = [s for s in wanted if s not in slide.images]
    if no_image:
        raise KeyError(f"section(s) {no_image} have no H&E image in sdata.images; nuclei need one per section.")
    if min_area_um2 >= max_area_um2:
        raise ValueError(f"min_area_um2={min_area_um2} must be below max_area_um2={max_area_um2}.")
    elements = {}
    for s in wanted:
        t0 = time.perf_counter()
        s_idx = slide.sections.index(s)
        df = _segment_section(
            slide,
            s_idx,
            segmenter=segmenter,
            threshold=threshold,
            min_area_um2=min_area_um2,
            max_area_um2=max_area_um2,
            margin_um=margin_um,
            min_distance_um=min_distance_um,
        )
        img = slide.images[s]
        elements[nuclei_key(s)] = _shapes_element(df, _cs_from_um(sdata, img), img.coordinate_system)
        n_spots = int((slide.unit_section == s_idx).sum())
        logger.info(
            f"nuclei {s}: {len(df)} in {n_spots} spots ({len(df) / max(n_spots, 1):.1f} per spot), "
            f"{time.perf_counter() - t0:.1f} s"
        )
    for key, el in elements.items():
        sdata.shapes[key] = el


def load_nuclei(slide) -> dict[str, np.ndarray]:
    """Read the nuclei of every section of a validated slide, aligned with its table.

    Parameters
    ----------
    slide
        :class:`~sigmma_sc.io.SlideData` whose ``sdata`` holds ``"{section}_nuclei"`` elements.

    Returns
    -------
    ``xy_um`` ``(n, 2)``, ``section`` ``(n,)`` codes, ``spot`` ``(n,)`` table rows, and the
    morphology columns; nuclei whose spot is no longer in the table are dropped.

    Raises
    ------
    KeyError
        A section has no nuclei element.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.visium_mouse_brain()
    >>> sg.pp.segment_nuclei(sdata)
    >>> nuc = load_nuclei(sg.io.validate(sdata))
    >>> sorted(nuc), nuc["xy_um"].shape
    (['area_um2', 'eccentricity', 'hematoxylin', 'section', 'spot', 'xy_um'], (339, 2))
    """
    sdata = slide.sdata
    names = pd.Index(np.asarray(slide.table.obs_names))
    parts: list[dict[str, Any]] = []
    for s_idx, s in enumerate(slide.sections):
        key = nuclei_key(s)
        if key not in sdata.shapes:
            raise KeyError(f"shapes element {key!r} not found; run sigmma_sc.pp.segment_nuclei(sdata) first.")
        gdf = sdata.shapes[key]
        pts = np.column_stack([gdf.geometry.x.to_numpy(), gdf.geometry.y.to_numpy(), np.ones(len(gdf))])
        if s in slide.images:
            um_from_cs = np.linalg.inv(_cs_from_um(sdata, slide.images[s]))
            pts = pts @ um_from_cs.T
        spot = names.get_indexer(gdf[Keys.NUCLEUS_UNIT].astype(str).to_numpy())
        ok = (spot >= 0) & (slide.unit_section[np.maximum(spot, 0)] == s_idx)
        if not ok.all():
            logger.info(f"{key}: {int((~ok).sum())} nuclei dropped (their spot is not in the table)")
        parts.append(
            {
                "xy_um": pts[ok, :2],
                "section": np.full(int(ok.sum()), s_idx, np.int64),
                "spot": spot[ok].astype(np.int64),
                Keys.NUCLEUS_AREA: gdf[Keys.NUCLEUS_AREA].to_numpy()[ok],
                Keys.NUCLEUS_ECCENTRICITY: gdf[Keys.NUCLEUS_ECCENTRICITY].to_numpy()[ok],
                Keys.NUCLEUS_HEMATOXYLIN: gdf[Keys.NUCLEUS_HEMATOXYLIN].to_numpy()[ok],
            }
        )
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
