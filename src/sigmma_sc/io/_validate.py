"""The one validation entry point: :func:`validate` turns a SpatialData object into a :class:`SlideData`.

Every public function of the package calls :func:`validate` first. It reads, checks and never
writes: the user's object is left exactly as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sigmma_sc._constants import Choices, Keys

from ._geometry import check_inside, geometry_foreign, geometry_sigmma
from ._slide import SlideData, check_count_values, check_empty, check_names, get_table

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------
def validate(
    sdata: SpatialData,
    *,
    table_key: str = Keys.TABLE,
    require_counts: bool = False,
    require_image: bool = True,
    min_units: int = 1,
    mpp: float | None = None,
    coordinate_system: str | None = None,
    image_key: str | dict[str, str] | None = None,
    allow_empty_genes: bool = False,
) -> SlideData:
    """Check a SpatialData object and describe it in microns; the one entry point every function calls.

    It never modifies ``sdata``: images are converted to ``uint8`` lazily inside
    :meth:`SectionImage.read`, counts are copied by :meth:`SlideData.counts`.

    Accepted inputs:

    - objects from :mod:`sigmma_sc.datasets` and :func:`sigmma_sc.io.from_anndata`
      (``table.uns["sigmma_dataset"]`` present, ``obsm["spatial"]`` in microns, one coordinate
      system per section, in microns);
    - objects from ``spatialdata_io.xenium(path)`` (with the aligned H&E, element ``"he_image"``),
      ``spatialdata_io.visium(path, fullres_image_file=...)`` and ``spatialdata_io.visium_hd(path)``,
      passed as they are. The table's ``spatialdata_attrs`` name the annotated shapes; each region
      (shapes element) is a section, paired with one image. Unit centres are the shapes' centroids
      mapped to the image's coordinate system and then to microns, where the microns come from
      ``mpp=`` (microns per full-resolution pixel of the chosen image) when given, else from what
      the technology fixes: Xenium shapes are stored in microns (``cell_circles`` /
      ``cell_boundaries``, also used when the table annotates ``cell_labels``); Visium spots are
      55 µm wide (their radius in pixels gives the pixel size); Visium HD bins are as wide as the
      ``square_NNNum`` in their name. Visium HD has one table per bin size: pass
      ``table_key="square_016um"``.
    - Image choice when several exist: images with a transformation to a coordinate system of
      the shapes (``coordinate_system=`` if given); RGB before anything else (Xenium's DAPI
      ``morphology_focus`` is never picked), then the most pixels (the full-resolution H&E before
      ``hires`` / ``lowres`` thumbnails), then the name; ``"global"`` when several coordinate
      systems are shared. ``image_key=`` overrides the choice.

    ``unit_kind`` comes from ``uns``; otherwise Visium / ST units are spots and Xenium cells and
    Visium HD bins are cells; unknown technologies count as spots when at least 30 µm wide.

    Parameters
    ----------
    sdata
        The SpatialData object.
    table_key
        Table with the units.
    require_counts
        Check raw counts now (``layers["counts"]`` else ``X``): finite, non-negative integers (unless
        the table is flagged ``log_normalized``), no unit or gene with zero counts.
    require_image
        Every section needs an RGB image (``False``: sections without image are allowed and get no
        entry in ``images``).
    min_units
        Fewest units accepted (e.g. a batch size).
    mpp
        Microns per full-resolution pixel of the image, for objects whose transformations do not
        say it (ignored, with a warning when it disagrees, for sigmma_sc objects).
    coordinate_system
        Use this coordinate system instead of the default (the section name for sigmma_sc objects,
        ``"global"`` or the first shared one otherwise).
    image_key
        Image element to use (one name for all sections, or ``{section: name}``).
    allow_empty_genes
        With ``require_counts``, accept genes with zero counts in every unit (a held-out test
        section or a gene panel union legitimately has some); units with zero counts are still
        refused (they cannot be normalised).

    Returns
    -------
    The validated :class:`SlideData`.

    Raises
    ------
    KeyError
        Missing table, image, shapes, obs / obsm key or gene.
    ValueError
        Unusable image (not RGB, bad dtype / range), missing transformation, units outside the
        image, bad counts, duplicated names, empty units / genes, too few units.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> slide = sg.io.validate(sg.datasets.xenium_lung(), require_counts=True)
    >>> slide.images["NCBI858"].um_per_px, slide.unit_kind, slide.n_units
    (2.125, 'cell', 200)

    A Visium object straight from spatialdata_io:

    >>> import spatialdata_io  # doctest: +SKIP
    >>> sdata = spatialdata_io.visium("outs/", fullres_image_file="image.tif")  # doctest: +SKIP
    >>> slide = sg.io.validate(sdata)  # doctest: +SKIP
    """
    if getattr(sdata, "tables", None) is None:
        raise TypeError(
            f"validate expects a spatialdata.SpatialData, got {type(sdata).__name__}. For a plain AnnData plus an "
            "image use sigmma_sc.io.from_anndata(adata, image, mpp=...)."
        )
    table = get_table(sdata, table_key)
    check_names(table, table_key)
    if table.n_obs < max(int(min_units), 1):
        raise ValueError(
            f"table {table_key!r} has {table.n_obs} unit(s); at least {max(int(min_units), 1)} are needed "
            "(e.g. one training batch). Use more sections / units or a smaller batch_size."
        )
    if mpp is not None and (not np.isfinite(mpp) or mpp <= 0):
        raise ValueError(f"mpp must be a positive number of microns per pixel, got {mpp!r}.")
    info = table.uns.get(Keys.DATASET)
    opts = {
        "require_image": require_image,
        "mpp": mpp,
        "coordinate_system": coordinate_system,
        "image_key": image_key,
    }
    if info is not None:
        geo = geometry_sigmma(sdata, table, table_key, dict(info), **opts)
    else:
        geo = geometry_foreign(sdata, table, table_key, **opts)
    if geo.technology not in Choices.TECHNOLOGIES:
        raise ValueError(f"technology {geo.technology!r} unknown; use one of {Choices.TECHNOLOGIES}.")
    check_inside(geo)
    slide = SlideData(sdata=sdata, table=table, table_key=table_key, **vars(geo))
    if require_counts:
        if table.n_vars == 0:
            raise ValueError(
                f"table {table_key!r} holds no genes (an H&E-only table): this step needs the units' counts. Add "
                f"raw integer counts (table.X or table.layers[{Keys.COUNTS_LAYER!r}]) for the units."
            )
        if geo.log_normalized and Keys.COUNTS_LAYER not in table.layers:
            check_count_values(table.X, f"table {table_key!r} X", log_normalized=True)
            check_empty(table.X, "X", table_key, allow_empty_genes=allow_empty_genes)
        else:
            mat = slide.counts()
            check_empty(mat, slide.counts_source or "X", table_key, allow_empty_genes=allow_empty_genes)
    return slide
