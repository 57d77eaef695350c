"""Plain AnnData + image -> the package's SpatialData layout, for users without SpatialData."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from sigmma_sc._constants import Keys

from ._build import SectionArrays, build_sdata, pixel_index_to_um
from ._image import conversion_for, to_uint8

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData


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


def from_anndata(
    adata: AnnData,
    image: Any,
    *,
    mpp: float,
    spatial_key: str = Keys.SPATIAL,
    spot_diameter: float | None = None,
    cell_diameter: float | None = None,
    section: str = "section0",
) -> SpatialData:
    """Build the package's SpatialData layout from an AnnData whose coordinates are pixels of ``image``.

    ``adata`` is not modified. The result has the H&E as a pyramid ``"{section}_he"`` with a
    ``Scale([mpp, mpp])`` transformation to coordinate system ``section`` (microns), circles
    ``"{section}_spots"`` (``spot_diameter``) or ``"{section}_cells"`` (``cell_diameter``) in
    microns, and the table ``"table"`` with ``obsm["spatial"]`` in microns,
    ``uns["sigmma_dataset"]`` (technology ``"custom"``) and the original obs names in
    ``obs["barcode"]`` (obs names become ``"{section}_{i}"``).

    Counts: ``layers["counts"]`` when present, else ``X`` when it holds non-negative integers;
    a non-integer ``X`` without a counts layer is taken as log-normalised (flagged
    ``log_normalized``, so it is never log-transformed again). ``obs`` and ``var`` columns and
    the other ``obsm`` entries are carried over. A ``uint8`` ``(height, width, 3)`` image is used
    without copying (do not write into it afterwards); other images are converted into a new array.

    Parameters
    ----------
    adata
        Units x genes; ``obsm[spatial_key]`` holds ``(x, y)`` = (column, row) pixel-index
        coordinates in ``image`` (pixel centres at integers, as scanpy / squidpy store them).
    image
        The H&E: ``(height, width, 3)`` (or channel-first / RGBA) array; ``uint8``, ``uint16`` or
        float in ``[0, 1]`` / ``[0, 255]``.
    mpp
        Microns per pixel of ``image``.
    spatial_key
        ``obsm`` key of the pixel coordinates.
    spot_diameter
        Spot diameter in microns (spot data: Visium 55, legacy ST 100). Exactly one of
        ``spot_diameter`` / ``cell_diameter``.
    cell_diameter
        Typical cell (or bin) diameter in microns (single-cell data).
    section
        Section name (coordinate system and element prefix).

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
    """
    if (spot_diameter is None) == (cell_diameter is None):
        raise ValueError(
            "give exactly one of spot_diameter= (spot data: units hold many cells, e.g. 55 for Visium, 100 for "
            "legacy ST) or cell_diameter= (single-cell data, e.g. 10), in microns."
        )
    diameter = float(spot_diameter if spot_diameter is not None else cell_diameter)
    if not np.isfinite(diameter) or diameter <= 0:
        raise ValueError(f"the unit diameter must be a positive number of microns, got {diameter!r}.")
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"mpp must be a positive number of microns per pixel of `image`, got {mpp!r}.")
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{spatial_key!r}] not found (has {list(adata.obsm)}). Pass spatial_key= naming the (x, y) = "
            "(column, row) pixel coordinates of each unit in `image`."
        )
    xy_px = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if xy_px.ndim != 2 or xy_px.shape[1] < 2 or not np.isfinite(xy_px[:, :2]).all():
        raise ValueError(f"adata.obsm[{spatial_key!r}] must be a finite (n, 2) array, got shape {xy_px.shape}.")
    if not adata.var_names.is_unique:
        raise ValueError("adata has duplicated gene names; call adata.var_names_make_unique() on a copy first.")
    rgb = _as_rgb_uint8(image)

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
    arrays = SectionArrays(
        section=section,
        image=rgb,
        mpp=float(mpp),
        xy_um=pixel_index_to_um(xy_px[:, :2], mpp),
        counts=counts,
        genes=[str(g) for g in adata.var_names],
        shape="circle",
        diameter_um=diameter,
        unit=unit,
        barcodes=[str(b) for b in adata.obs_names],
        obs=obs,
        var=adata.var.copy() if adata.var.shape[1] else None,
    )
    sdata = build_sdata(
        [arrays], technology="custom", unit_kind=unit, unit_diameter_um=diameter, log_normalized=log_normalized
    )
    table = sdata.tables[Keys.TABLE]
    for key, val in adata.obsm.items():
        if key in (Keys.SPATIAL, spatial_key):
            continue
        if isinstance(val, pd.DataFrame):
            val = val.set_axis(table.obs_names, axis=0)
        table.obsm[key] = val.copy() if hasattr(val, "copy") else val
    return sdata
