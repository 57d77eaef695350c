"""Plain AnnData + image -> the package's SpatialData layout, for users without SpatialData.

:func:`from_anndata` also reads the scanpy / squidpy Visium layout as it is: per library
``uns["spatial"][library_id]`` holds ``images`` (``"hires"``, ``"lowres"``, or a full-resolution
image), ``scalefactors`` (``tissue_{img_key}_scalef``: image pixels per full-resolution pixel,
``spot_diameter_fullres``: the spot diameter in full-resolution pixels) and ``obsm["spatial"]``
holds full-resolution pixel-index coordinates; several libraries sit in one table with an obs
column naming each unit's library (squidpy's ``library_key``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from sigmma_sc._constants import (
    ST_SPOT_DIAMETER_UM,
    ST_SPOT_PITCH_UM,
    VISIUM_SPOT_DIAMETER_UM,
    VISIUM_SPOT_PITCH_UM,
    Keys,
)
from sigmma_sc._logging import logger

from ._build import SectionArrays, build_sdata, pixel_index_to_um
from ._image import conversion_for, to_uint8

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

# scanpy / squidpy's uns["spatial"] layout (sc.read_visium, sq.read.visium): uns[SPATIAL][library_id] holds
# these fields. A scale factor "tissue_{img_key}_scalef" maps full-resolution pixels to that image's pixels.
SCANPY_IMAGES = "images"
SCANPY_SCALEFACTORS = "scalefactors"
SCANPY_METADATA = "metadata"
SCANPY_SPOT_DIAMETER = "spot_diameter_fullres"
SCANPY_HIRES = "hires"
SCANPY_LOWRES = "lowres"
# The spot diameter stored by Space Ranger and the one measured from the spot pitch may disagree (a crop
# whose scale factors belong to another image): beyond this relative difference the pitch is used.
_PITCH_TOLERANCE = 0.1
# Physical centre-to-centre distance of spot grids, by spot diameter (microns).
_PITCH_UM = {VISIUM_SPOT_DIAMETER_UM: VISIUM_SPOT_PITCH_UM, ST_SPOT_DIAMETER_UM: ST_SPOT_PITCH_UM}


def scalef_key(img_key: str) -> str:
    """Return scanpy's scale-factor field of an image, e.g. ``"tissue_hires_scalef"``.

    Examples
    --------
    >>> scalef_key("hires")
    'tissue_hires_scalef'
    """
    return f"tissue_{img_key}_scalef"


def _as_rgb_uint8(image: Any) -> np.ndarray:
    """``(h, w, 3)`` uint8 from an RGB(A) array, channel-last or channel-first (a new array when converted)."""
    import xarray as xr

    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"image must be an RGB array (height, width, 3), got shape {arr.shape}.")
    if arr.shape[-1] not in (3, 4) and arr.shape[0] in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.shape[-1] not in (3, 4):
        raise ValueError(
            f"image must have 3 colour channels (RGB; RGBA loses its alpha), got shape {arr.shape}. Grayscale or "
            "fluorescence images are not H&E."
        )
    arr = arr[..., :3]
    scale, rnd = conversion_for(xr.DataArray(arr, dims=("y", "x", "c")), "image")
    return np.ascontiguousarray(to_uint8(arr, scale, rnd))


def _is_integer_matrix(mat: Any) -> bool:
    vals = mat.data if sparse.issparse(mat) else np.asarray(mat).ravel()
    if vals.dtype.kind in "iu":
        return bool(vals.size == 0 or vals.min() >= 0)
    return bool(np.isfinite(vals).all() and (vals >= 0).all() and (vals == np.rint(vals)).all())


def spot_pitch_px(coords_px: np.ndarray) -> float | None:
    """Centre-to-centre distance of neighbouring spots (median nearest-neighbour distance); ``None`` under 3 spots.

    Examples
    --------
    >>> spot_pitch_px(np.array([[0.0, 0.0], [137.0, 0.0], [68.5, 118.6]]))
    137.0
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(coords_px, dtype=np.float64)
    if len(xy) < 3:
        return None
    dist, _ = cKDTree(xy).query(xy, k=2)
    pitch = float(np.median(dist[:, 1]))
    return pitch if pitch > 0 else None


def _positive(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{what} must be a positive number, got {value!r}.")
    return v


def _uns_spatial(adata: AnnData) -> Mapping[str, Any] | None:
    spatial = adata.uns.get(Keys.SPATIAL)
    return spatial if isinstance(spatial, Mapping) and len(spatial) else None


def _groups(
    adata: AnnData,
    *,
    image: Any,
    spatial: Mapping[str, Any] | None,
    library_key: str | None,
    library_id: str | list[str] | None,
    section: str | None,
) -> list[tuple[str, str | None, np.ndarray]]:
    """``(section name, library id or None, unit rows)`` per section, in order of first appearance."""
    n = adata.n_obs
    if library_key is not None:
        if library_key not in adata.obs:
            raise KeyError(
                f"adata.obs[{library_key!r}] not found (columns: {list(adata.obs.columns)}); library_key= names the "
                "obs column holding each unit's library id, as in squidpy."
            )
        col = adata.obs[library_key].astype(str).to_numpy()
        libs = list(pd.unique(col))
        if library_id is not None:
            wanted = [library_id] if isinstance(library_id, str) else [str(x) for x in library_id]
            unknown = [w for w in wanted if w not in libs]
            if unknown:
                raise KeyError(f"library_id {unknown} not in adata.obs[{library_key!r}] (libraries: {libs}).")
            libs = wanted
        groups = [(lib, lib, np.flatnonzero(col == lib)) for lib in libs]
        if section is not None:
            if len(groups) > 1:
                raise ValueError(
                    f"section= names one section, but library_key={library_key!r} gives {len(groups)} libraries: "
                    "the sections are named after them (pass library_id= to read one)."
                )
            groups = [(section, groups[0][1], groups[0][2])]
        return groups
    if library_id is not None and not isinstance(library_id, str):
        raise ValueError("several library_id values need library_key= (the obs column naming each unit's library).")
    lib = library_id
    if lib is None and spatial is not None and len(spatial) == 1:
        lib = str(next(iter(spatial)))
    if lib is None and image is None and spatial is not None:
        raise ValueError(
            f"adata.uns['spatial'] holds {len(spatial)} libraries {list(spatial)}: pass library_key= (the obs column "
            "naming each unit's library, one section per library) or library_id= (one library, all units)."
        )
    name = section if section is not None else (lib if image is None else "section0")
    return [(str(name), lib, np.arange(n))]


def _size(image: Any) -> str:
    h, w = np.shape(image)[:2]
    return f"{h} x {w} px"


def _covers(shape: tuple[int, ...], xy_img: np.ndarray) -> bool:
    h, w = int(shape[0]), int(shape[1])
    return bool(np.all((xy_img >= -1.0) & (xy_img <= np.array([w, h], dtype=np.float64))))


def _library_image(
    entry: Mapping[str, Any], xy_full: np.ndarray, img_key: str | None, where: str
) -> tuple[Any, float, str]:
    """Pick the image of one library; returns it with its scale (image pixels per full-resolution pixel) and key."""
    images = entry.get(SCANPY_IMAGES) or {}
    if not len(images):
        raise ValueError(f"{where} has no images in uns['spatial'][...]['images']; pass image= (full resolution).")
    factors = entry.get(SCANPY_SCALEFACTORS) or {}

    def scale(key: str) -> float:
        # An image without a scale factor is at full resolution (the pixels of obsm["spatial"]).
        value = factors.get(scalef_key(key))
        return 1.0 if value is None else _positive(value, f"{where}: scalefactors[{scalef_key(key)!r}]")

    if img_key is not None:
        if img_key not in images:
            raise KeyError(f"{where}: no image {img_key!r} (images: {list(images)}).")
        chosen = img_key
    else:
        finest = sorted(images, key=lambda k: -scale(k))
        fitting = [k for k in finest if _covers(np.shape(images[k]), xy_full * scale(k))]
        chosen = fitting[0] if fitting else finest[0]
        if chosen != finest[0]:
            logger.warning(
                f"{where}: image {finest[0]!r} ({_size(images[finest[0]])}) does not cover the spots at its "
                f"scale factor; using {chosen!r} ({_size(images[chosen])}). Pass image= for a full-resolution "
                "image."
            )
    if not _covers(np.shape(images[chosen]), xy_full * scale(chosen)):
        logger.warning(f"{where}: some spots fall outside image {chosen!r} at its scale factor {scale(chosen):g}.")
    return images[chosen], scale(chosen), str(chosen)


def _mpp_from_spots(entry: Mapping[str, Any] | None, xy_full: np.ndarray, spot_diameter: float, where: str) -> float:
    """Microns per full-resolution pixel from the stored spot diameter and the measured spot pitch."""
    factors = (entry or {}).get(SCANPY_SCALEFACTORS) or {}
    d_px = factors.get(SCANPY_SPOT_DIAMETER)
    from_d = spot_diameter / float(d_px) if d_px is not None and np.isfinite(d_px) and d_px > 0 else None
    pitch_um = _PITCH_UM.get(float(spot_diameter))
    pitch_px = spot_pitch_px(xy_full) if pitch_um is not None else None
    from_p = pitch_um / pitch_px if pitch_px else None
    if from_d is not None and from_p is not None:
        if abs(from_d - from_p) > _PITCH_TOLERANCE * from_p:
            logger.warning(
                f"{where}: spot_diameter_fullres ({float(d_px):.1f} px = {spot_diameter:g} µm) gives {from_d:.4f} "
                f"µm/px, but the spot pitch ({pitch_px:.1f} px = {pitch_um:g} µm) gives {from_p:.4f} µm/px: the "
                "stored diameter does not fit these coordinates (a crop?); using the pitch. Pass mpp= to choose."
            )
            return from_p
        logger.info(
            f"{where}: {from_d:.4f} µm/px from spot_diameter_fullres ({float(d_px):.1f} px = {spot_diameter:g} µm); "
            f"the spot pitch agrees ({from_p:.4f} µm/px)"
        )
        return from_d
    if from_d is not None:
        logger.info(f"{where}: {from_d:.4f} µm/px from spot_diameter_fullres ({float(d_px):.1f} px)")
        return from_d
    if from_p is not None:
        logger.info(f"{where}: {from_p:.4f} µm/px from the spot pitch ({pitch_px:.1f} px = {pitch_um:g} µm)")
        return from_p
    raise ValueError(
        f"{where}: the pixel size cannot be derived (no uns['spatial'][...]['scalefactors']['spot_diameter_fullres'] "
        "and no spot grid to measure); pass mpp= (microns per full-resolution pixel)."
    )


def from_anndata(
    adata: AnnData,
    image: Any = None,
    *,
    mpp: float | Mapping[str, float] | None = None,
    spatial_key: str = Keys.SPATIAL,
    spot_diameter: float | None = None,
    cell_diameter: float | None = None,
    section: str | None = None,
    library_key: str | None = None,
    library_id: str | list[str] | None = None,
    img_key: str | None = None,
) -> SpatialData:
    """Build the package's SpatialData layout from an AnnData whose coordinates are pixels: scanpy / squidpy Visium, or any table + image.

    ``adata`` is not modified. The result has per section ``S`` the H&E as a pyramid ``"{S}_he"``
    with a ``Scale([mpp, mpp])`` transformation to coordinate system ``S`` (microns), circles
    ``"{S}_spots"`` (``spot_diameter``) or ``"{S}_cells"`` (``cell_diameter``) in microns, and the
    table ``"table"`` with ``obsm["spatial"]`` in microns, ``uns["sigmma_dataset"]`` (technology
    ``"custom"``) and the original obs names in ``obs["barcode"]`` (obs names become ``"{S}_{i}"``;
    units are grouped by section, in order of first appearance).

    Two ways in:

    - **scanpy / squidpy Visium** (``sc.read_visium``, ``sq.read.visium``, ``sq.datasets.visium_*``):
      leave ``image`` out. Each library ``uns["spatial"][library_id]`` gives its image (the finest of
      ``images`` that covers the spots, ``"hires"`` before ``"lowres"``; an image without a
      ``tissue_{key}_scalef`` is taken as full resolution; ``img_key=`` chooses) and its scale
      factor. Several libraries in one table: ``library_key=`` (the obs column naming each unit's
      library, as in squidpy); one section per library, named after it. Spots default to Visium's
      55 µm.
    - **any table + image**: ``image`` at full resolution (the pixels of ``obsm[spatial_key]``),
      with ``mpp`` and ``spot_diameter`` or ``cell_diameter``.

    Pixel size: ``mpp`` when given; otherwise derived per library from the spots: ``spot_diameter /
    spot_diameter_fullres`` (Space Ranger's scale factor) and ``pitch / measured spot pitch``
    (Visium spots are 100 µm apart centre to centre, legacy ST 200 µm). When the two disagree by
    more than 10% (a crop whose stored scale factors belong to another image) the pitch is used
    and a warning gives both; the value used is logged.

    Counts: ``layers["counts"]`` when present, else ``X`` when it holds non-negative integers;
    a non-integer ``X`` without a counts layer is taken as log-normalised (flagged
    ``log_normalized``, so it is never log-transformed again). ``obs`` and ``var`` columns and
    the other ``obsm`` entries are carried over; ``uns`` is not (``uns["spatial"]`` is in pixels:
    :func:`sigmma_sc.tl.fit` writes one that fits the microns). A ``uint8`` ``(height, width, 3)``
    image is used without copying (do not write into it afterwards); other images are converted
    into a new array.

    Parameters
    ----------
    adata
        Units x genes; ``obsm[spatial_key]`` holds ``(x, y)`` = (column, row) full-resolution
        pixel-index coordinates (pixel centres at integers, as scanpy / squidpy store them).
    image
        The H&E at full resolution: ``(height, width, 3)`` (or channel-first / RGBA) array; ``uint8``,
        ``uint16`` or float in ``[0, 1]`` / ``[0, 255]``; with ``library_key``, a dict
        ``{library_id: image}``. Default: the images of ``adata.uns["spatial"]``.
    mpp
        Microns per full-resolution pixel (a number, or ``{library_id: mpp}``). Default: derived
        from the spots (see above); single-cell data need it.
    spatial_key
        ``obsm`` key of the pixel coordinates.
    spot_diameter
        Spot diameter in microns (spot data: Visium 55, legacy ST 100). At most one of
        ``spot_diameter`` / ``cell_diameter``; with neither, an AnnData with ``uns["spatial"]``
        is read as Visium (55 µm spots) and any other is refused.
    cell_diameter
        Typical cell (or bin) diameter in microns (single-cell data).
    section
        Section name (coordinate system and element prefix) of a single section. Default: the
        library id when read from ``uns["spatial"]``, else ``"section0"``.
    library_key
        obs column naming each unit's library (``uns["spatial"]`` key): one section per library.
    library_id
        Read only this library (with ``library_key``: these libraries); without ``library_key``,
        every unit belongs to it.
    img_key
        Which image of ``uns["spatial"][library_id]["images"]`` to use (default: the finest that
        covers the spots).

    Returns
    -------
    A new SpatialData object that :func:`sigmma_sc.io.validate` accepts.

    Examples
    --------
    >>> import numpy as np, anndata as ad
    >>> import sigmma_sc as sg
    >>> adata = ad.AnnData(np.random.poisson(1.0, (3, 5)).astype(np.float32))
    >>> adata.obsm["spatial"] = np.array([[10.0, 20.0], [50.0, 60.0], [90.0, 30.0]])
    >>> image = np.full((128, 128, 3), 220, np.uint8)
    >>> sdata = sg.io.from_anndata(adata, image, mpp=0.5, spot_diameter=55.0)
    >>> slide = sg.io.validate(sdata)
    >>> slide.sections, slide.unit_kind, slide.unit_diameter_um
    (['section0'], 'spot', 55.0)
    >>> slide.xy_um[0]  # pixel (10, 20) at 0.5 µm per pixel, pixel centres
    array([ 5.25, 10.25])

    A scanpy / squidpy Visium AnnData as it is (49 spots of squidpy's test data, whose stored
    spot diameter does not fit the crop: the spot pitch gives the pixel size):

    >>> folder = sg.datasets.resolve_dataset_dir("squidpy_tests", required=["test_data.h5ad"])
    >>> visium = ad.read_h5ad(folder / "test_data.h5ad")
    >>> sdata = sg.io.from_anndata(visium)
    >>> slide = sg.io.validate(sdata)
    >>> slide.sections, round(slide.images["V1_Adult_Mouse_Brain"].um_per_px, 1)  # the lowres image
    (['V1_Adult_Mouse_Brain'], 14.3)
    """
    spatial = _uns_spatial(adata)
    if spot_diameter is None and cell_diameter is None and spatial is not None:
        spot_diameter = VISIUM_SPOT_DIAMETER_UM
        logger.info(f"from_anndata: adata has uns['spatial'] (Visium layout): spots of {spot_diameter:g} µm")
    if (spot_diameter is None) == (cell_diameter is None):
        raise ValueError(
            "give exactly one of spot_diameter= (spot data: units hold many cells, e.g. 55 for Visium, 100 for "
            "legacy ST) or cell_diameter= (single-cell data, e.g. 10), in microns."
        )
    diameter = float(spot_diameter if spot_diameter is not None else cell_diameter)
    if not np.isfinite(diameter) or diameter <= 0:
        raise ValueError(f"the unit diameter must be a positive number of microns, got {diameter!r}.")
    if mpp is not None and not isinstance(mpp, Mapping):
        if not isinstance(mpp, (int, float, np.number)) or not np.isfinite(mpp) or mpp <= 0:
            raise ValueError(f"mpp must be a positive number of microns per pixel of `image`, got {mpp!r}.")
    if mpp is None and cell_diameter is not None:
        raise ValueError(
            "single-cell data need mpp= (microns per full-resolution pixel): only spots have a known size to "
            "derive it from."
        )
    if image is None and spatial is None:
        raise ValueError(
            "no image: pass image= (the H&E at full resolution), or an AnnData with uns['spatial'] "
            "(scanpy / squidpy Visium layout)."
        )
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{spatial_key!r}] not found (has {list(adata.obsm)}). Pass spatial_key= naming the (x, y) = "
            "(column, row) pixel coordinates of each unit in `image`."
        )
    xy_px = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if xy_px.ndim != 2 or xy_px.shape[1] < 2 or not np.isfinite(xy_px[:, :2]).all():
        raise ValueError(f"adata.obsm[{spatial_key!r}] must be a finite (n, 2) array, got shape {xy_px.shape}.")
    xy_px = xy_px[:, :2]
    if not adata.var_names.is_unique:
        raise ValueError("adata has duplicated gene names; call adata.var_names_make_unique() on a copy first.")
    groups = _groups(
        adata, image=image, spatial=spatial, library_key=library_key, library_id=library_id, section=section
    )
    if image is not None and not isinstance(image, Mapping) and len(groups) > 1:
        raise ValueError(
            f"one image for {len(groups)} libraries: pass image={{library_id: image}} or leave image out to use "
            "adata.uns['spatial']."
        )

    if Keys.COUNTS_LAYER in adata.layers:
        counts, log_normalized = adata.layers[Keys.COUNTS_LAYER], False
        if not _is_integer_matrix(counts):
            raise ValueError(
                f"adata.layers[{Keys.COUNTS_LAYER!r}] must hold raw non-negative integer counts; it does not."
            )
    elif _is_integer_matrix(adata.X):
        counts, log_normalized = adata.X, False
    else:
        counts, log_normalized = adata.X, True
    counts = sparse.csr_matrix(counts, copy=True)

    unit = "spot" if spot_diameter is not None else "cell"
    obs = adata.obs.copy()
    reserved = {Keys.SECTION, Keys.REGION, Keys.INSTANCE, Keys.BARCODE}
    obs = obs.drop(columns=[c for c in obs.columns if c in reserved])
    var = adata.var.copy() if adata.var.shape[1] else None
    barcodes = np.asarray([str(b) for b in adata.obs_names], dtype=object)
    sections = []
    for name, lib, rows in groups:
        where = f"library {lib!r}" if lib is not None else f"section {name!r}"
        entry = spatial.get(lib) if spatial is not None and lib is not None else None
        if lib is not None and image is None and entry is None:
            raise KeyError(f"library {lib!r} is not in adata.uns['spatial'] (libraries: {list(spatial or {})}).")
        xy = xy_px[rows]
        if image is None:
            img, scale, used = _library_image(entry, xy, img_key, where)
        else:
            img, scale, used = (
                (image[lib if lib is not None else name] if isinstance(image, Mapping) else image),
                1.0,
                "",
            )
        if isinstance(mpp, Mapping):
            key = lib if lib is not None and lib in mpp else name
            if key not in mpp:
                raise KeyError(f"mpp has no entry for {where} (keys: {list(mpp)}).")
            mpp_full = _positive(mpp[key], f"mpp[{key!r}]")
        elif mpp is not None:
            mpp_full = float(mpp)
        else:
            mpp_full = _mpp_from_spots(entry, xy, diameter, where)
        if used:
            logger.info(f"{where}: image {used!r} at {mpp_full / scale:.3f} µm/px (scale factor {scale:g})")
        sections.append(
            SectionArrays(
                section=name,
                image=_as_rgb_uint8(img),
                mpp=mpp_full / scale,
                xy_um=pixel_index_to_um(xy, mpp_full),
                counts=counts[rows],
                genes=[str(g) for g in adata.var_names],
                shape="circle",
                diameter_um=diameter,
                unit=unit,
                barcodes=list(barcodes[rows]),
                obs=obs.iloc[rows],
                var=var,
            )
        )
    sdata = build_sdata(
        sections, technology="custom", unit_kind=unit, unit_diameter_um=diameter, log_normalized=log_normalized
    )
    table = sdata.tables[Keys.TABLE]
    order = np.concatenate([rows for _, _, rows in groups])
    for key, val in adata.obsm.items():
        if key in (Keys.SPATIAL, spatial_key):
            continue
        if isinstance(val, pd.DataFrame):
            val = val.iloc[order].set_axis(table.obs_names, axis=0)
        else:
            val = val[order]
        table.obsm[key] = val.copy() if hasattr(val, "copy") else val
    return sdata
