"""Input and output: validation of SpatialData objects, slide data and counts, building SpatialData from arrays.

- :func:`validate` describes a SpatialData object in microns (:class:`SlideData`), the entry point
  every function calls first; :func:`get_table` finds a table; :func:`log1p_normalize` is the one
  normalisation of counts.
- :func:`build_sdata` turns per-section arrays (:class:`SectionArrays`) into the package's
  SpatialData layout; :func:`from_anndata` does it for a plain AnnData plus an image.
"""

from ._anndata import from_anndata
from ._build import (
    SectionArrays,
    build_sdata,
    build_shapes,
    build_table,
    level_shapes,
    pixel_index_to_um,
    pyramid_factors,
    read_rgb,
    read_rgb_pyramid,
)
from ._image import SectionImage, conversion_for, image_levels
from ._slide import SlideData, get_table, log1p_normalize
from ._validate import validate

__all__ = [
    "validate",
    "SlideData",
    "SectionImage",
    "get_table",
    "log1p_normalize",
    "from_anndata",
    "build_sdata",
    "build_shapes",
    "build_table",
    "SectionArrays",
    "read_rgb",
    "read_rgb_pyramid",
    "pixel_index_to_um",
    "pyramid_factors",
    "level_shapes",
    "image_levels",
    "conversion_for",
]
