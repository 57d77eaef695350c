"""HER2-positive breast cancer, legacy Spatial Transcriptomics (Andersson et al., Nat Commun 2021)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from sigmma_sc._constants import HER2ST_MPP, ST_SPOT_DIAMETER_UM
from sigmma_sc._logging import logger
from sigmma_sc.io import SectionArrays, build_sdata, pixel_index_to_um, read_rgb_pyramid

from ._paths import REQUIRED_FILES, display_path, resolve_dataset_dir

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

# Column names of the public spot-selection files (`spots/<S>_selection.tsv`).
_ARRAY_X, _ARRAY_Y = "x", "y"
_PIXEL_COL, _PIXEL_ROW = "pixel_x", "pixel_y"  # pixel_x is the image column, pixel_y the row
_SELECTED = "selected"
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def _section_files(folder: Path, section: str) -> tuple[Path, Path, Path] | None:
    counts = folder / "counts" / f"{section}.tsv.gz"
    spots = folder / "spots" / f"{section}_selection.tsv"
    images = sorted(p for p in (folder / "images").glob(f"{section}_*") if p.suffix.lower() in _IMAGE_EXTS)
    if not (counts.is_file() and spots.is_file() and images):
        return None
    return images[0], counts, spots


def her2st_sections(folder: str | os.PathLike) -> list[str]:
    """Sections with all three files (image, counts, spot selection) in a her2st folder, sorted.

    Parameters
    ----------
    folder
        A folder in the almaan/her2st layout (``images/``, ``counts/``, ``spots/``).

    Returns
    -------
    Section names, e.g. ``["C2", "C3", "C4", "C5", "C6"]``.

    Examples
    --------
    >>> from sigmma_sc.datasets import her2st_sections, resolve_dataset_dir
    >>> her2st_sections(resolve_dataset_dir("her2st", required=["counts/*.tsv.gz"]))
    ['C2', 'C3', 'C4', 'C5', 'C6']
    """
    folder = Path(folder)
    names = [re.sub(r"\.tsv\.gz$", "", p.name) for p in (folder / "counts").glob("*.tsv.gz")]
    return sorted(s for s in names if _section_files(folder, s) is not None)


def spot_key(array_x: pd.Series, array_y: pd.Series) -> pd.Index:
    """Counts-file row ids ``"<x>x<y>"`` from the ST array coordinates of a selection table.

    Examples
    --------
    >>> spot_key(pd.Series([25, 24]), pd.Series([13.0, 13.0])).tolist()
    ['25x13', '24x13']
    """
    x = np.rint(np.asarray(array_x, dtype=np.float64)).astype(np.int64)
    y = np.rint(np.asarray(array_y, dtype=np.float64)).astype(np.int64)
    return pd.Index([f"{a}x{b}" for a, b in zip(x, y)])


def _read_section(folder: Path, section: str) -> SectionArrays:
    image_path, counts_path, spots_path = _section_files(folder, section)  # type: ignore[misc]
    counts = pd.read_csv(counts_path, sep="\t", index_col=0)
    counts.index = counts.index.astype(str)
    sel = pd.read_csv(spots_path, sep="\t")
    missing = [c for c in (_ARRAY_X, _ARRAY_Y, _PIXEL_COL, _PIXEL_ROW, _SELECTED) if c not in sel.columns]
    if missing:
        raise ValueError(f"her2st section {section!r}: {spots_path} lacks the columns {missing}.")
    sel = sel[sel[_SELECTED] == 1].copy()
    sel.index = spot_key(sel[_ARRAY_X], sel[_ARRAY_Y])
    if sel.index.has_duplicates:
        raise ValueError(f"her2st section {section!r}: duplicated array positions in {spots_path}.")
    # Spots in counts order, kept when the selection file marks them as under the tissue.
    keep = counts.index[counts.index.isin(sel.index)]
    if len(keep) == 0:
        raise ValueError(f"her2st section {section!r}: no row of {counts_path} matches a selected spot.")
    sel = sel.loc[keep]
    values = counts.loc[keep].to_numpy()
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"her2st section {section!r}: {counts_path} holds non-integer counts ({values.dtype}).")
    image = read_rgb_pyramid(image_path)
    px = sel[[_PIXEL_COL, _PIXEL_ROW]].to_numpy(dtype=np.float64)
    return SectionArrays(
        section=section,
        image=image,
        mpp=HER2ST_MPP,
        xy_um=pixel_index_to_um(px, HER2ST_MPP),
        counts=sparse.csr_matrix(values.astype(np.int32)),
        genes=counts.columns.astype(str).tolist(),
        shape="circle",
        diameter_um=ST_SPOT_DIAMETER_UM,
        unit="spot",
        barcodes=keep.tolist(),
        obs=sel.drop(columns=[_SELECTED]).reset_index(drop=True),
    )


def her2st(
    path: str | os.PathLike | None = None, *, sections: Sequence[str] | None = None, drop_empty: bool = True
) -> SpatialData:
    """HER2-positive breast cancer sections (legacy ST, 100 µm spots on a 200 µm pitch).

    Reads the layout of the public repository `almaan/her2st <https://github.com/almaan/her2st>`_
    (Andersson et al., *Nat Commun* 2021): ``images/<S>_*.jpg`` (H&E, 0.688 µm/px),
    ``counts/<S>.tsv.gz`` (spots x genes, raw UMI, rows ``"<x>x<y>"``) and
    ``spots/<S>_selection.tsv`` (spots under the tissue, ``selected == 1``; ``pixel_x`` is the image
    column, ``pixel_y`` the row). A spot is kept when its ``"<x>x<y>"`` id is both in the counts and
    selected.

    Genes are the **union** across the loaded sections (first-appearance order); a gene that a
    section did not report is 0 in that section's spots. Genes without a single count in the
    loaded spots are dropped (``drop_empty``; 534 of the 17,418 genes of C2-C6).

    Parameters
    ----------
    path
        The her2st folder. Default: ``$SIGMMA_DATA_DIR/her2st``, then ``../shared/data/her2st``
        next to the repository, then a download of sections C2-C6 into the pooch cache.
    sections
        Sections to load; default all sections found in the folder (sorted).
    drop_empty
        Drop spots without counts and genes without counts in the loaded sections (downstream
        steps refuse them); ``False`` keeps the files' full gene union.

    Returns
    -------
    Per section ``S``: image ``"{S}_he"`` (pyramid, ``Scale`` pixels -> microns into coordinate system
    ``S``), circles ``"{S}_spots"`` (radius 50 µm); table ``"table"`` with raw counts in ``X`` and
    ``layers["counts"]``, ``obs["section"]``, ``obs["barcode"]`` (``"<x>x<y>"``), the selection
    file's columns, ``obsm["spatial"]`` in microns and ``uns["sigmma_dataset"]``.

    Examples
    --------
    All five sections (tens of seconds and 4 GB):

    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.her2st()  # doctest: +SKIP
    >>> sdata["table"].obs["section"].value_counts().sort_index().tolist()  # doctest: +SKIP
    [187, 180, 184, 181, 178]

    One section:

    >>> c2 = sg.datasets.her2st(sections=["C2"])
    >>> c2["table"].n_obs, sorted(c2.images)
    (187, ['C2_he'])
    """
    folder = resolve_dataset_dir("her2st", path, required=REQUIRED_FILES["her2st"])
    found = her2st_sections(folder)
    if sections is None:
        chosen = found
    else:
        chosen = [str(s) for s in sections]
        absent = [s for s in chosen if s not in found]
        if absent:
            raise KeyError(
                f"her2st sections {absent} are not in {folder} (found {found}); each needs "
                f"images/<S>_*.jpg, counts/<S>.tsv.gz and spots/<S>_selection.tsv."
            )
    if not chosen:
        raise FileNotFoundError(f"{folder} holds no complete her2st section (image + counts + spot selection).")

    logger.info(f"Reading her2st sections {chosen} from {display_path(folder)}.")
    # JPEG decoding and gzip parsing release the GIL: sections load in parallel threads.
    workers = max(1, min(len(chosen), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda s: _read_section(folder, s), chosen))
    return build_sdata(
        arrays, technology="st", unit_kind="spot", unit_diameter_um=ST_SPOT_DIAMETER_UM, drop_empty=drop_empty
    )
