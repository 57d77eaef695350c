"""Single-section public data sets: Xenium lung, Visium mouse brain, Visium HD kidney."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from sigmma_sc._constants import VISIUM_SPOT_DIAMETER_UM, VISIUM_SPOT_PITCH_UM, XENIUM_NCBI858_MPP
from sigmma_sc._logging import logger
from sigmma_sc.io import SectionArrays, build_sdata, pixel_index_to_um, read_rgb_pyramid

from ._paths import KIDNEY_CROP_FILES, REQUIRED_FILES, resolve_dataset_dir

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

# Source field names of the public files (not sigmma-sc keys).
_NCBI858_ROW, _NCBI858_COL = "x_pixel", "y_pixel"  # this subsample names the image ROW x_pixel
_NCBI858_CELL_DIAMETER = "cell_diameter"
_SOURCE_SPATIAL = "spatial"  # obsm of the source h5ad files: (column, row) pixel indices
_KIDNEY_META = "spatial_meta"
_KIDNEY_MPP = "um_per_px"
_KIDNEY_BIN_UM = "bin_um"


def _csr_int32(X: np.ndarray | sparse.spmatrix, what: str) -> sparse.csr_matrix:
    X = sparse.csr_matrix(X)
    if X.nnz and not np.array_equal(X.data, np.round(X.data)):
        raise ValueError(f"{what}: expected raw integer counts, found non-integer values.")
    return X.astype(np.int32)


def _read_h5ad(path: os.PathLike) -> AnnData:
    import anndata as ad

    return ad.read_h5ad(path)


def xenium_lung(path: str | os.PathLike | None = None, *, drop_empty: bool = True) -> SpatialData:
    """200 Xenium cells of human lung with their H&E (a subsample of HEST-1k sample NCBI858).

    From `ratschlab/DeepSpot <https://github.com/ratschlab/DeepSpot>`_ ``example_data/``: 200 cells x
    338 genes, raw counts; H&E at 2.125 µm/px. The source names the image **row** ``x_pixel`` and
    the **column** ``y_pixel``; the loader swaps them so that ``obsm["spatial"]`` is ``(x, y)`` =
    (column, row) in microns. Cells are circles of the data set's ``cell_diameter`` (20 µm).

    Parameters
    ----------
    path
        The ``deepspot_NCBI858`` folder (``NCBI858.h5ad``, ``NCBI858.jpg``, ``NCBI858.json``).
        Default: ``$SIGMMA_DATA_DIR``, ``../shared/data``, then a download into the pooch cache.
    drop_empty
        Drop cells without counts and genes without counts (downstream steps refuse them).

    Returns
    -------
    Section ``"NCBI858"``: image ``"NCBI858_he"``, circles ``"NCBI858_cells"``, table ``"table"``
    (raw counts, technology ``"xenium"``, unit kind ``"cell"``).

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.xenium_lung()
    >>> sdata["table"].n_obs
    200
    """
    folder = resolve_dataset_dir("deepspot_NCBI858", path, required=REQUIRED_FILES["deepspot_NCBI858"])
    adata = _read_h5ad(folder / "NCBI858.h5ad")
    meta_path = folder / "NCBI858.json"
    diameter = 20.0
    if meta_path.is_file():
        diameter = float(json.loads(meta_path.read_text()).get(_NCBI858_CELL_DIAMETER, diameter))
    px = adata.obs[[_NCBI858_COL, _NCBI858_ROW]].to_numpy(dtype=np.float64)  # (column, row)
    section = _circle_section(
        adata,
        "NCBI858",
        folder / "NCBI858.jpg",
        px,
        mpp=XENIUM_NCBI858_MPP,
        counts=_csr_int32(adata.X, "NCBI858.h5ad"),
        diameter_um=diameter,
        unit="cell",
    )
    return build_sdata(
        [section], technology="xenium", unit_kind="cell", unit_diameter_um=diameter, drop_empty=drop_empty
    )


def _circle_section(
    adata: Any, name: str, image_path: Path, px: np.ndarray, *, mpp: float, counts: Any, diameter_um: float, unit: str
) -> SectionArrays:
    """One section of circular units read from an AnnData with pixel-index centres and an image file."""
    return SectionArrays(
        section=name,
        image=read_rgb_pyramid(image_path),
        mpp=mpp,
        xy_um=pixel_index_to_um(px, mpp),
        counts=counts,
        genes=adata.var_names.astype(str).tolist(),
        shape="circle",
        diameter_um=diameter_um,
        unit=unit,
        barcodes=adata.obs_names.astype(str).tolist(),
        obs=adata.obs,
        var=adata.var,
    )


def spot_pitch_px(coords_px: np.ndarray) -> float:
    """Centre-to-centre distance of neighbouring spots (median nearest-neighbour distance), in pixels.

    Examples
    --------
    >>> spot_pitch_px(np.array([[0.0, 0.0], [137.0, 0.0], [68.5, 118.6]]))
    137.0
    """
    from scipy.spatial import cKDTree

    coords_px = np.asarray(coords_px, dtype=np.float64)
    if len(coords_px) < 2:
        raise ValueError("at least two spots are needed to measure the spot pitch.")
    dist, _ = cKDTree(coords_px).query(coords_px, k=2)
    return float(np.median(dist[:, 1]))


def visium_mouse_brain(path: str | os.PathLike | None = None, *, drop_empty: bool = True) -> SpatialData:
    """49 Visium spots of adult mouse brain with a full-resolution H&E crop (squidpy's test data).

    From `scverse/squidpy <https://github.com/scverse/squidpy>`_ ``tests/_data/`` (10x
    V1_Adult_Mouse_Brain). ``X`` is **log-normalised** (no raw counts exist): ``uns["sigmma_dataset"]
    ["log_normalized"]`` is ``True`` and there is no ``layers["counts"]``. The pixel size is derived
    from the spot grid: Visium spots are 100 µm apart centre to centre, so
    ``mpp = 100 / median nearest-neighbour distance`` (137 px here, 0.73 µm/px). Spots are circles of
    55 µm diameter.

    Parameters
    ----------
    path
        The ``squidpy_tests`` folder (``test_data.h5ad``, ``test_img.jpg``). Default:
        ``$SIGMMA_DATA_DIR``, ``../shared/data``, then a download into the pooch cache.
    drop_empty
        Drop spots and genes whose values are all 0 (598 of the 1,999 genes here).

    Returns
    -------
    Section ``"mouse_brain"``: image ``"mouse_brain_he"``, circles
    ``"mouse_brain_spots"``, table ``"table"`` (technology ``"visium"``, unit kind ``"spot"``).

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.visium_mouse_brain()
    >>> sdata["table"].uns["sigmma_dataset"]["log_normalized"]
    True
    """
    folder = resolve_dataset_dir("squidpy_tests", path, required=REQUIRED_FILES["squidpy_tests"])
    adata = _read_h5ad(folder / "test_data.h5ad")
    px = np.asarray(adata.obsm[_SOURCE_SPATIAL], dtype=np.float64)  # (column, row)
    mpp = VISIUM_SPOT_PITCH_UM / spot_pitch_px(px)
    logger.debug(f"visium_mouse_brain: {mpp:.4f} µm/px from the spot pitch.")
    section = _circle_section(
        adata,
        "mouse_brain",
        folder / "test_img.jpg",
        px,
        mpp=mpp,
        counts=sparse.csr_matrix(adata.X, dtype=np.float32),
        diameter_um=VISIUM_SPOT_DIAMETER_UM,
        unit="spot",
    )
    return build_sdata(
        [section],
        technology="visium",
        unit_kind="spot",
        unit_diameter_um=VISIUM_SPOT_DIAMETER_UM,
        log_normalized=True,
        drop_empty=drop_empty,
    )


def visium_hd_kidney(
    path: str | os.PathLike | None = None, *, crop: bool = False, drop_empty: bool = True
) -> SpatialData:
    """Visium HD human kidney (FFPE) at 16 µm bins over the whole-section H&E (2.007 µm/px).

    165,184 bins x 1,011 genes (1,000 highly variable genes plus kidney markers), raw counts, from the
    10x data set "Visium HD FFPE Human Kidney" (via broadinstitute/Celldega_Visium_HD_Human_Kidney_FFPE).
    The bins' pixel coordinates are already registered to the image; the section is mirrored
    relative to the capture array, which does not matter downstream (everything reads microns in
    the image's frame). Bins are axis-aligned squares of 16 µm. With ``crop=True`` a 1.2 mm crop
    (5,695 bins x 216 genes, its own 600 x 600 px image) loads in well under a second, for tests.

    There is no public file-level copy of these re-binned files: pass ``path=`` or set
    ``$SIGMMA_DATA_DIR`` when ``../shared/data`` is absent.

    Parameters
    ----------
    path
        The ``visiumhd_kidney`` folder.
    crop
        Load the small fixture crop (``fixture_16um_crop.h5ad`` + ``fixture_he_crop.png``).
    drop_empty
        Drop bins without counts in the stored genes (12 of the whole section, 178 of the crop,
        whose 216 genes miss some bins) and genes without counts; downstream steps refuse them.

    Returns
    -------
    Section ``"kidney"``: image ``"kidney_he"``, squares ``"kidney_bins"``, table ``"table"``
    (raw counts, technology ``"visium_hd"``, unit kind ``"cell"``).

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.visium_hd_kidney(crop=True)
    >>> sdata["table"].n_obs
    5517
    >>> sg.datasets.visium_hd_kidney(crop=True, drop_empty=False)["table"].n_obs
    5695
    """
    h5ad, image = KIDNEY_CROP_FILES if crop else REQUIRED_FILES["visiumhd_kidney"]
    folder = resolve_dataset_dir("visiumhd_kidney", path, required=(h5ad, image))
    adata = _read_h5ad(folder / h5ad)
    meta = adata.uns.get(_KIDNEY_META, {})
    if _KIDNEY_MPP not in meta or _KIDNEY_BIN_UM not in meta:
        raise KeyError(
            f"{folder / h5ad}: uns[{_KIDNEY_META!r}] must hold {_KIDNEY_MPP!r} and {_KIDNEY_BIN_UM!r} "
            "(the pixel size and the bin side); this file is not the expected visiumhd_kidney table."
        )
    mpp = float(meta[_KIDNEY_MPP])
    bin_um = float(meta[_KIDNEY_BIN_UM])
    px = np.asarray(adata.obsm[_SOURCE_SPATIAL], dtype=np.float64)  # (column, row) pixel indices
    section = SectionArrays(
        section="kidney",
        image=read_rgb_pyramid(folder / image),
        mpp=mpp,
        xy_um=pixel_index_to_um(px, mpp),
        counts=_csr_int32(adata.X, h5ad),
        genes=adata.var_names.astype(str).tolist(),
        shape="square",
        diameter_um=bin_um,
        unit="bin",
        barcodes=adata.obs_names.astype(str).tolist(),
        obs=pd.DataFrame(adata.obs),
    )
    return build_sdata(
        [section], technology="visium_hd", unit_kind="cell", unit_diameter_um=bin_um, drop_empty=drop_empty
    )
